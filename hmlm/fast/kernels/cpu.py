"""The "cpu" backend: csrc/cell_cpu.cpp, compiled with torch's C++ extension builder on first use.

On the CPU, without it, most of a small HM-LSTM's step is dispatch: a few dozen elementwise torch ops per
layer, each a few microseconds. The extension does a layer step's elementwise work, forward or backward, in one
call (the three functions of hmlm.fast.kernels.FusedKernels); hmlm/fast/kernels/__init__.py chooses it for float32 and
float64 CPU tensors unless told otherwise, and the torch-op backend wherever it cannot be built.
tests/test_model.py holds both to the reference in float64.

Building needs a C++ compiler (g++) and ninja, and takes about a minute, once per source, torch and Python
version: the build lives under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). `make install`
builds it (`python -m hmlm.fast.kernels.cpu`). HMLM_KERNELS=torch (or the older HMLM_FUSED=0) uses the torch-op
path on the CPU instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "cell_cpu.cpp"

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None  # why the build failed, once it has


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
                _failed = summarize(error)
                warnings.warn(
                    f"hmlm: could not build the fused CPU kernels ({_failed}); using the slower torch-op path. "
                    "Set HMLM_KERNELS=torch to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def summarize(error: Exception) -> str:
    """One line for a failed build: the compiler's first error if it printed one, else the exception's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first_error = next((line for line in lines if "error:" in line), None)
    return f"{type(error).__name__}: {first_error or (lines[-1] if lines else '')}"


def build(verbose: bool = False) -> ModuleType:
    """Import the extension built for this source, torch, Python and CPU, or build it first.

    Each build has a folder of its own, named by a hash of all that, so that a changed source or a new torch is
    a new build, and a built one is imported straight from its folder: asking torch's builder to check that it
    is up to date costs ~2 s at every start (it imports setuptools and runs ninja).
    """
    # AVX2 and FMA where torch itself runs its AVX2 kernels (~20% off the kernels' time).
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    flags = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
    stamp = repr((torch.__version__, sys.version_info[:2], flags)).encode()
    name = f"hmlm_cell_cpu_{capability.lower()}_{hashlib.sha256(SOURCE.read_bytes() + stamp).hexdigest()[:12]}"
    default_root = Path.home() / ".cache" / "torch_extensions"
    directory = Path(os.environ.get("TORCH_EXTENSIONS_DIR", default_root)) / name
    library = directory / f"{name}.so"
    if library.exists() and not (directory / "lock").exists():  # "lock": torch's builder is at work there
        try:
            return import_library(name, library)
        except ImportError:
            pass  # a half-written or foreign file: build it again

    from torch.utils import cpp_extension  # imported here: slow to import, and only needed to build

    # pip's ninja lives next to this interpreter, which need not be on PATH (.venv/bin/hmlm without activation).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if not verbose:
        print("hmlm: compiling the fused CPU kernels (once; about a minute)...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(SOURCE)], extra_cflags=flags, build_directory=str(directory), verbose=verbose
    )


def import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failure() -> str | None:
    """Why the extension could not be built, or None."""
    return _failed


def compiler() -> str | None:
    """The C++ compiler torch's builder calls (CXX, else c++), where it is installed; None where it is not, the one
    place the build is expected to fail."""
    from torch.utils import cpp_extension

    return shutil.which(cpp_extension.get_cxx_compiler())


def main(argv: list[str]) -> int:
    """`python -m hmlm.fast.kernels.cpu [-v]`: build now (make install does), rather than on first use. Exit status 1
    where the build fails, so that an install notices: the package still works, on the slower torch-op path."""
    module = load(verbose="-v" in argv)
    if module is not None:
        print(f"hmlm: fused CPU kernels ready: {module.__file__}")
        return 0
    missing = "" if compiler() else " (no C++ compiler found: install g++, or name one in CXX)"
    print(f"hmlm: fused CPU kernels not built{missing}: {failure()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
