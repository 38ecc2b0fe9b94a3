"""The elementwise work of one HM-LSTM layer step, forward and backward, per backend, behind one interface.

hmlm/fast/ runs the matmuls (torch: the CPU's BLAS or cuBLAS) and hands everything between them to one of
three backends, side by side (the arithmetic is explained once, in hmlm/fast/'s docstring):

    torch    torch_ops.py      plain torch ops; any device and dtype. The fallback, and the readable one: a few
                               dozen ops per layer step, each paying dispatch.
    cpu      cpu.py            csrc/cell_cpu.cpp, a C++ extension built on first use: float32/float64 on the CPU.
    triton   triton.py         Triton kernels: float32/float64 on CUDA. Without CUDA they run on the CPU
                               through Triton's interpreter (TRITON_INTERPRET=1), slowly: that is for tests.

All three implement the three functions of `FusedKernels`, with the same arguments: one call per layer step
forward, two backward (around the matmul that takes the step's gradient back to its inputs). hmlm/fast/ calls
every backend the same way, through `load`; none of them knows the fast path's tapes.

Which one runs, per call, from the tensors' device and dtype (`select`), is set by HMLM_KERNELS:
    auto (default)   Triton for CUDA tensors, C++ for CPU tensors, torch ops where those cannot serve
    triton | cpu     that backend where it can serve these tensors, else torch ops
    torch            torch ops everywhere
HMLM_FUSED=0, the older switch, means HMLM_KERNELS=torch when HMLM_KERNELS is unset. A fused backend that
cannot be built or loaded here (no compiler, no triton, a Triton that cannot compile the kernels) says why
once, in a warning, and the torch ops run instead. `describe` says in words what runs and why.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType

import torch

from hmlm.errors import UserError
from hmlm.fast.kernels.protocol import DTYPES, LN_EPS, ZRAW_MODES, FusedKernels, LayerNormParams, ln_grad_rows

__all__ = [
    "DTYPES",
    "LN_EPS",
    "ZRAW_MODES",
    "FusedKernels",
    "LayerNormParams",
    "ln_grad_rows",
    "load",
    "select",
    "describe",
]

BACKENDS = ("triton", "cpu", "torch")

# HMLM_KERNELS=triton without CUDA: the kernels run through Triton's interpreter, which must be on before anyone
# imports triton (torch may, for its optimizers), so before hmlm does anything else (see triton.py's docstring).
if os.environ.get("HMLM_KERNELS", "").strip().lower() == "triton" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def requested() -> str:
    """HMLM_KERNELS, checked: auto, triton, cpu or torch (HMLM_FUSED=0 alone means torch)."""
    value = os.environ.get("HMLM_KERNELS", "").strip().lower() or "auto"
    if value not in ("auto", *BACKENDS):
        raise UserError(f"HMLM_KERNELS={value!r} is not a kernel backend: use auto, triton, cpu or torch")
    if value == "auto" and os.environ.get("HMLM_FUSED", "1") == "0":
        return "torch"
    return value


def select(device: torch.device, dtype: torch.dtype, mm_dtype: torch.dtype | None = None) -> str:
    """The backend the fast path runs on for tensors of this device and dtype (and matmuls in mm_dtype, the autocast
    dtype, by default the same): triton, cpu or torch."""
    return choose(device, dtype, mm_dtype)[0]


def choose(device: torch.device, dtype: torch.dtype, mm_dtype: torch.dtype | None = None) -> tuple[str, str]:
    """The backend, and why the torch ops when it comes to that (else "")."""
    want = requested()
    if want == "torch":
        explicit = os.environ.get("HMLM_KERNELS", "").strip().lower() == "torch"
        return "torch", "HMLM_KERNELS=torch" if explicit else "HMLM_FUSED=0"
    if dtype not in DTYPES:
        return "torch", f"the fused kernels are for float32/float64, not {dtype}"
    if want == "auto":
        want = "triton" if device.type == "cuda" else "cpu"
    if want == "cpu":
        from hmlm.fast.kernels import cpu

        if device.type != "cpu":
            return "torch", f"the C++ kernels are for the CPU, not {device.type}"
        if mm_dtype not in (None, dtype):  # they write the matmuls' inputs, in the state's dtype only
            return "torch", f"the C++ kernels take matmuls in the state's dtype, not {mm_dtype} (autocast)"
        if cpu.load() is None:
            return "torch", f"the C++ kernels could not be built: {cpu.failure()}"
        return "cpu", ""
    module, why = load_triton(dtype)
    if module is None:
        return "torch", f"the Triton kernels are not available: {why}"
    if device.type != module.DEVICE:
        return "torch", f"the Triton kernels run on {module.DEVICE} in this process ({module.MODE}), not {device.type}"
    return "triton", ""


def load(backend: str) -> FusedKernels:
    """The kernels of a backend that `select` chose (so known to load); a fused one's watched while `observing`.
    The torch ops never are: each of their ops is dispatched, and seen, as any other torch op."""
    if backend == "torch":
        from hmlm.fast.kernels import torch_ops  # (not at the top: torch_ops imports this module)

        return torch_ops
    if backend == "cpu":
        from hmlm.fast.kernels import cpu

        module = cpu.load()
    else:
        module = _triton
    if module is None:
        raise RuntimeError(f"the {backend} kernels were chosen but are not loaded")  # select() said they were
    return module if _observer is None else Observed(module, backend, _observer)


# Called as observer(backend, function name) around each call of a fused backend's function; what it returns is
# the context the call runs in. hmlm/bench/launches.py counts the calls (one kernel launch each) this way.
Observer = Callable[[str, str], AbstractContextManager]
_observer: Observer | None = None


@contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Within, every call of a fused backend's functions goes through `observer` (one observer at a time)."""
    global _observer
    if _observer is not None:
        raise RuntimeError("the fused kernels are already being observed")
    _observer = observer
    try:
        yield
    finally:
        _observer = None


class Observed:
    """A fused backend whose calls go through an observer."""

    def __init__(self, module: FusedKernels, backend: str, observer: Observer):
        self.module, self.backend, self.observer = module, backend, observer

    def _call(self, name: str, *args) -> None:
        with self.observer(self.backend, name):
            getattr(self.module, name)(*args)

    def cell_forward(self, *args) -> None:
        self._call("cell_forward", *args)

    def cell_backward(self, *args) -> None:
        self._call("cell_backward", *args)

    def route_backward(self, *args) -> None:
        self._call("route_backward", *args)


_triton: ModuleType | None = None
_triton_failed: str | None = None
_triton_dtypes: dict[torch.dtype, str] = {}  # per dtype tried: "" where the kernels ran, else why not
_triton_lock = threading.Lock()


def load_triton(dtype: torch.dtype = torch.float32) -> tuple[ModuleType | None, str]:
    """hmlm.fast.kernels.triton, imported on first use, its kernels tried once per dtype (they are compiled per
    dtype: a GPU may run float32 and fail float64); None and why where that fails, said once in a warning."""
    global _triton, _triton_failed
    if dtype not in _triton_dtypes and _triton_failed is None:
        with _triton_lock:
            if _triton is None and _triton_failed is None:
                try:
                    from hmlm.fast.kernels import triton as module  # sets TRITON_INTERPRET=1 first without CUDA

                    _triton = module
                except Exception as error:  # not installed, an installation that does not import, or too late
                    _triton_failed = _warn_triton(error)
            if _triton is not None and dtype not in _triton_dtypes:
                try:
                    _triton.self_test(dtype)
                    _triton_dtypes[dtype] = ""
                except Exception as error:  # no C compiler for its launcher, a GPU or dtype it cannot compile for
                    _triton_dtypes[dtype] = _warn_triton(error, f" in {str(dtype).removeprefix('torch.')}")
    if _triton is None:
        return None, _triton_failed or ""
    why = _triton_dtypes[dtype]
    return (None, why) if why else (_triton, "")


def _warn_triton(error: Exception, where: str = "") -> str:
    import warnings

    from hmlm.fast.kernels.cpu import summarize

    why = summarize(error)
    warnings.warn(
        f"hmlm: the Triton kernels cannot run here{where} ({why}); using the slower torch-op path. "
        "Set HMLM_KERNELS=torch to skip the attempt.",
        RuntimeWarning,
        stacklevel=5,
    )
    return why


def describe(device: torch.device, dtype: torch.dtype, mm_dtype: torch.dtype | None = None) -> str:
    """What the fast path runs its elementwise work on for this device and dtype, and why, in words."""
    backend, why = choose(device, dtype, mm_dtype)
    if backend == "cpu":
        return "fused CPU kernels (C++)"
    if backend == "triton":
        return f"Triton kernels ({load_triton(dtype)[0].MODE})"
    return f"torch ops ({why})"
