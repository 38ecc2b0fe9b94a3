"""How much memory a config needs, counted from its shapes before anything is allocated; and out-of-memory errors
turned into one line that says what to lower.

The estimate counts the tensors alive at the highest point of a training step, as the code allocates them:
- parameters, their gradients, and Adam's two moments (each the size of the parameters);
- the fast path's tape (hmlm/fast/, LayerTape with save=True): every buffer of every layer, for all T steps;
- at the backward's highest point (hmlm/fast/, backward_sequence), on top of the tape: the gradients that reach
  every layer's h from the output module, each layer's LayerGrads (ds; dact and d_cn unless the C++ kernels sum
  the layer norm gradients as they go: the Triton kernels write them as per-step rows, hmlm.fast.kernels.ln_grad_rows),
  and the weight gradients made before the tape is freed;
- at the end of the forward, on top of the tape: the output module's saved activations (paper eqs. 11-12),
  the logits and cross-entropy's log-softmax, the embedding and layer 1's input projection;
- evaluation (no gradient): one slot per buffer (hmlm/fast/'s tapes without save), every layer's h for the batch,
  the output module's activations, and the boundaries kept for scoring.
The step's activations and the evaluation's are never alive together (evaluation runs between steps).

`hmlm bench` measures the rise of a fresh process's resident memory during its first training step (the model
already built): `first_step` is the estimate of that figure. docs/performance.md compares the two.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from hmlm.errors import UserError
from hmlm.model import ModelConfig

DTYPE_BYTES = {"fp32": 4, "fp32-strict": 4, "fp64": 8, "bf16": 4}  # bf16 autocasts the matmuls; the rest stays fp32
# What the first training step adds whatever the shape: the libraries' workspaces and thread pools, the fused
# kernels' library. Measured as `hmlm bench` measures, for a 3x8 model with batch 1 and seq_len 1 (torch 2.13, CPU):
#   python -c "from hmlm.bench.throughput import Shape, peak_rss_rise; print(peak_rss_rise('fast',
# Shape(1,1,8,8,3,8,50), True))" gave 18.5 MiB.
RUNTIME_BYTES = 18 * 2**20


@dataclass(frozen=True)
class MemoryShape:
    """Everything the estimate depends on."""

    model: ModelConfig
    vocab_size: int
    batch_size: int  # this process's streams
    seq_len: int
    precision: str = "fp32"
    kernels: str = "torch"  # the fast path's backend (hmlm.fast.kernels.select): "cpu", "triton" or "torch"
    eval_batch_size: int = 0  # 0: the training batch
    eval_tokens: int = 0  # tokens whose boundaries evaluation keeps for scoring (0: none kept)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by what holds them."""

    parameters: int
    gradients: int
    optimizer: int  # Adam's exp_avg and exp_avg_sq
    tape: int  # the fast path's forward buffers, kept for the backward
    forward_extra: int  # at the end of the forward, beside the tape: output module, embedding, logits
    backward_extra: int  # at the backward's highest point, beside the tape
    evaluation: int  # a no-gradient forward of one evaluation batch
    runtime: int = RUNTIME_BYTES  # the libraries' own, on the first step

    @property
    def activations(self) -> int:
        """The highest point of one training step, beyond parameters, gradients and optimizer state."""
        return self.tape + max(self.forward_extra, self.backward_extra)

    @property
    def total(self) -> int:
        """The peak of a training run: the model and its optimizer, and the larger of a step and an evaluation.
        (From the second step on, the previous gradients are alive until the backward replaces them.)"""
        return self.runtime + self.parameters + self.gradients + self.optimizer + max(self.activations, self.evaluation)

    @property
    def first_step(self) -> int:
        """What `hmlm bench` measures: the rise during the first training step of a model already built. Adam's
        moments appear at its end, when the activations are gone."""
        return self.runtime + self.gradients + max(self.activations, self.optimizer)


def estimate(shape: MemoryShape) -> MemoryEstimate:
    cfg = shape.model
    s = DTYPE_BYTES[shape.precision]
    params = count_parameters(cfg, shape.vocab_size)
    if cfg.kind == "lstm":
        return _estimate_lstm(shape, params, s)
    B, T, E, out_e, V = shape.batch_size, shape.seq_len, cfg.embed_dim, cfg.output_embed_dim, shape.vocab_size
    sizes, L = list(cfg.hidden_sizes), len(cfg.hidden_sizes)
    total_h = sum(sizes)
    autocast = shape.precision == "bf16"
    mm = 2 if autocast else s  # the matmul inputs' element size

    tape = (T + 1) * B * L * s  # Z, every layer's z
    grad_buffers = 0  # LayerGrads of every layer, allocated together at the start of the backward
    for layer, H in enumerate(sizes):
        tape += layer_tape(shape, layer, save=True)
        rows = 4 * H + (0 if layer == L - 1 else 1)
        grad_buffers += T * B * rows * s  # ds
        grad_buffers += 2 * B * 2 * H * s + 3 * B * s  # the [dh | dc] pairs, dz, dz_below
        if autocast:
            grad_buffers += B * rows * mm  # ds in the matmul's dtype (ds_mm)
        if cfg.layer_norm and shape.kernels != "cpu":  # C++ sums the layer norm gradients as it goes
            grad_buffers += T * B * (4 * H + H) * s  # the ln_grad rows: dact, d_cn
    hmlstm_weights = sum(_layer_weight_numel(cfg, layer) for layer in range(L))

    # The forward, beside the tape and the embedding: during the loop, layer 1's projected input and the
    # contiguous transposed weights (forward_sequence); after it (those are gone), the output module's saved
    # tensors, the logits and cross-entropy's log-softmax.
    embedded = 2 * B * T * E * s  # the embedding, and the contiguous copy layer 1's projection saves
    rows_1 = 4 * sizes[0] + (0 if L == 1 else 1)
    loop = T * B * rows_1 * s + hmlstm_weights * mm
    output_saved = B * T * (total_h + total_h + out_e + L) * s  # h_all, gated, ReLU's output, the gates
    logits = 2 * B * T * V * s
    forward_extra = embedded + max(loop, output_saved + logits)
    # The backward's highest point: the output module's nodes have run (their saved tensors are freed), the
    # gradients of every layer's h are summed, every layer's LayerGrads is allocated, and the stack's weight
    # gradients (counted with the gradients) are made before its tape goes. The logits stay (the caller holds them).
    grad_hidden = B * T * total_h * s
    ln_scratch = 0 if shape.kernels == "cpu" else _ln_scratch(shape)  # the ln_grad rows, summed with torch ops
    backward_extra = embedded + B * T * V * s + grad_hidden + grad_buffers + ln_scratch

    gradients = params * s
    return MemoryEstimate(
        parameters=params * s,
        gradients=gradients,
        optimizer=2 * params * s,
        tape=tape,
        forward_extra=forward_extra,
        backward_extra=backward_extra,
        evaluation=evaluation_bytes(shape),
    )


def layer_tape(shape: MemoryShape, layer: int, save: bool) -> int:
    """Bytes of fast.LayerTape(plan, layer, B, T, ..., save), buffer by buffer (see its __init__), with the h that
    `attach` adds when h does not live in x."""
    cfg = shape.model
    sizes, L = cfg.hidden_sizes, len(cfg.hidden_sizes)
    s = DTYPE_BYTES[shape.precision]
    B = shape.batch_size if save else (shape.eval_batch_size or shape.batch_size)
    T = shape.seq_len
    H = sizes[layer]
    D = sizes[layer - 1] if layer > 0 else 0  # layer 1's input is projected before the loop
    A = sizes[layer + 1] if layer < L - 1 else 0
    top, bottom = layer == L - 1, layer == 0
    mm = 2 if shape.precision == "bf16" else s
    h_in_x = save and mm == s
    S = T if save else 1
    n = (T + 1 if save else 1) * B * (D + H + A) * mm  # x
    n += (T + 1 if save else 2) * B * H * s  # c
    n += S * B * (4 * H + 4 * H + H + H) * s  # gates, act, keep_f, tc
    n += S * B * (0 if top else 1) * s * 2  # zhat, zraw
    if mm != s:
        n += B * (4 * H + (0 if top else 1)) * mm  # the step's matmul product
    if save and not bottom:
        n += S * B * 2 * H * s  # neg_d_copy
    if save and cfg.layer_norm:
        n += S * B * (4 + 4 + 1 + 1) * s  # the layer norms' mean and rstd
    if not h_in_x:
        n += (T + 1) * B * H * s  # h, a buffer of its own
    return n


def evaluation_bytes(shape: MemoryShape) -> int:
    """One no-gradient forward of an evaluation batch (fast.run without save), and the boundaries kept."""
    cfg = shape.model
    s = DTYPE_BYTES[shape.precision]
    B, T, V = shape.eval_batch_size or shape.batch_size, shape.seq_len, shape.vocab_size
    sizes, L = cfg.hidden_sizes, len(cfg.hidden_sizes)
    if cfg.kind == "lstm":
        return B * T * (2 * sizes[0] + 2 * V) * s
    tapes = sum(layer_tape(shape, layer, save=False) for layer in range(L)) + (T + 1) * B * L * s
    rows_1 = 4 * sizes[0] + (0 if L == 1 else 1)
    # x_proj and the embedding; h_all and gated; the output embedding before and after its ReLU; the logits in
    # float and cross-entropy's log-softmax
    activations = B * T * (rows_1 + cfg.embed_dim + 2 * sum(sizes) + 2 * cfg.output_embed_dim + 2 * V) * s
    kept = 2 * shape.eval_tokens * (L - 1) * 4  # every position's z as float, and their concatenation
    return tapes + activations + kept


def _ln_scratch(shape: MemoryShape) -> int:
    """parameter_gradients without the C++ kernels: the normalized gates and their product with dact, for the
    layer norm gains of the widest layer (one layer at a time)."""
    if not shape.model.layer_norm:
        return 0
    H = max(shape.model.hidden_sizes)
    return 2 * shape.seq_len * shape.batch_size * 4 * H * DTYPE_BYTES[shape.precision]


def _layer_weight_numel(cfg: ModelConfig, layer: int) -> int:
    sizes, L = cfg.hidden_sizes, len(cfg.hidden_sizes)
    below = cfg.embed_dim if layer == 0 else sizes[layer - 1]
    above = sizes[layer + 1] if layer < L - 1 else 0
    rows = 4 * sizes[layer] + (0 if layer == L - 1 else 1)
    return rows * (below + sizes[layer] + above)


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """CharLM(vocab_size, cfg)'s parameter count, from the shapes alone (tests hold it to the model's own)."""
    E, sizes, L = cfg.embed_dim, list(cfg.hidden_sizes), len(cfg.hidden_sizes)
    n = vocab_size * E  # the embedding
    if cfg.kind == "lstm":
        H = sizes[0]
        for layer in range(L):
            below = E if layer == 0 else H
            n += 4 * H * (below + H) + 8 * H  # torch's LSTM has two bias vectors
        return n + H * vocab_size + vocab_size
    for layer, H in enumerate(sizes):
        rows = 4 * H + (0 if layer == L - 1 else 1)
        n += _layer_weight_numel(cfg, layer) + rows
        if cfg.layer_norm:
            n += 10 * H  # gate gain and bias (4, H), cell gain and bias (H,)
    total_h, out_e = sum(sizes), cfg.output_embed_dim
    n += total_h * L + L  # the output gates
    n += total_h * out_e  # W^e, no bias
    return n + out_e * vocab_size + vocab_size  # the logits


def _estimate_lstm(shape: MemoryShape, params: int, s: int) -> MemoryEstimate:
    """The baseline (kind: lstm), counted coarsely: torch's LSTM keeps about its gates, c and h per layer and step."""
    cfg = shape.model
    B, T, H, V, L = shape.batch_size, shape.seq_len, cfg.hidden_sizes[0], shape.vocab_size, len(cfg.hidden_sizes)
    tape = L * T * B * 7 * H * s + B * T * cfg.embed_dim * s
    return MemoryEstimate(
        parameters=params * s,
        gradients=params * s,
        optimizer=2 * params * s,
        tape=tape,
        forward_extra=3 * B * T * V * s,
        backward_extra=B * T * (2 * H + V) * s + tape // 2,
        evaluation=evaluation_bytes(shape),
    )


# --- What is free ------------------------------------------------------------------------------------------------


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use: on CUDA the device's free memory, on the CPU MemAvailable of
    /proc/meminfo (free memory plus what the kernel can reclaim). None where neither is known."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n <= 0:
        return "0 MiB"
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def check_fits(shape: MemoryShape, device: torch.device) -> tuple[MemoryEstimate, int | None]:
    """The estimate, and what is free; a UserError when the estimate is larger, naming the key to lower."""
    est = estimate(shape)
    free = available_bytes(device)
    if free is None or est.total <= free:
        return est, free
    where = "on the GPU" if device.type == "cuda" else "in memory"
    raise UserError(
        f"this config needs about {format_bytes(est.total)} and {format_bytes(free)} is free {where} "
        f"({format_bytes(est.parameters)} of parameters, {format_bytes(est.activations)} for a step's activations): "
        f"{what_to_lower(shape, free)}; or -s train.memory_check=false to try anyway"
    )


def what_to_lower(shape: MemoryShape, free: int) -> str:
    """The largest batch size that fits, if one does; else the model's width."""
    best = largest_fitting(lambda batch: estimate(_with_batch(shape, batch)).total <= free, shape.batch_size - 1)
    if best:
        return f"lower train.batch_size to {best} or less (or train.seq_len, or model.hidden_sizes)"
    return "lower model.hidden_sizes or model.output_embed_dim (even train.batch_size=1 does not fit)"


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in 1..upper for which fits(n), 0 if none; fits must hold for all n below one that fits (as
    an estimate that grows with the batch does)."""
    best, low, high = 0, 1, upper
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def _with_batch(shape: MemoryShape, batch: int) -> MemoryShape:
    from dataclasses import replace

    return replace(shape, batch_size=batch, eval_batch_size=min(shape.eval_batch_size, batch))


# --- Out-of-memory errors that still happen ----------------------------------------------------------------------

_CPU_OOM = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)")
_ASKED = re.compile(r"(?:tried to allocate|allocate) ([\d,]+) bytes|Tried to allocate ([\d.]+ [KMGT]iB)")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError (an OS kill cannot be caught at all)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and bool(_CPU_OOM.search(str(error)))


def asked_for(error: BaseException) -> str:
    """' (it asked for 107.29 GiB)' from the allocator's message, or ''."""
    match = _ASKED.search(str(error))
    if match is None:
        return ""
    if match.group(1):
        return f" (one allocation of {format_bytes(int(match.group(1).replace(',', '')))})"
    return f" (one allocation of {match.group(2)})"


class OutOfMemory(UserError):
    """An allocation failed (one line for the user, exit status 2 like every UserError)."""


@contextmanager
def out_of_memory_as_user_error(what: str, lower: str) -> Iterator[None]:
    """Turn an out-of-memory error inside into an OutOfMemory error: `what` names the shape that ran out, `lower` the
    keys or options that make it smaller."""
    try:
        yield
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_out_of_memory(error):
            raise
        raise OutOfMemory(f"out of memory{asked_for(error)} for {what}: lower {lower}") from None


Item = TypeVar("Item")


def out_of_memory_in(items: Iterable[Item], what: str, lower: str) -> Iterator[Item]:
    """`items` (a generator, such as sampling's), with its out-of-memory errors turned into OutOfMemory."""
    with out_of_memory_as_user_error(what, lower):
        yield from items
