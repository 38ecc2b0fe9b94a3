"""The fused CPU step: hmlm/csrc/cell_cpu.cpp, compiled with torch's C++ extension builder on first use.

On the CPU most of a small HM-LSTM's step is dispatch: a few dozen elementwise torch ops per layer, each a few
microseconds. The extension does a layer step's elementwise work, forward or backward, in one call; hmlm/fast.py
uses it wherever it can (CPU tensors, float32 or float64) and its own torch ops everywhere else (CUDA, other
dtypes, or when the extension cannot be built here). tests/test_model.py holds both to the reference in float64.

Building needs a C++ compiler (g++) and ninja, and takes about a minute, once: torch caches the build under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and rebuilds only when the source changes. `make
install` builds it. Set HMLM_FUSED=0 to use the torch-op path on the CPU too.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "cell_cpu.cpp"
DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None  # why the build failed, once it has


def wanted() -> bool:
    return os.environ.get("HMLM_FUSED", "1") != "0"


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fast path should call the extension for tensors of this device and dtype (builds it if needed)."""
    return device.type == "cpu" and dtype in DTYPES and wanted() and load() is not None


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension, building it on the first call; None (with one warning) if it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = build(verbose)
            except Exception as error:  # no compiler, no ninja, a compile error: fall back, and say so once
                _failed = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
                warnings.warn(
                    f"hmlm: could not build the fused CPU kernels ({_failed}); using the slower torch-op path. "
                    "Set HMLM_FUSED=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def build(verbose: bool = False) -> ModuleType:
    from torch.utils import cpp_extension  # imported here: it is slow to import and only needed to build

    # pip's ninja lives next to this interpreter, which need not be on PATH (.venv/bin/hmlm without activation).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # AVX2 and FMA where torch itself runs its AVX2 kernels (~20% off the kernels' time); the name carries the
    # instruction set, so that a home folder shared by different machines never loads a build its CPU lacks.
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
    return cpp_extension.load(
        name=f"hmlm_cell_cpu_{capability.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        verbose=verbose,
    )


def failure() -> str | None:
    """Why the extension could not be built, or None."""
    return _failed


if __name__ == "__main__":  # `python -m hmlm.fused`: build now (make install does), rather than on first use
    module = load(verbose="-v" in sys.argv)
    print(f"hmlm: fused CPU kernels {'ready: ' + str(module.__file__) if module else 'not built: ' + str(failure())}")
