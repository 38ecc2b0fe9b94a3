"""`hmlm bench --run RUN`: inference speed of a trained HM-LSTM, at its real boundary rates, on real text.

A fresh model closes a segment on about half of the steps in every layer; a trained one closes few in its upper
layers, which then mostly COPY, and what inference skips (hmlm/fast/copy_skip.py) depends on that. So this measures the
run's own model on its dataset's validation text, against nn.LSTM of the same width and depth (untrained: its
speed does not depend on its weights; on the CPU both as torch runs it, on oneDNN, and with oneDNN off), and the
HM-LSTM without skipping (HMLM_SKIP_COPY=0), in one process, in interleaved rounds after warm-up rounds,
reporting medians:
- sampling: one symbol at a time (batch 1, seq 1), as `hmlm sample` does: generate_ids from a prompt of real
  text, timed from the first generated symbol to the last (the prompt's one call left out);
- evaluation: batches of contiguous streams (batch 64, seq 100 by default) of the validation text with the state
  carried, as `hmlm eval` does: the model's no-grad forward.
For each, the fraction of rows (stream-steps) per layer that COPY and that skipping left out (copy_skip.COUNTS,
reset before each measured call), and the boundary rates of the evaluated text.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from hmlm.analysis.sample import generate_ids
from hmlm.bench.throughput import describe_device, sync
from hmlm.checkpoint import load_trained
from hmlm.data import StreamBatcher, open_dataset
from hmlm.devices import resolve_device
from hmlm.errors import UserError
from hmlm.fast import copy_skip, kernels
from hmlm.model import CharLM, ModelConfig

VARIANTS = {  # key: (label, model, HMLM_SKIP_COPY)
    "skip": ("HM-LSTM, skipping", "hmlstm", "1"),
    "noskip": ("HM-LSTM, no skipping", "hmlstm", "0"),
    "lstm": ("nn.LSTM", "lstm", "1"),
    # On the CPU torch runs nn.LSTM on oneDNN, which at batch 1 costs several times its own native kernels here:
    # both are timed, and the ratios are against the default (what `hmlm sample` of an LSTM run gets).
    "lstm_native": ("nn.LSTM, oneDNN off", "lstm", "1"),
}
PROMPT = 50  # symbols of real text that start every sample
DEFAULT_STEPS = 10


@contextmanager
def skip_copy(value: str) -> Iterator[None]:
    """HMLM_SKIP_COPY set to `value` for the duration (inference reads it at every call)."""
    old = os.environ.get("HMLM_SKIP_COPY")
    os.environ["HMLM_SKIP_COPY"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HMLM_SKIP_COPY", None)
        else:
            os.environ["HMLM_SKIP_COPY"] = old


@contextmanager
def counting(counts: copy_skip.SkipCounts | None) -> Iterator[None]:
    """What copy_skip.COUNTS counts during the block, added to `counts` (None: dropped). COUNTS is reset before
    the block, not rebound: whoever holds it (the stepper imports it by name) keeps counting into the same object."""
    copy_skip.COUNTS.reset()
    yield
    seen = copy_skip.COUNTS
    if counts is not None:
        for layer, numbers in enumerate(zip(seen.rows, seen.checked, seen.copies, seen.skipped, strict=True)):
            counts.add(layer, *numbers)


def lstm_like(model: CharLM) -> CharLM:
    """nn.LSTM of the same width (the widest layer's) and depth, embedding and vocabulary."""
    cfg = model.config
    config = ModelConfig(
        kind="lstm", embed_dim=cfg.embed_dim, hidden_sizes=[max(cfg.hidden_sizes)] * len(cfg.hidden_sizes)
    )
    torch.manual_seed(0)
    return CharLM(model.vocab_size, config).eval()


def load(run: Path, device: torch.device) -> tuple[CharLM, np.ndarray, str]:
    """The run's model on `device`, its dataset's validation tokens, and where they came from."""
    if not Path(run).exists():
        raise UserError(f"--run {run}: no such run directory or checkpoint file")
    trained = load_trained(run, device=device)
    if trained.config.model.kind != "hmlstm":
        raise UserError(
            f"--run {run} is an LSTM run (model.kind: {trained.config.model.kind}): it has no COPY to skip; "
            "pass an HM-LSTM run"
        )
    data = trained.config.data
    dataset = open_dataset(data.name, data.dir)
    return trained.model, dataset.split("valid"), f"{data.name} valid"


def run_bench_on_run(
    run: Path,
    device: str = "auto",
    steps: int | None = None,
    warmup: int = 2,
    batch: int | None = None,
    seq_len: int | None = None,
    sample_length: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Time sampling and evaluation of the run's model, skipping and not, against nn.LSTM; as plain data."""
    dev = resolve_device(device)
    steps = DEFAULT_STEPS if steps is None else steps
    batch, seq_len = batch or 64, seq_len or 100
    for name, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--batch", batch, 1),
                               ("--seq-len", seq_len, 1), ("--sample-length", sample_length, 2)):  # fmt: skip
        if value < least:
            raise UserError(f"{name} must be at least {least}, not {value}")
    hm, tokens, text = load(run, dev)
    lstm_model = lstm_like(hm).to(dev)
    models = {"skip": hm.to(dev), "noskip": hm.to(dev), "lstm": lstm_model, "lstm_native": lstm_model}
    variants = [key for key in VARIANTS if key != "lstm_native" or dev.type == "cpu"]
    rounds = warmup + steps
    needed = batch * (rounds * seq_len + 1)
    if len(tokens) < needed:
        raise UserError(f"{text} has {len(tokens):,} tokens, too few for {rounds} rounds of batch {batch} x "
                        f"{seq_len} ({needed:,}): use a smaller --batch, --seq-len or --steps")  # fmt: skip
    prompt = [int(t) for t in tokens[:PROMPT]]
    batches = {key: iter(StreamBatcher(np.asarray(tokens[:needed]), batch, seq_len)) for key in variants}
    states: dict[str, object] = {key: None for key in variants}
    times = {key: {"sample": [], "eval": []} for key in variants}
    counts = {"sample": copy_skip.SkipCounts(), "eval": copy_skip.SkipCounts()}
    boundary_sum, boundary_count = None, 0

    def sample(key: str, seed: int) -> float:
        generator = torch.Generator().manual_seed(seed)
        symbols = generate_ids(models[key], prompt, sample_length, generator=generator)
        next(symbols)  # the prompt's call and the first symbol
        sync(dev)
        start = time.perf_counter()
        for _ in symbols:
            pass
        sync(dev)
        return (sample_length - 1) / (time.perf_counter() - start)

    @torch.no_grad()
    def evaluate(key: str) -> tuple[float, torch.Tensor]:
        x, _ = next(batches[key])
        x = x.to(dev)
        sync(dev)
        start = time.perf_counter()
        out = models[key](x, states[key])
        sync(dev)
        elapsed = time.perf_counter() - start
        states[key] = out.state
        return x.numel() / elapsed, out.boundaries

    order = list(variants)
    for round_ in range(rounds):
        measured = round_ >= warmup
        for key in order:
            onednn = torch.backends.mkldnn.flags(enabled=key != "lstm_native")
            with skip_copy(VARIANTS[key][2]), onednn:
                with counting(counts["sample"] if measured and key == "skip" else None):
                    sampled = sample(key, seed=round_)
                with counting(counts["eval"] if measured and key == "skip" else None):
                    evaluated, boundaries = evaluate(key)
            if measured:
                times[key]["sample"].append(sampled)
                times[key]["eval"].append(evaluated)
                if key == "skip":
                    rates = boundaries.double().sum((0, 1))
                    boundary_sum = rates if boundary_sum is None else boundary_sum + rates
                    boundary_count += boundaries.shape[0] * boundaries.shape[1]
        order = order[1:] + order[:1]
        if progress is not None:
            progress(round_ + 1, rounds)

    results = {}
    for key in variants:
        label = VARIANTS[key][0]
        results[key] = {
            "label": label,
            "sample_symbols_per_s": statistics.median(times[key]["sample"]),
            "eval_chars_per_s": statistics.median(times[key]["eval"]),
            "sample_symbols_per_s_rounds": times[key]["sample"],
            "eval_chars_per_s_rounds": times[key]["eval"],
        }
    cfg = hm.config
    return {
        "run": str(run),
        "model": {
            "hidden_sizes": list(cfg.hidden_sizes),
            "embed_dim": cfg.embed_dim,
            "layer_norm": cfg.layer_norm,
            "boundary": cfg.boundary,
            "output_embed_dim": cfg.output_embed_dim,
            "vocab": hm.vocab_size,
        },
        "lstm": {"hidden": max(cfg.hidden_sizes), "layers": len(cfg.hidden_sizes)},
        "text": text,
        "sample": {"batch": 1, "seq_len": 1, "length": sample_length, "prompt": PROMPT},
        "eval": {"batch": batch, "seq_len": seq_len},
        "device": describe_device(dev),
        "warmup_rounds": warmup,
        "measured_rounds": steps,
        "torch": torch.__version__,
        "fast_kernels_detail": kernels.describe(dev, torch.float32),
        "skipping_used": copy_skip.skips(hm.rnn.fast_plan(dev, torch.float32), dev),
        "boundary_rate": (boundary_sum / max(boundary_count, 1)).tolist() if boundary_sum is not None else [],
        "skip_fractions": {phase: counts[phase].fractions() for phase in counts},
        "results": results,
        "ratios": {
            f"{key}/{base}": {
                "sample": results[key]["sample_symbols_per_s"] / results[base]["sample_symbols_per_s"],
                "eval": results[key]["eval_chars_per_s"] / results[base]["eval_chars_per_s"],
            }
            for key in ("skip", "noskip")
            for base in ("lstm", "lstm_native")
            if base in results
        },
    }


def format_run_report(report: dict) -> str:
    model, dev, results = report["model"], report["device"], report["results"]
    sizes = model["hidden_sizes"]
    shape = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "x".join(map(str, sizes))
    where = dev["name"] + (f", {dev['cores']} cores, {dev['threads']} threads" if dev["type"] == "cpu" else "")
    lines = [
        f"hmlm bench --run {report['run']}: HM-LSTM {shape} (layer norm {'on' if model['layer_norm'] else 'off'}, "
        f"boundary {model['boundary']}) against nn.LSTM {report['lstm']['layers']}x{report['lstm']['hidden']}, "
        f"on {report['text']} text",
        f"device: {dev['type']} ({where}); torch {report['torch']}; "
        f"median of {report['measured_rounds']} interleaved rounds after {report['warmup_rounds']} warm-up",
        f"fast path: {report['fast_kernels_detail']}; skipping COPY: "
        f"{'used' if report['skipping_used'] else 'not used here (see hmlm/fast/copy_skip.py)'}",
        f"sampling: batch 1, one symbol at a time, {report['sample']['length']} symbols a round; "
        f"evaluation: batch {report['eval']['batch']} x seq {report['eval']['seq_len']}, state carried",
        "",
        f"{'':22s} {'sampling symbols/s':>19s} {'vs LSTM':>8s} {'evaluation chars/s':>19s} {'vs LSTM':>8s}",
    ]
    lstm = results["lstm"]
    for r in results.values():
        vs_sample = r["sample_symbols_per_s"] / lstm["sample_symbols_per_s"]
        vs_eval = r["eval_chars_per_s"] / lstm["eval_chars_per_s"]
        lines.append(
            f"{r['label']:22s} {r['sample_symbols_per_s']:19,.0f} {vs_sample:7.2f}x "
            f"{r['eval_chars_per_s']:19,.0f} {vs_eval:7.2f}x"
        )
    lines += ["", "per layer (rows = stream-steps):"]
    rates = report["boundary_rate"]
    lines.append("  boundary rate, evaluated text: " + ", ".join(f"{r:.3f}" for r in rates) + ", - (top)")
    for phase, name in (("sample", "sampling"), ("eval", "evaluation")):
        fractions = report["skip_fractions"][phase]
        if not fractions["skipped"]:
            lines.append(f"  {name}: nothing skipped")
            continue
        copy = ", ".join("-" if f is None else f"{f:.3f}" for f in fractions["copy"])
        skipped = ", ".join(f"{f:.3f}" for f in fractions["skipped"])
        lines.append(f"  {name}: rows that COPY {copy}; rows skipped {skipped}")
    return "\n".join(lines)
