"""Kernel launches per eager training step, counted on the CPU by dispatch (hmlm/bench/launches.py), as `hmlm bench
--launches` reports them: at most 2,000 at 3 layers and seq_len 100, in float32 and under bf16 autocast, with the
Triton kernels (interpreted here: the same calls as compiled on CUDA). The count does not depend on the sizes, so
a small model serves."""

from __future__ import annotations

import pytest
import torch

from hmlm import CharLM, ModelConfig
from hmlm.bench import launches
from hmlm.bench.throughput import run_bench
from hmlm.fast import kernels

LIMIT = 2000  # per eager training step, 3 layers, seq_len 100 (the README's GPU goals)


@pytest.fixture
def triton_kernels(monkeypatch) -> None:
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    module, why = kernels.load_triton()
    if module is None or module.DEVICE != "cpu":
        pytest.skip(f"the Triton kernels are not interpreted on the CPU here: {why or module.MODE}")


def launches_per_step(precision: str, seq_len: int) -> dict:
    report = run_bench("small", "cpu", steps=1, warmup=0, models=("fast",), memory=False, batch=2, seq_len=seq_len,
                       precision=precision, launches=True)  # fmt: skip
    assert report["fast_kernels"] == "triton"
    return report["results"]["fast"]["launches_per_train_step"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_eager_training_step_launches_at_most_2000_kernels(triton_kernels, precision: str):
    """A step launches a fixed number of kernels per time step and a fixed number around the loop, so its count is
    affine in seq_len from 16 on (below, the step weights stay uncopied: forward.step_weights): measured at 16, 17
    and 18 steps (checked affine there), it gives seq_len 100's exactly, in half the interpreter's time of 100."""
    counts = {T: launches_per_step(precision, T) for T in (16, 17, 18)}
    for T, count in counts.items():
        by_op = count["dispatched_by_op"]
        # One Triton launch per layer step forward, two backward: 3 layers x T steps each.
        assert by_op["hmlm::cell_forward"] == by_op["hmlm::cell_backward"] == by_op["hmlm::route_backward"] == 3 * T
    total = {T: count["dispatched"] for T, count in counts.items()}
    per_step = total[17] - total[16]
    assert total[18] - total[17] == per_step
    at_100 = total[16] + 84 * per_step
    assert at_100 <= LIMIT, (at_100, counts[16]["dispatched_by_op"])


def test_each_fused_call_is_one_triton_launch_and_views_launch_nothing(triton_kernels):
    """The counter's two parts checked against what runs: the fused calls it counts against the Triton launches
    recorded (hmlm.fast.kernels.triton.recording), and views and allocations are left out."""
    from hmlm.fast.kernels import triton as module

    torch.manual_seed(0)
    model = CharLM(9, ModelConfig(embed_dim=4, hidden_sizes=[5, 4, 3], output_embed_dim=4))
    tokens = torch.randint(0, 9, (2, 4))
    with module.recording() as recorded, launches.counting() as counter:
        model(tokens).logits.sum().backward()
    fused = sum(n for op, n in counter.counts.items() if op.startswith("hmlm::"))
    assert fused == len(recorded) == 3 * 4 * 3
    with launches.counting() as counter:
        x = torch.empty(4, 6)
        x.view(6, 4).t().unbind(0)
        x[:, 1:].transpose(0, 1)
    assert counter.total == 0, counter.counts
    with launches.counting() as counter:
        x.fill_(1.0)
        torch.mm(x, x.t())
    assert counter.counts == {"aten::fill_": 1, "aten::mm": 1}
