"""Kernel launches counted without a GPU: what a piece of code would launch on CUDA, by dispatch counting.

On CUDA the torch profiler sees the launches themselves (hmlm/bench/throughput.py's `count_launches`). On the CPU it
sees only operators, nested ones included, which is not the same number. This module counts what a CUDA run would
launch from the same code: every aten operator that reaches the backend and writes a result (one kernel each on
CUDA), leaving out those that only make a view or allocate; plus one launch per call of a fused kernel backend
(hmlm/kernels: the Triton kernels launch one kernel per call, by design). The count does not depend on the sizes,
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
