"""What `train.precision` sets besides the dtypes, on CUDA: whether float32 matmuls may use TF32.

    fp32          float32; on CUDA the matmuls (cuBLAS) and cuDNN use TF32 tensor cores (10-bit mantissa
                  products, float32 sums), as cuDNN's LSTM does by default: the same footing for the HM-LSTM
    fp32-strict   float32 with full float32 matmuls on CUDA (TF32 off for cuBLAS and cuDNN): for exact checks
    bf16          bf16 autocast on CUDA (matmuls in bf16; the elementwise work and the state in float32);
                  float32 matmuls that remain use TF32 as under fp32
    fp64          float64 everywhere: slow, for comparisons that must agree to rounding

On the CPU there is no TF32: fp32 and fp32-strict are the same. The setting is process-wide (torch's flags).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PRECISIONS = ("fp32", "fp32-strict", "bf16", "fp64")


def uses_tf32(precision: str, device: torch.device) -> bool:
    """Whether `precision` lets float32 matmuls and cuDNN use TF32 on this device (only CUDA has TF32)."""
    return device.type == "cuda" and precision in ("fp32", "bf16")


def apply_precision(precision: str, device: torch.device) -> Callable[[], None]:
    """Set torch's TF32 flags for `precision` on a CUDA device (nothing to set on the CPU). Returns what puts the
    flags back as they were (for `hmlm bench` and tests; training keeps them for the process)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def restore() -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    if device.type != "cuda":
        return restore
    tf32 = uses_tf32(precision, device)
    torch.backends.cuda.matmul.allow_tf32 = tf32  # the same as torch.set_float32_matmul_precision("high"/"highest")
    torch.backends.cudnn.allow_tf32 = tf32
    return restore
