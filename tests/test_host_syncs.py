"""The training loop reads values back from the device only at checks (logging, evaluation, the end).

Every way a Python program can wait for a value that the device computes is counted while a small run trains:
the Tensor methods that hand a value to the host (item, tolist, cpu, numpy, float(), int(), bool(), index, format)
and torch.cuda.synchronize. On the CPU these cost nothing, but the same calls on a GPU make the host wait for the
device to finish its queue, so the count on the CPU is the count on a GPU. Not counted: Adam's step counters,
which torch keeps on the CPU even for a model on a GPU (reading them waits for nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_config

from hmlm.data import prepare_dataset
from hmlm.errors import UserError
from hmlm.training.cuda_graph import EagerReplay, GraphTrainStep
from hmlm.training.trainer import Trainer, train

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def count_reads_per_step(monkeypatch, config, run_dir: Path) -> dict[int, int]:
    """Train; return {step: host reads between the start of that step and the start of the next}."""
    reads: list[str] = []
    trainer: list[Trainer] = []

    def adam_step_counter(tensor: torch.Tensor) -> bool:
        return bool(trainer) and any(s.get("step") is tensor for s in trainer[0].optimizer.state.values())

    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if not adam_step_counter(self):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: reads.append("synchronize"))

    starts: list[tuple[int, int]] = []  # (step about to run, reads so far)
    original_step = Trainer.train_step

    def train_step(self, x, y, slope):
        trainer[:] = [self]
        starts.append((self.schedule.step + 1, len(reads)))
        return original_step(self, x, y, slope)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    train(config, run_dir, progress=False)
    ends = [count for _, count in starts[1:]] + [len(reads)]
    return {step: end - begin for (step, begin), end in zip(starts, ends, strict=True)}


def test_no_host_read_outside_checks_and_one_per_logging_check(data_dir, tmp_path, monkeypatch):
    assert_quiet_between_checks(count_reads_per_step(monkeypatch, check_config(data_dir), tmp_path / "run"))


def test_the_captured_step_reads_nothing_back_either(data_dir, tmp_path, monkeypatch):
    """The same run through the Trainer's captured step (hmlm/training/cuda_graph.py; its 'replay' runs eagerly here, as
    the CPU allows): no reads outside checks, apart from the check of the first replay against an eager step, once
    per run. With the torch-op loop, as on CUDA: the fused CPU kernels read the slope tensor, which on the CPU waits
    for nothing."""
    monkeypatch.setenv("HMLM_FUSED", "0")
    original_init = Trainer.__init__
    graphs: list[GraphTrainStep] = []

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.graph_step = GraphTrainStep(self.model, self.optimizer, self.config.train.grad_clip, None, self.device,
                                         "auto", pytest.fail, EagerReplay)  # fmt: skip
        graphs.append(self.graph_step)

    monkeypatch.setattr(Trainer, "__init__", init)
    per_step = count_reads_per_step(monkeypatch, check_config(data_dir), tmp_path / "run")
    assert len(graphs) == 1 and graphs[0].verified and graphs[0].given_up is None and graphs[0].static is not None
    assert per_step[1] >= 2  # the first replay's check reads the eager and the replayed loss (and norms)
    assert_quiet_between_checks(per_step | {1: 0})


def check_config(data_dir: Path):
    # 26 steps (an epoch is far longer): checks at the logging steps (5, 10, ...), the evaluations (13, 26) and
    # the last step; the other steps must not wait for the device.
    return small_config(data_dir, max_steps=26, eval_every=13, log_every=5, batch_size=4, eval_tokens=200)


def assert_quiet_between_checks(per_step: dict[int, int]) -> None:
    """The exact reads of check_config's run: none on a step without a check, one at a check that only logs, more at
    an evaluation."""
    assert sorted(per_step) == list(range(1, 27))
    logging, evaluations = {5, 10, 15, 20, 25}, {13, 26}
    quiet = {step: n for step, n in per_step.items() if step not in logging | evaluations}
    # None: a step leaves its loss, gradient norm, finite flag and boundary counts on the device in the log window
    # (hmlm/training/window.py), the slope it is given is a Python number, and the stop flag and clock are host values.
    assert set(quiet.values()) == {0}, f"host reads on steps without a check: {quiet}"
    # One: LogWindow.read, which reads the window's sums with the stop flags in one copy.
    assert {step: per_step[step] for step in logging} == dict.fromkeys(logging, 1), per_step
    # An evaluation reads its results (and the counting sees them), at a check too.
    assert all(per_step[step] > 1 for step in evaluations), per_step


TORCHRUN_SCRIPT = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import pytest
from test_host_syncs import check_config, count_reads_per_step
with pytest.MonkeyPatch.context() as monkeypatch:
    per_step = count_reads_per_step(monkeypatch, check_config(Path({data!r})), Path("run"))
Path(f"reads{{os.environ['RANK']}}.json").write_text(json.dumps(per_step))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_read_at_checks_only(data_dir, tmp_path):
    """Under torchrun (2 gloo processes) the stop flags and the non-finite count travel in the one all-reduce of
    a check; no step outside the checks waits for the device."""
    script = tmp_path / "count.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), data=str(data_dir)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        per_step = json.loads((tmp_path / f"reads{rank}.json").read_text())
        assert_quiet_between_checks({int(step): n for step, n in per_step.items()})


def test_a_nan_stops_the_run_at_the_next_check_before_any_checkpoint(data_dir, tmp_path, monkeypatch):
    """A weight turned NaN during step 5 is found at the check of step 8 (log_every 4), before step 8's
    checkpoint: last.pt stays the good one of step 4 and the message names the steps."""
    original_step = Trainer.train_step

    def train_step(self, x, y, slope):
        if self.schedule.step == 4:  # about to run step 5
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return original_step(self, x, y, slope)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    config = small_config(data_dir, max_steps=12, eval_every=4, log_every=4, sample_length=0)
    with pytest.raises(UserError, match=r"became non-finite .* in steps 5-8; the last good checkpoint is"):
        train(config, tmp_path / "run", progress=False)
    last = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert last["schedule"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values())
