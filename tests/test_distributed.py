"""torchrun with 2 CPU processes (gloo) trains the same model as one process with the same global batch, and
resumes exactly, with each process's own random numbers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import params_equal, run_hmlm, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hmlm.data import prepare_dataset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [*command, "-m", "hmlm", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    for each in found:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def load_last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def losses(run: Path) -> list[float]:
    """Train loss, validation bpc, and the logged boundary rates: those of the global batch, all processes'."""
    events = EventAccumulator(str(run)).Reload()
    tags = ("train/loss", "valid/bpc", "train/boundary_rate_layer1", "train/boundary_rate_layer2")
    return [e.value for tag in tags for e in events.Scalars(tag)]


def assert_same_run(a: Path, b: Path) -> None:
    """Same losses within float tolerance: the processes add their gradients in another order than one
    process does, so the results agree to rounding, not bit for bit."""
    last_a, last_b = load_last(a), load_last(b)
    assert last_a["schedule"]["step"] == last_b["schedule"]["step"]
    torch.testing.assert_close(losses(a), losses(b), rtol=1e-6, atol=0)
    for key in last_a["model"]:
        torch.testing.assert_close(last_a["model"][key], last_b["model"][key], rtol=0, atol=1e-8, msg=key)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    prepare_dataset("synthetic", work / "data")
    # In float32, one and two processes (or one process with one and two threads) add numbers in different
    # orders, and Adam and the boundary threshold amplify that rounding to a visible difference within ~15
    # steps. In float64 the rounding stays far below the tolerance over the whole run.
    write_config(work / "c.yaml", work / "data", max_steps=60, eval_every=10, precision="fp64")
    run_hmlm("train", "-c", "c.yaml", "--run-dir", "single", "-q", cwd=work)
    return work


def test_two_processes_match_one(workdir):
    finish(torchrun("train", "-c", "c.yaml", "--run-dir", "two", "-q", cwd=workdir))
    assert_same_run(workdir / "single", workdir / "two")
    assert sorted(p.name for p in (workdir / "two" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_killed_two_process_run_resumes_with_one_or_two(workdir):
    proc = torchrun("train", "-c", "c.yaml", "--run-dir", "killed", "-q", cwd=workdir)
    last = workdir / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and load_last(workdir / "killed")["schedule"]["step"] >= 10:
            break
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.communicate()
    step = load_last(workdir / "killed")["schedule"]["step"]
    assert 10 <= step < 60, "the kill must land mid-run"

    # The same checkpoint resumed by two processes, and (a copy) by one: both end where the unbroken run did.
    subprocess.run(["cp", "-r", "killed", "killed-one"], cwd=workdir, check=True)
    finish(torchrun("train", "--run-dir", "killed", "--resume", "-q", cwd=workdir))
    run_hmlm("train", "--run-dir", "killed-one", "--resume", "-q", cwd=workdir)
    assert_same_run(workdir / "single", workdir / "killed")
    assert_same_run(workdir / "single", workdir / "killed-one")


def test_batch_that_does_not_divide_is_refused(workdir):
    proc = torchrun("train", "-c", "c.yaml", "-s", "train.batch_size=5", "--run-dir", "odd", "-q", cwd=workdir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "train.batch_size" in err
    single = run_hmlm("train", "-c", "c.yaml", "--run-dir", "odd1", "-q", cwd=workdir)
    assert single.returncode == 0  # 5 streams are fine for one process


def test_sampled_boundaries_resume_bit_for_bit(workdir):
    """boundary: sample draws Bernoulli noise on every step: each process draws its own, and a run stopped and
    resumed by 2 processes ends bit for bit where an unbroken 2-process run ends."""
    sample = ("-c", "c.yaml", "-s", "model.boundary=sample", "-s", "train.precision=fp32", "-q")
    finish(torchrun("train", *sample, "-s", "train.max_steps=30", "--run-dir", "sampled", cwd=workdir))
    finish(torchrun("train", *sample, "-s", "train.max_steps=20", "--run-dir", "sampled-resumed", cwd=workdir))
    finish(torchrun("train", "--run-dir", "sampled-resumed", "--resume", "-s", "train.max_steps=30", "-q", cwd=workdir))
    whole, resumed = load_last(workdir / "sampled"), load_last(workdir / "sampled-resumed")
    whole["schedule"].pop("elapsed"), resumed["schedule"].pop("elapsed")  # wall time
    assert whole["schedule"] == resumed["schedule"]
    assert params_equal(whole["model"], resumed["model"])
    carried = zip(sum(whole["recurrent_state"], []), sum(resumed["recurrent_state"], []), strict=True)
    assert all(torch.equal(a, b) for a, b in carried)
    ranks = whole["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # one stream per process
    for a, b in zip(ranks, resumed["rng"]["ranks"], strict=True):
        assert torch.equal(a["torch"], b["torch"])
