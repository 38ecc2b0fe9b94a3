"""Generation: warm the recurrent state on the prompt once, then step one symbol at a time."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch

from hmlm.analysis.locks import LockWatch
from hmlm.analysis.stepper import stepper_for
from hmlm.data import Vocab
from hmlm.errors import UserError
from hmlm.model import CharLM


@torch.no_grad()
def generate_ids(
    model: CharLM,
    prompt_ids: list[int],
    length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    watch: LockWatch | None = None,
) -> Iterator[int]:
    """Yield `length` token ids drawn after `prompt_ids`. The prompt is read once; then only the newest
    symbol goes in, with the recurrent state carried (through a Stepper where there is one: the same
    numbers, without the cost of a model call per symbol). `generator` keeps the global RNG untouched.

    The draw is made on the generator's device (the CPU for a plain `torch.Generator()`, and the CPU's global
    RNG when there is none), whatever device the model runs on: each symbol has to come back to the host to be
    yielded anyway, so drawing there costs no extra wait, and one seed draws the same uniform numbers on every
    device (the text differs only where the probabilities differ by rounding).

    `watch` (hmlm/analysis/locks.py) is given the boundaries of every step read, the prompt's and the generated
    symbols', so that a caller can tell whether the sample locked into a layer firing on every step."""
    if temperature <= 0:
        raise UserError(f"--temperature must be positive, not {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k must be 0 (no limit) or positive, not {top_k}")
    model.eval()
    device = next(model.parameters()).device
    draw_on = generator.device if generator is not None else torch.device("cpu")
    out = model(torch.tensor([prompt_ids], device=device))  # (1, P)
    state, logits = out.state, out.logits[:, -1]  # (1, V)
    _watch(watch, out.boundaries)
    stepper = stepper_for(model, state) if length > 1 else None
    for _ in range(length):
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (1, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(draw_on)  # (1, V)
        next_id = torch.multinomial(probs, 1, generator=generator)  # (1, 1)
        yield int(next_id)
        if stepper is not None:
            logits = stepper.step(int(next_id))
            _watch(watch, stepper.boundaries)
            continue
        out = model(next_id.to(device), state)
        state, logits = out.state, out.logits[:, -1]
        _watch(watch, out.boundaries)


def _watch(watch: LockWatch | None, boundaries: torch.Tensor) -> None:
    if watch is not None:  # the loss is not a sample's concern: LockWatch's per-stream sums get zeros
        watch.add(boundaries, torch.zeros(boundaries.shape[:2], dtype=torch.float64, device=boundaries.device))


def generate(
    model: CharLM,
    vocab: Vocab,
    prompt: str,
    length: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    watch: LockWatch | None = None,
) -> Iterator[str]:
    """Yield the text generated after `prompt`, piece by piece (bytes are decoded as UTF-8 as they complete)."""
    if not prompt:
        raise UserError("--prompt must hold at least one character for the model to start from")
    ids = generate_ids(model, vocab.encode(prompt), length, temperature, top_k, generator, watch)
    if vocab.kind != "bytes":
        for symbol in ids:
            yield vocab.decode([symbol])
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for symbol in ids:
        yield decoder.decode(bytes([vocab.symbols[symbol]]))
    yield decoder.decode(b"", final=True)
