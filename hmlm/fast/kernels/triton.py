"""The "triton" backend: the three functions of hmlm.fast.kernels.FusedKernels, each one launch of a Triton kernel
(triton_kernels.py holds the kernels, and how they run on the CPU through Triton's interpreter), on rows of a
(B, width) tensor: one program per batch row. Also `recording`, which lists the launches a call makes (the
ahead-of-time compile check replays them for real targets), and `self_test`, which tries the kernels once per dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from hmlm.devices import capturing
from hmlm.fast.kernels.protocol import LN_EPS, ZRAW_MODES
from hmlm.fast.kernels.triton_kernels import DEVICE, INTERPRETED, MODE, _cell_backward, _cell_forward, _route_backward

__all__ = ["DEVICE", "INTERPRETED", "MODE", "cell_backward", "cell_forward", "recording", "route_backward", "self_test"]


# --- The interface (hmlm.fast.kernels.FusedKernels) -----------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What one launch hands a kernel, as Triton specializes on it: per argument, by name in the kernel's order, a
    tensor's dtype and its address modulo 16 (Triton specializes on 16-byte alignment), an integer (its
    divisibility by 16, and being 1, are specialized on), a float, or a constexpr's value; and the warps.
    tools/compile_kernels.py compiles each distinct one for real GPU targets."""

    kernel: str
    args: tuple[tuple[str, str, object], ...]  # (name, "tensor" | "int" | "float" | "constexpr", value)
    num_warps: int


_recorded: list[Launch] | None = None


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within, every launch is also recorded into the list this yields (and still runs)."""
    global _recorded
    saved, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = saved


def _describe(name: str, value) -> tuple[str, str, object]:
    if isinstance(value, torch.Tensor):
        return name, "tensor", f"{str(value.dtype).removeprefix('torch.')}:{value.data_ptr() % 16}"
    if isinstance(value, int):
        return name, "int", value
    return name, "float", float(value)


def _launch(kernel, grid: tuple[int], args: tuple, constexprs: dict, num_warps: int) -> None:
    """Every launch of this module's kernels goes through here: `args` in the kernel's order, then constexprs."""
    if _recorded is not None:
        names = kernel.arg_names
        described = [_describe(name, value) for name, value in zip(names, args, strict=False)]
        described += [(name, "constexpr", constexprs[name]) for name in names[len(args) :]]
        _recorded.append(Launch(kernel.fn.__name__, tuple(described), num_warps))
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def _rows(t: torch.Tensor | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A tensor and its row stride, or a stand-in the kernel never touches."""
    return (stand_in, 0) if t is None else (t, t.stride(0))


def _block(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()  # the next power of 2 (triton.next_power_of_2)


def _warps(block: int) -> int:
    return max(1, min(8, block // 128))


_slope_tensors: dict[tuple[float, torch.device], torch.Tensor] = {}  # float64 slopes given as numbers, on the device


def _slope_arg(slope: float | torch.Tensor, like: torch.Tensor) -> tuple[float | torch.Tensor, bool]:
    """The kernels' slope and SLOPE_PTR. A tensor goes by pointer (read on the device, no host synchronization,
    and graph-capturable). A number goes as Triton's float scalar, which is float32 (compiled and interpreted):
    exact for float32 work; for float64 work the number goes by pointer too, from a 0-dim float64 tensor made once
    per value and device (a fill, no host read), so that an eager step with a number and a captured step with a
    tensor compute the same, with the same kernel variant. Under capture no tensor can be made that way: hmlm's
    captured regions (hmlm/training/cuda_graph.py) give the slope as a tensor."""
    if isinstance(slope, torch.Tensor):
        return slope, True
    slope = float(slope)
    if like.dtype != torch.float64:
        return slope, False
    if capturing(like):  # a fill made now would run only at replay, and a float32 scalar is another variant
        raise RuntimeError("in float64 under CUDA graph capture the slope must come as a tensor, not a number")
    key = (slope, like.device)
    tensor = _slope_tensors.get(key)
    if tensor is None:
        if len(_slope_tensors) >= 64:  # a slope schedule makes a new value every epoch or step
            _slope_tensors.clear()
        tensor = _slope_tensors[key] = torch.full((), slope, dtype=torch.float64, device=like.device)
    return tensor, True


def cell_forward(
    gates, zhat, addend, ln_gain, ln_bias, cell_gain, cell_bias, h_prev, c_prev, z_prev, z_below, act, keep_f, c,
    tc, h, h_rec, h_up, h_down, neg_dh, neg_dc, zraw, z, gates_mean, gates_rstd, cell_mean, cell_rstd, zraw_mode,
    seed, slope, eps,
) -> None:  # fmt: skip
    B, H = c.shape
    block = _block(H)
    slope, slope_ptr = _slope_arg(slope, gates)
    # The seed's z = zraw differs from keep*zraw only where a layer can copy (not the bottom, where keep = 1) and has
    # a boundary (not the top): elsewhere its step is the hmlm cell's, and takes that variant (fewer to compile).
    seed = bool(seed) and z_below is not None and zhat is not None
    _launch(_cell_forward, (B,), (
        *_rows(gates, gates), *_rows(zhat, gates), *_rows(addend, gates),
        ln_gain if ln_gain is not None else gates, ln_bias if ln_bias is not None else gates,
        cell_gain if cell_gain is not None else gates, cell_bias if cell_bias is not None else gates,
        *_rows(h_prev, gates), *_rows(c_prev, gates), *_rows(z_prev, gates), *_rows(z_below, gates),
        *_rows(act, gates), *_rows(keep_f, gates), *_rows(c, gates), *_rows(tc, gates), *_rows(h, gates),
        *_rows(h_rec, gates), *_rows(h_up, gates), *_rows(h_down, gates),
        *_rows(neg_dh, gates), *_rows(neg_dc, gates), *_rows(zraw, gates), *_rows(z, gates),
        *_rows(gates_mean, gates), *_rows(gates_rstd, gates), *_rows(cell_mean, gates), *_rows(cell_rstd, gates),
        H, slope, float(eps),
    ), dict(
        BLOCK=block, BOTTOM=z_below is None, TOP=zhat is None, LN=ln_gain is not None,
        STATS=gates_mean is not None, SAVE_COPY=neg_dh is not None, ZRAW_MODE=int(zraw_mode), SEED=seed,
        SLOPE_PTR=slope_ptr, ADDEND=addend is not None, H_REC=h_rec is not None, H_UP=h_up is not None,
        H_DOWN=h_down is not None,
    ), _warps(block))  # fmt: skip


def cell_backward(
    pair, g_ext, g_z, act, tc, c_prev, c, keep_f, neg_d_copy, zraw, zhat, gates, gates_mean, gates_rstd, cell_mean,
    cell_rstd, ln_gain, cell_gain, ln_grad, z_prev, z_below, ds, ds_mm, dc_prev, gz_prev, gz_below, seed, slope,
) -> None:  # fmt: skip
    """`ln_grad`, with layer norm: this step's (B, 5H) rows [d gates after their layer norm | d normalized c]
    (see hmlm.fast.kernels.ln_grad_rows)."""
    B, H = tc.shape
    block = _block(H)
    slope, slope_ptr = _slope_arg(slope, pair)
    _launch(_cell_backward, (B,), (
        *_rows(pair, pair), *_rows(g_ext, pair), *_rows(g_z, pair), *_rows(act, pair), *_rows(tc, pair),
        *_rows(c_prev, pair), *_rows(c, pair), *_rows(keep_f, pair), *_rows(neg_d_copy, pair), *_rows(zraw, pair),
        *_rows(zhat, pair),
        *_rows(gates, pair), *_rows(gates_mean, pair), *_rows(gates_rstd, pair), *_rows(cell_mean, pair),
        *_rows(cell_rstd, pair), ln_gain if ln_gain is not None else pair, cell_gain if cell_gain is not None else pair,
        *_rows(ln_grad, pair), *_rows(z_prev, pair), *_rows(z_below, pair), *_rows(ds, pair), *_rows(ds_mm, pair),
        *_rows(dc_prev, pair), *_rows(gz_prev, pair), *_rows(gz_below, pair),
        H, slope,
    ), dict(
        BLOCK=block, BOTTOM=z_below is None, TOP=zraw is None, LN=ln_gain is not None, SEED=bool(seed),
        SLOPE_PTR=slope_ptr, EXT=g_ext is not None, DS_MM=ds_mm is not None,
    ), _warps(block))  # fmt: skip


def route_backward(
    dx, D, pair, z_prev, z_below, pair_next, above_pair, h_above, below_pair, h_below, gz_prev, gz_below, below_dz,
) -> None:  # fmt: skip
    B, H = pair_next.shape[0], pair_next.shape[1] // 2
    A = above_pair.shape[1] // 2 if above_pair is not None else 0
    block = _block(H)
    _launch(_route_backward, (B,), (
        *_rows(dx, dx), D, *_rows(pair, dx), *_rows(z_prev, dx), *_rows(z_below, dx), *_rows(pair_next, dx),
        *_rows(above_pair, dx), *_rows(h_above, dx), *_rows(below_pair, dx), *_rows(h_below, dx),
        *_rows(gz_prev, dx), *_rows(gz_below, dx), *_rows(below_dz, dx), H, A,
    ), dict(
        BLOCK=block, BLOCK_A=_block(A), BLOCK_D=_block(D), BOTTOM=z_below is None, TOP=above_pair is None,
    ), _warps(max(block, _block(A), _block(D))))  # fmt: skip


def self_test(dtype: torch.dtype = torch.float32) -> None:
    """Run each kernel once on a tiny middle layer (layer norm, a layer above and below), so that a Triton that
    cannot compile them for this dtype fails here, where the caller can fall back, rather than inside a step. The
    error names the kernel and keeps the compiler's reason. Its inputs come from a generator of its own: it runs at
    the first step in a dtype, and draws from torch's would move the sample boundaries' draws after a manual_seed."""
    B, H, D, A = 2, 3, 2, 2
    like = {"device": DEVICE, "dtype": dtype}
    generator = torch.Generator(DEVICE).manual_seed(0)
    randn = partial(torch.randn, generator=generator, **like)
    gates, h_prev, c_prev = randn(B, 4 * H), randn(B, H), randn(B, H)
    z_prev, z_below, zhat = torch.ones(B, 1, **like), torch.ones(B, 1, **like), randn(B, 1)
    gain, bias, cell_gain, cell_bias = torch.ones(4 * H, **like), torch.zeros(4 * H, **like), *torch.ones(2, H, **like)
    act, keep_f, c, tc, h, h_up, h_down, neg_dh, neg_dc = (torch.empty(B, n, **like) for n in (4 * H, *[H] * 8))
    zraw, z, cell_mean, cell_rstd = (torch.empty(B, 1, **like) for _ in range(4))
    gates_mean, gates_rstd = torch.empty(B, 4, **like), torch.empty(B, 4, **like)
    with _naming("_cell_forward"):
        cell_forward(
            gates, zhat, None, gain, bias, cell_gain, cell_bias, h_prev, c_prev, z_prev, z_below, act, keep_f, c, tc,
            h, None, h_up, h_down, neg_dh, neg_dc, zraw, z, gates_mean, gates_rstd, cell_mean, cell_rstd,
            ZRAW_MODES["step"], False, 1.0, LN_EPS,
        )  # fmt: skip
    pair, g_ext, neg_d_copy = randn(B, 2 * H), randn(B, H), torch.cat([neg_dh, neg_dc], 1)
    ds, ln_rows, dc_prev = torch.empty(B, 4 * H + 1, **like), torch.empty(B, 5 * H, **like), torch.empty(B, H, **like)
    gz_prev, gz_below, g_z = torch.empty(B, 1, **like), torch.empty(B, 1, **like), randn(B, 1)
    with _naming("_cell_backward"):
        cell_backward(
            pair, g_ext, g_z, act, tc, c_prev, c, keep_f, neg_d_copy, zraw, zhat, gates, gates_mean, gates_rstd,
            cell_mean, cell_rstd, gain, cell_gain, ln_rows, z_prev, z_below, ds, None, dc_prev, gz_prev, gz_below,
            False, 1.0,
        )  # fmt: skip
    dx, pair_next = randn(B, D + H + A), torch.empty(B, 2 * H, **like)
    above_pair, below_pair = torch.zeros(B, 2 * A, **like), torch.zeros(B, 2 * D, **like)
    h_above, h_below, below_dz = randn(B, A), randn(B, D), torch.zeros(B, 1, **like)
    with _naming("_route_backward"):
        route_backward(
            dx, D, pair, z_prev, z_below, pair_next, above_pair, h_above, below_pair, h_below, gz_prev, gz_below,
            below_dz,
        )  # fmt: skip
    if not bool(torch.isfinite(h).all() and torch.isfinite(ds).all() and torch.isfinite(pair_next[:, :H]).all()):
        raise RuntimeError("the Triton kernels ran but gave non-finite values on a finite input")


@contextmanager
def _naming(kernel: str) -> Iterator[None]:
    """An error inside, as one that names the kernel and keeps the compiler's first line of reason."""
    try:
        yield
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower() or "mismatch" in line.lower()), None)
        raise RuntimeError(
            f"kernel {kernel}: {type(error).__name__}: {reason or (lines[-1] if lines else '')}"
        ) from error
