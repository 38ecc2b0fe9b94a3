"""Kernel launches counted without a GPU: what a piece of code would launch on CUDA, by dispatch counting.

On CUDA the torch profiler sees the launches themselves (`count_launches`, at the end). On the CPU it
sees only operators, nested ones included, which is not the same number. This module counts what a CUDA run would
launch from the same code: every aten operator that reaches the backend and writes a result (one kernel each on
CUDA), leaving out those that only make a view or allocate; plus one launch per call of a fused kernel backend
(hmlm/fast/kernels: the Triton kernels launch one kernel per call, by design). The count does not depend on the sizes,
so a small model gives the figure of a large one.

What it cannot see: a library call that launches several kernels (cuBLAS may split a matmul; a reduction may take
two passes), and the launches inside torch's own fused CUDA code (Adam's foreach kernels launch one per chunk of
tensors). On a GPU the profiler's count is the one that is measured; this one is for the CPU, and for tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hmlm.fast import kernels

# Operators that make no kernel: allocation, and the host's reading of a value (a copy to the host, not a launch).
NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::resize_",
    "aten::_local_scalar_dense",
    "aten::lift_fresh",
    "aten::is_nonzero",
    "aten::set_",
}


def launches_a_kernel(func: torch._ops.OpOverload) -> bool:
    """Whether an aten operator, reaching the backend, launches a kernel on CUDA: not a view (every result aliases
    an input without writing it), not an allocation."""
    schema = func._schema
    if schema.name in NO_KERNEL:
        return False
    returns = schema.returns
    views = returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return not views


class LaunchCounter(TorchDispatchMode):
    """Counts, per operator, the aten operators that launch a kernel (`launches_a_kernel`), and the fused
    backend's calls (under "hmlm::<name>"), while active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_a_kernel(func):
            self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def fused_call(self, backend: str, name: str) -> AbstractContextManager:
        """One launch; what the backend runs inside (the Triton interpreter's torch calls) is not the step's."""
        self.counts[f"hmlm::{name}"] += 1
        return _disable_current_modes()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextmanager
def counting() -> Iterator[LaunchCounter]:
    """Count the launches of what runs inside: `with counting() as counter: step()`, then `counter.total`."""
    counter = LaunchCounter()
    with kernels.observing(counter.fused_call), counter:
        yield counter


def count(step: Callable[[], object]) -> LaunchCounter:
    """The launches of one call of `step`."""
    with counting() as counter:
        step()
    return counter


# --- On CUDA: the profiler's count, next to the dispatch count --------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


def count_launches(step: Callable[[], None], device: torch.device) -> dict:
    """Kernel launches of one call of `step`: by dispatch counting (`count` here: `dispatched`, and the largest parts
    in `dispatched_by_op`), then from the torch profiler on a second call: GPU kernels executed (memory copies
    and sets apart), the host's kernel launch calls, its graph launches, and the aten operators dispatched (nested
    ones included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    counted = count(step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    gpu = [e.name for e in events if e.device_type == DeviceType.CUDA]
    return {
        "dispatched": counted.total,
        "dispatched_by_op": dict(counted.counts.most_common(12)),
        "gpu_kernels": sum(1 for name in gpu if not name.startswith(("Memcpy", "Memset"))),
        "gpu_memcpy_memset": sum(1 for name in gpu if name.startswith(("Memcpy", "Memset"))),
        "launch_calls": sum(1 for e in events if e.name in LAUNCH_CALLS),
        "graph_launches": sum(1 for e in events if e.name in GRAPH_LAUNCHES),
        "aten_ops": sum(1 for e in events if e.name.startswith("aten::")),
    }
