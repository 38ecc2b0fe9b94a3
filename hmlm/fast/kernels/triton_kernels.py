"""The Triton kernels of the "triton" backend (triton.py launches them): a layer step's elementwise work, the CUDA
counterpart of csrc/cell_cpu.cpp, with the same three functions and arguments (hmlm.fast.kernels.FusedKernels) and
the same arithmetic (explained in hmlm/fast/'s docstring). One program per batch row, the whole row (every gate block
of width H) in registers: one launch per layer step forward (the four gate layer norms, the activations, the
FLUSH/UPDATE/COPY blend, the cell layer norm, tanh, the boundary), two backward (`cell_backward` before the
step's matmul, `route_backward` after). The matmuls stay in torch (cuBLAS).

Where there is no CUDA, the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), one
program at a time in NumPy: slow, but exact enough for the tests to hold them to the reference in float64. Triton
decides whether it interprets when a function is defined with triton.jit, its own library's (tl.sum) when
triton is imported, and torch may import triton first (torch._dynamo does, under the optimizers). So
TRITON_INTERPRET=1 is set when hmlm.fast.kernels is imported (by hmlm's model, so by every command) with
HMLM_KERNELS=triton and no CUDA, again here before triton is imported (for a process that chose the backend
later), and if triton was imported earlier without it, importing this module fails with a message that says so.
In one process the kernels run either compiled, for CUDA tensors, or interpreted, for CPU tensors (`DEVICE`).

Differences from the C++ kernels, both for the sake of determinism on a GPU: the layer norm parameters'
gradients are not summed here over rows (that would take atomic adds, whose order changes from run to run) but
written per row for the sums after the loop (hmlm.fast.kernels.ln_grad_rows); and the statistics of a row are summed
in the order Triton's tree reduction takes. The slope comes either as a 0-dim tensor on the device (the CUDA graph
step's, hmlm/training/cuda_graph.py), read by the kernels through its pointer in the compute dtype, so a captured graph
sees each new slope and nothing waits for the host; or as a number. A Python float reaches a Triton kernel as a float32
scalar (compiled and interpreted alike), which is exact for float32 work (and is how `eps` goes); in float64 work
a numeric slope goes by pointer too (`_slope_arg`), so float64 results do not depend on how the slope was given.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: see the docstring

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
if INTERPRETED:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.sum, InterpretedFunction):
        raise ImportError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run the kernels: "
            "set TRITON_INTERPRET=1 (or HMLM_KERNELS=triton) in the environment before Python starts"
        )
DEVICE = "cpu" if INTERPRETED else "cuda"  # the tensors the kernels run on in this process
MODE = "interpreted on the CPU: TRITON_INTERPRET=1" if INTERPRETED else "compiled for CUDA"


# --- Helpers inside the kernels --------------------------------------------------------------------------------


def device_function(fn):
    """triton.jit, for a function the kernels call. Interpreted, the function is left plain: the interpreter
    would patch triton.language anew at every call of a jit function (milliseconds each, most of the tests'
    time), and a plain call inside a kernel runs under the kernel's own patching, with the same result."""
    return fn if INTERPRETED else triton.jit(fn)


@device_function
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@device_function
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0  # as the C++ kernels compute it


@device_function
def _slope(slope, like, SLOPE_PTR: tl.constexpr):
    """The slope in the dtype of `like`: read from the device (a 1-element tensor: a captured CUDA graph's, which
    a new slope updates without a new graph), or the number Triton passed. One return: Triton's compiler types a
    function's returns together, even across a constexpr branch, and a pointer is not a float."""
    if SLOPE_PTR:
        value = tl.load(slope).to(like.dtype)
    else:
        value = slope
    return value


@device_function
def _to(x, ptr):
    """x in the element type of ptr. To bfloat16 (the matmuls' under autocast) rounded to the nearest, ties to even,
    as torch casts, in integer arithmetic: compiled, Triton's own cast rounds so too, but its interpreter truncates
    (which the tests would see as a different bf16 input, one ulp off, in half the elements). One return: see
    _slope."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        value = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        value = x.to(ptr.dtype.element_ty)
    return value


@device_function
def _normalize(x, mask, n, eps):
    """(x - mean) * rstd over the n unmasked lanes (zero on the others), the mean, and rstd (biased variance)."""
    mean = tl.sum(tl.where(mask, x, 0.0), axis=0) / n
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n + eps)
    return centered * rstd, mean, rstd


@device_function
def _normalize_backward(dy, x, gain, mask, n, mean, rstd):
    """Layer norm's backward for one row: d x from dy, the gradient of gain * xhat + bias."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dn = tl.where(mask, dy * gain, 0.0)
    a = tl.sum(dn, axis=0) / n
    b = tl.sum(dn * xhat, axis=0) / n
    return tl.where(mask, rstd * (dn - a - xhat * b), 0.0)


# --- The kernels -----------------------------------------------------------------------------------------------
# Each takes every tensor as a pointer and its row stride (s_*); an absent one comes as some other tensor and is
# never touched (the flags BOTTOM, TOP, LN, ... say which are there).


@triton.jit
def _cell_forward(
    gates, s_gates, zhat, s_zhat, addend, s_addend, ln_gain, ln_bias, cell_gain, cell_bias,
    h_prev, s_h_prev, c_prev, s_c_prev, z_prev, s_z_prev, z_below, s_z_below,
    act, s_act, keep_f, s_keep_f, c, s_c, tc, s_tc, h, s_h, h_rec, s_h_rec, h_up, s_h_up, h_down, s_h_down,
    neg_dh, s_neg_dh, neg_dc, s_neg_dc, zraw, s_zraw, z, s_z,
    gates_mean, s_gates_mean, gates_rstd, s_gates_rstd, cell_mean, s_cell_mean, cell_rstd, s_cell_rstd,
    H, slope, eps,
    BLOCK: tl.constexpr, BOTTOM: tl.constexpr, TOP: tl.constexpr, LN: tl.constexpr, STATS: tl.constexpr,
    SAVE_COPY: tl.constexpr, ZRAW_MODE: tl.constexpr, SEED: tl.constexpr, SLOPE_PTR: tl.constexpr,
    ADDEND: tl.constexpr, H_REC: tl.constexpr, H_UP: tl.constexpr, H_DOWN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: B * stride can pass 2**31
    k = tl.arange(0, BLOCK)
    mask = k < H

    # Gates: sigm(f), sigm(i), sigm(o), tanh(g), each block layer-normalized on its own first. With an addend (the
    # step's matmul product, in the matmul's dtype) the pre-activations are gates + addend, written back for the
    # backward (which reads them under layer norm).
    row = gates + b * s_gates
    xf = tl.load(row + k, mask=mask, other=0.0)
    xi = tl.load(row + H + k, mask=mask, other=0.0)
    xo = tl.load(row + 2 * H + k, mask=mask, other=0.0)
    xg = tl.load(row + 3 * H + k, mask=mask, other=0.0)
    if ADDEND:
        product = addend + b * s_addend
        xf += tl.load(product + k, mask=mask, other=0.0).to(xf.dtype)
        xi += tl.load(product + H + k, mask=mask, other=0.0).to(xf.dtype)
        xo += tl.load(product + 2 * H + k, mask=mask, other=0.0).to(xf.dtype)
        xg += tl.load(product + 3 * H + k, mask=mask, other=0.0).to(xf.dtype)
        tl.store(row + k, xf, mask=mask)
        tl.store(row + H + k, xi, mask=mask)
        tl.store(row + 2 * H + k, xo, mask=mask)
        tl.store(row + 3 * H + k, xg, mask=mask)
    if LN:
        nf, mean_f, rstd_f = _normalize(xf, mask, H, eps)
        ni, mean_i, rstd_i = _normalize(xi, mask, H, eps)
        no, mean_o, rstd_o = _normalize(xo, mask, H, eps)
        ng, mean_g, rstd_g = _normalize(xg, mask, H, eps)
        xf = nf * tl.load(ln_gain + k, mask=mask, other=0.0) + tl.load(ln_bias + k, mask=mask, other=0.0)
        xi = ni * tl.load(ln_gain + H + k, mask=mask, other=0.0) + tl.load(ln_bias + H + k, mask=mask, other=0.0)
        xo = no * tl.load(ln_gain + 2 * H + k, mask=mask, other=0.0) + tl.load(ln_bias + 2 * H + k, mask=mask)
        xg = ng * tl.load(ln_gain + 3 * H + k, mask=mask, other=0.0) + tl.load(ln_bias + 3 * H + k, mask=mask)
        if STATS:
            mean_row, rstd_row = gates_mean + b * s_gates_mean, gates_rstd + b * s_gates_rstd
            tl.store(mean_row, mean_f)
            tl.store(mean_row + 1, mean_i)
            tl.store(mean_row + 2, mean_o)
            tl.store(mean_row + 3, mean_g)
            tl.store(rstd_row, rstd_f)
            tl.store(rstd_row + 1, rstd_i)
            tl.store(rstd_row + 2, rstd_o)
            tl.store(rstd_row + 3, rstd_g)
    f = _sigmoid(xf)
    i = _sigmoid(xi)
    o = _sigmoid(xo)
    g = _tanh(xg)
    row = act + b * s_act
    tl.store(row + k, f, mask=mask)
    tl.store(row + H + k, i, mask=mask)
    tl.store(row + 2 * H + k, o, mask=mask)
    tl.store(row + 3 * H + k, g, mask=mask)

    # c = keep*i*g + (copy + update*f)*c_prev: exactly c_prev on a COPY (keep = 0, copy = 1)
    zp = tl.load(z_prev + b * s_z_prev)
    cp = tl.load(c_prev + b * s_c_prev + k, mask=mask, other=0.0)
    ig = i * g
    if BOTTOM:  # z_below = 1: no COPY, keep = 1
        kf = f - f * zp
        cn = ig + kf * cp
        copy = 0.0
        keep = 1.0
    else:
        zb = tl.load(z_below + b * s_z_below)
        update = zb - zp * zb
        keep = zp + update
        copy = 1.0 - keep
        kf = copy + f * update
        cn = ig * keep + kf * cp
        if SAVE_COPY:
            tl.store(neg_dc + b * s_neg_dc + k, ig - cp, mask=mask)
    tl.store(keep_f + b * s_keep_f + k, kf, mask=mask)
    tl.store(c + b * s_c + k, cn, mask=mask)

    # h = lerp(o*tanh(c), h_prev, copy), lerp written as torch writes it, so that it is exact at 0 and 1.
    if LN:
        nc, mean_c, rstd_c = _normalize(cn, mask, H, eps)
        cn = nc * tl.load(cell_gain + k, mask=mask, other=0.0) + tl.load(cell_bias + k, mask=mask, other=0.0)
        if STATS:
            tl.store(cell_mean + b * s_cell_mean, mean_c)
            tl.store(cell_rstd + b * s_cell_rstd, rstd_c)
    t = _tanh(cn)
    tl.store(tc + b * s_tc + k, t, mask=mask)
    otc = o * t
    hp = tl.load(h_prev + b * s_h_prev + k, mask=mask, other=0.0)
    if SAVE_COPY:
        tl.store(neg_dh + b * s_neg_dh + k, otc - hp, mask=mask)
    if BOTTOM:
        hv = otc
    else:
        hv = tl.where(copy < 0.5, otc + copy * (hp - otc), hp - (hp - otc) * (1.0 - copy))
    tl.store(h + b * s_h + k, hv, mask=mask)
    # h where the next matmuls read it, in their dtype: this layer's own next input (where h does not live there),
    # and the layer below's next top-down input z_below * h (the z_below of this step is that layer's z_t).
    if H_REC:
        tl.store(h_rec + b * s_h_rec + k, _to(hv, h_rec), mask=mask)
    if H_DOWN:
        tl.store(h_down + b * s_h_down + k, _to(hv * zb, h_down), mask=mask)

    # The boundary: z = keep*zraw, zraw = 1[zhat > 0] (whatever the slope), hard_sigmoid(zhat), or given: ZRAW_MODE
    # 0, 1 or 2 (hmlm.fast.kernels.ZRAW_MODES). It can only open on a step that computed something; the seed's cell
    # (SEED, set for the layers between the bottom and the top only) opens it on a COPY too: z = zraw.
    if not TOP:
        zh = tl.load(zhat + b * s_zhat)
        if ADDEND:
            zh += tl.load(addend + b * s_addend + 4 * H).to(zh.dtype)
            tl.store(zhat + b * s_zhat, zh)
        if ZRAW_MODE == 0:
            zr = tl.where(zh > 0.0, 1.0, 0.0)
        elif ZRAW_MODE == 1:
            a = _slope(slope, zh, SLOPE_PTR)
            zr = tl.minimum(tl.maximum((a * zh + 1.0) / 2.0, 0.0), 1.0)
        else:
            zr = tl.load(zraw + b * s_zraw)
        if ZRAW_MODE != 2:
            tl.store(zraw + b * s_zraw, zr)
        if SEED:
            z_new = zr
        else:
            z_new = keep * zr
        tl.store(z + b * s_z, z_new)
        if H_UP:  # the layer above's next bottom-up input, z * h
            tl.store(h_up + b * s_h_up + k, _to(hv * z_new, h_up), mask=mask)


@triton.jit
def _cell_backward(
    pair, s_pair, g_ext, s_g_ext, g_z, s_g_z, act, s_act, tc, s_tc, c_prev, s_c_prev, c, s_c, keep_f, s_keep_f,
    neg_d_copy, s_neg_d_copy, zraw, s_zraw, zhat, s_zhat, gates, s_gates,
    gates_mean, s_gates_mean, gates_rstd, s_gates_rstd, cell_mean, s_cell_mean, cell_rstd, s_cell_rstd,
    ln_gain, cell_gain, ln_rows, s_ln_rows, z_prev, s_z_prev, z_below, s_z_below,
    ds, s_ds, ds_mm, s_ds_mm, dc_prev, s_dc_prev, gz_prev, s_gz_prev, gz_below, s_gz_below,
    H, slope,
    BLOCK: tl.constexpr, BOTTOM: tl.constexpr, TOP: tl.constexpr, LN: tl.constexpr, SEED: tl.constexpr,
    SLOPE_PTR: tl.constexpr, EXT: tl.constexpr, DS_MM: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < H

    zp = tl.load(z_prev + b * s_z_prev)
    if BOTTOM:
        zb = 1.0
        update = 1.0 - zp
        keep = 1.0
    else:
        zb = tl.load(z_below + b * s_z_below)
        update = zb - zp * zb
        keep = zp + update
    g_h = tl.load(pair + b * s_pair + k, mask=mask, other=0.0)
    if EXT:  # the loss's own gradient of h_t, added here and written back: route_backward reads the sum
        g_h += tl.load(g_ext + b * s_g_ext + k, mask=mask, other=0.0)
        tl.store(pair + b * s_pair + k, g_h, mask=mask)
    g_c = tl.load(pair + b * s_pair + H + k, mask=mask, other=0.0)
    row = act + b * s_act
    f = tl.load(row + k, mask=mask, other=0.0)
    i = tl.load(row + H + k, mask=mask, other=0.0)
    o = tl.load(row + 2 * H + k, mask=mask, other=0.0)
    g = tl.load(row + 3 * H + k, mask=mask, other=0.0)
    t = tl.load(tc + b * s_tc + k, mask=mask, other=0.0)
    cp = tl.load(c_prev + b * s_c_prev + k, mask=mask, other=0.0)

    # h = lerp(o*tanh(cn), h_prev, copy): into o, and into c through tanh (and the cell's layer norm).
    g_otc = g_h * keep
    d_o = g_otc * t
    d_cn = g_otc * o * (1.0 - t * t)
    if LN:
        tl.store(ln_rows + b * s_ln_rows + 4 * H + k, d_cn, mask=mask)
        cv = tl.load(c + b * s_c + k, mask=mask, other=0.0)
        gain = tl.load(cell_gain + k, mask=mask, other=0.0)
        mean_c, rstd_c = tl.load(cell_mean + b * s_cell_mean), tl.load(cell_rstd + b * s_cell_rstd)
        g_c += _normalize_backward(d_cn, cv, gain, mask, H, mean_c, rstd_c)
    else:
        g_c += d_cn
    # c = keep*i*g + (copy + update*f)*c_prev; g_c is now the whole d loss / d c_t.
    g_ig = g_c * keep
    di = g_ig * g
    dg = g_ig * i
    df = g_c * cp * update
    tl.store(dc_prev + b * s_dc_prev + k, g_c * tl.load(keep_f + b * s_keep_f + k, mask=mask), mask=mask)
    g_update = tl.sum(g_c * cp * f, axis=0)  # masked lanes are 0
    # Through the nonlinearities (and the gates' layer norm) into the pre-activations.
    df = df * f * (1.0 - f)
    di = di * i * (1.0 - i)
    d_o = d_o * o * (1.0 - o)
    dg = dg * (1.0 - g * g)
    out = ds + b * s_ds
    if LN:
        rows = ln_rows + b * s_ln_rows
        tl.store(rows + k, df, mask=mask)
        tl.store(rows + H + k, di, mask=mask)
        tl.store(rows + 2 * H + k, d_o, mask=mask)
        tl.store(rows + 3 * H + k, dg, mask=mask)
        grow, mean_row, rstd_row = gates + b * s_gates, gates_mean + b * s_gates_mean, gates_rstd + b * s_gates_rstd
        xs = tl.load(grow + k, mask=mask, other=0.0)
        gain = tl.load(ln_gain + k, mask=mask, other=0.0)
        df = _normalize_backward(df, xs, gain, mask, H, tl.load(mean_row), tl.load(rstd_row))
        xs = tl.load(grow + H + k, mask=mask, other=0.0)
        gain = tl.load(ln_gain + H + k, mask=mask, other=0.0)
        di = _normalize_backward(di, xs, gain, mask, H, tl.load(mean_row + 1), tl.load(rstd_row + 1))
        xs = tl.load(grow + 2 * H + k, mask=mask, other=0.0)
        gain = tl.load(ln_gain + 2 * H + k, mask=mask, other=0.0)
        d_o = _normalize_backward(d_o, xs, gain, mask, H, tl.load(mean_row + 2), tl.load(rstd_row + 2))
        xs = tl.load(grow + 3 * H + k, mask=mask, other=0.0)
        gain = tl.load(ln_gain + 3 * H + k, mask=mask, other=0.0)
        dg = _normalize_backward(dg, xs, gain, mask, H, tl.load(mean_row + 3), tl.load(rstd_row + 3))
    tl.store(out + k, df, mask=mask)
    tl.store(out + H + k, di, mask=mask)
    tl.store(out + 2 * H + k, d_o, mask=mask)
    tl.store(out + 3 * H + k, dg, mask=mask)
    if DS_MM:  # ds again, in the dtype of the matmul that takes it back to the step's inputs
        out_mm = ds_mm + b * s_ds_mm
        tl.store(out_mm + k, _to(df, ds_mm), mask=mask)
        tl.store(out_mm + H + k, _to(di, ds_mm), mask=mask)
        tl.store(out_mm + 2 * H + k, _to(d_o, ds_mm), mask=mask)
        tl.store(out_mm + 3 * H + k, _to(dg, ds_mm), mask=mask)

    # Into the choice of operation (z_prev, z_below), and through z = keep*zraw into zhat (straight-through: the
    # hard sigmoid's derivative as torch.clamp defines it, the bounds counting as inside). The seed's cell (SEED)
    # chooses as tf.where does, passing no gradient (route_backward adds the masks' shares), and its z is zraw.
    if SEED:
        tl.store(gz_prev + b * s_gz_prev, 0.0)
        if not BOTTOM:
            tl.store(gz_below + b * s_gz_below, 0.0)
    elif BOTTOM:
        tl.store(gz_prev + b * s_gz_prev, -g_update)
    else:
        ndh = tl.load(neg_d_copy + b * s_neg_d_copy + k, mask=mask, other=0.0)
        ndc = tl.load(neg_d_copy + b * s_neg_d_copy + H + k, mask=mask, other=0.0)
        neg_g_copy = tl.sum(g_h * ndh + g_c * ndc, axis=0)
        if not TOP:
            neg_g_copy += tl.load(g_z + b * s_g_z) * tl.load(zraw + b * s_zraw)
        diff = g_update + neg_g_copy
        tl.store(gz_prev + b * s_gz_prev, neg_g_copy - zb * diff)
        tl.store(gz_below + b * s_gz_below, (1.0 - zp) * diff)
    if not TOP:
        zh = tl.load(zhat + b * s_zhat)
        a = _slope(slope, zh, SLOPE_PTR)
        y = (a * zh + 1.0) / 2.0
        st = tl.where((y >= 0.0) & (y <= 1.0), a / 2.0, 0.0)
        if SEED:
            d_zhat = tl.load(g_z + b * s_g_z) * st
        else:
            d_zhat = tl.load(g_z + b * s_g_z) * keep * st
        tl.store(out + 4 * H, d_zhat)
        if DS_MM:
            tl.store(ds_mm + b * s_ds_mm + 4 * H, _to(d_zhat, ds_mm))


@triton.jit
def _route_backward(
    dx, s_dx, D, pair, s_pair, z_prev, s_z_prev, z_below, s_z_below, pair_next, s_pair_next,
    above_pair, s_above_pair, h_above, s_h_above, below_pair, s_below_pair, h_below, s_h_below,
    gz_prev, s_gz_prev, gz_below, s_gz_below, below_dz, s_below_dz, H, A,
    BLOCK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BOTTOM: tl.constexpr, TOP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < H
    zp = tl.load(z_prev + b * s_z_prev)
    row = dx + b * s_dx  # in the matmul's dtype; the sums are made in the state's
    # d h_{t-1}: the recurrent matmul, and COPY's pass-through.
    d_rec = tl.load(row + D + k, mask=mask, other=0.0).to(zp.dtype)
    if BOTTOM:
        tl.store(pair_next + b * s_pair_next + k, d_rec, mask=mask)
    else:
        zb = tl.load(z_below + b * s_z_below)
        copy = 1.0 - (zp + (zb - zp * zb))
        g_h = tl.load(pair + b * s_pair + k, mask=mask, other=0.0)
        tl.store(pair_next + b * s_pair_next + k, d_rec + g_h * copy, mask=mask)
    if not TOP:  # into layer l+1's h_{t-1} (masked by z_prev) and into z_prev
        ka = tl.arange(0, BLOCK_A)
        mask_a = ka < A
        d_above = tl.load(row + D + H + ka, mask=mask_a, other=0.0).to(zp.dtype)
        target = above_pair + b * s_above_pair + ka
        tl.store(target, tl.load(target, mask=mask_a) + d_above * zp, mask=mask_a)
        h_a = tl.load(h_above + b * s_h_above + ka, mask=mask_a, other=0.0)
        target = gz_prev + b * s_gz_prev
        tl.store(target, tl.load(target) + tl.sum(d_above * h_a, axis=0))
    if not BOTTOM:  # into layer l-1's h_t (masked by z_below) and its z_t
        kd = tl.arange(0, BLOCK_D)
        mask_d = kd < D
        d_below = tl.load(row + kd, mask=mask_d, other=0.0).to(zp.dtype)
        target = below_pair + b * s_below_pair + kd
        tl.store(target, tl.load(target, mask=mask_d) + d_below * zb, mask=mask_d)
        h_b = tl.load(h_below + b * s_h_below + kd, mask=mask_d, other=0.0)
        target = below_dz + b * s_below_dz
        tl.store(target, tl.load(target) + tl.load(gz_below + b * s_gz_below) + tl.sum(d_below * h_b, axis=0))
