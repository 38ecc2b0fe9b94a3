"""Training, evaluation, sampling and checkpoints, end to end on the synthetic corpus."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import run_cli
from helpers import adam_steps, params_equal, record_steps, run_hmlm, small_config, write_config

from hmlm import CharLM, ModelConfig, load_model
from hmlm.data import prepare_dataset
from hmlm.training.trainer import StopFlag, Trainer, restarting_rows, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def test_overfits_one_small_batch():
    torch.manual_seed(0)
    model = CharLM(12, ModelConfig(embed_dim=8, hidden_sizes=[32, 32], output_embed_dim=32))
    tokens = torch.randint(0, 12, (4, 21))
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > math.log(12) * 0.8  # starts near chance
    assert loss.item() < 0.1  # and memorizes the batch


def test_same_seed_same_run(data_dir, tmp_path):
    config = small_config(data_dir, max_steps=10, eval_every=5)
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    a, b = (torch.load(tmp_path / r / "checkpoints/last.pt", weights_only=True) for r in "ab")
    assert params_equal(a["model"], b["model"])
    assert a["schedule"]["best_valid_loss"] == b["schedule"]["best_valid_loss"]


def test_tensorboard_scalars_read_back(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train(small_config(data_dir), tmp_path / "run", progress=False)
    assert summary.step == 24 and summary.stopped == "max_steps"
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/bpc", "train/lr", "train/slope", "train/grad_norm", "train/chars_per_sec",
                "valid/bpc", "train/boundary_rate_layer1", "train/boundary_rate_layer2"}  # fmt: skip
    assert expected <= tags
    assert [e.step for e in events.Scalars("valid/bpc")] == [8, 16, 24]
    slopes = [e.value for e in events.Scalars("train/slope")]
    assert slopes[0] < slopes[-1] <= 5.0  # the per-step ramp
    assert events.Tags()["tensors"], "generated samples are logged as text"
    assert (tmp_path / "run" / "samples.txt").read_text().count("--- step") == 3
    assert (tmp_path / "run" / "config.yaml").exists()


def test_existing_run_directory_is_refused(data_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_dir, max_steps=2, eval_every=2)
    run_hmlm("train", "-c", str(config), "--run-dir", "r", "-q", cwd=tmp_path)
    again = run_hmlm("train", "-c", str(config), "--run-dir", "r", "-q", cwd=tmp_path, check=False)
    assert again.returncode == 2
    assert "--resume" in again.stderr and "Traceback" not in again.stderr


def test_killed_run_resumes_to_the_same_result(data_dir, tmp_path):
    """SIGKILL mid-run, resume from the last checkpoint: the finished run equals one that never stopped."""
    config = write_config(tmp_path / "c.yaml", data_dir, max_steps=40, eval_every=5)
    run_hmlm("train", "-c", str(config), "--run-dir", "whole", "-q", cwd=tmp_path)

    proc = subprocess.Popen(
        [sys.executable, "-m", "hmlm", "train", "-c", str(config), "--run-dir", "killed", "-q"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["schedule"]["step"] >= 15:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(last, weights_only=True)["schedule"]["step"]
    assert 15 <= stopped_at < 40, "the kill must land mid-run"

    resumed_output = run_hmlm("train", "--run-dir", "killed", "--resume", "-q", cwd=tmp_path).stdout
    # The resumed process evaluates only after the step it resumed from (a run started again would from step 5 on).
    evaluated = [int(step) for step in re.findall(r"^step (\d+) epoch", resumed_output, re.MULTILINE)]
    assert evaluated == list(range(stopped_at + 5, 41, 5)), resumed_output
    whole, resumed = (torch.load(tmp_path / r / "checkpoints/last.pt", weights_only=True) for r in ("whole", "killed"))
    assert resumed["schedule"]["step"] == 40 and adam_steps(resumed) == {40}
    assert params_equal(whole["model"], resumed["model"])
    carried = zip(sum(whole["recurrent_state"], []), sum(resumed["recurrent_state"], []), strict=True)
    assert all(torch.equal(a, b) for a, b in carried)
    assert whole["schedule"]["best_valid_loss"] == resumed["schedule"]["best_valid_loss"]


def test_sigterm_saves_a_checkpoint(data_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_dir, max_steps=100000, eval_every=100000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hmlm", "train", "-c", str(config), "--run-dir", "r", "-q"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    events = tmp_path / "r"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (events.exists() and any(events.glob("events.*"))):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted" in out + err
    step = torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)["schedule"]["step"]
    assert step > 0


def test_a_second_ctrl_c_raises_at_once_and_the_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested  # the first asks the loop to stop at the end of its step, and raises nothing
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)  # SIGTERM asks the same
        assert stop.requested
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_step_stops_after_it_and_a_second_stops_at_once(data_dir, tmp_path, monkeypatch, presses):
    """Ctrl-C while step 3 runs: the run ends after step 3 and saves it; pressed twice, it stops right there, with
    step 3 unfinished and nothing saved."""
    steps: list[int] = []
    original = Trainer.train_step

    def train_step(self, *args):
        steps.append(self.schedule.step + 1)
        if self.schedule.step + 1 == 3:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    config = small_config(data_dir, max_steps=20, eval_every=10, sample_length=0)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    if presses == 1:
        summary = train(config, tmp_path / "r", progress=False)
        assert summary.stopped == "interrupted" and summary.step == 3
        assert torch.load(last, weights_only=True)["schedule"]["step"] == 3
    else:
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "r", progress=False)
        assert not last.exists()
    assert steps == [1, 2, 3]


def test_cli_end_to_end(tmp_path):
    """The quick start: data, train, eval, sample, as a user types them."""
    run_hmlm("data", "synthetic", "--data-dir", "data", cwd=tmp_path)
    config = write_config(tmp_path / "c.yaml", Path("data"), max_steps=16, eval_every=8)
    run_hmlm("train", "-c", str(config), "-q", cwd=tmp_path)
    assert (tmp_path / "runs" / "c" / "checkpoints" / "best.pt").exists()

    report = json.loads(run_hmlm("eval", "runs/c", "--split", "test", "--json", cwd=tmp_path).stdout)
    assert report["split"] == "test" and report["tokens"] > 0 and 0 < report["bpc"] < 8

    args = ("sample", "runs/c", "--prompt", "se toranu ", "--length", "40", "--seed", "3")  # synthetic's alphabet
    first, second = (run_hmlm(*args, cwd=tmp_path).stdout for _ in range(2))
    assert first == second and first.startswith("se toranu ")
    assert len(first.rstrip("\n")) >= 40
    other = run_hmlm("sample", "runs/c/checkpoints", *args[2:-1], "4", cwd=tmp_path).stdout  # the folder works too
    assert other != first and other.startswith("se toranu ")

    model, vocab = load_model(tmp_path / "runs" / "c")
    assert not model.training and len(vocab) == model.vocab_size


def test_lstm_baseline_trains(data_dir, tmp_path):
    config = small_config(data_dir, max_steps=8, eval_every=4)
    config.model.kind = "lstm"
    summary = train(config, tmp_path / "lstm", progress=False)
    assert summary.step == 8 and math.isfinite(summary.best_valid_bpc)
    model, _ = load_model(tmp_path / "lstm")
    assert model.config.kind == "lstm"


def test_bad_inputs_give_one_line(data_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_dir, max_steps=4, eval_every=4)
    run_hmlm("train", "-c", str(config), "--run-dir", "r", "-q", cwd=tmp_path)

    def fails(*args: str) -> str:
        result = run_hmlm(*args, cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    missing = write_config(tmp_path / "m.yaml", data_dir)
    missing.write_text(missing.read_text().replace("name: synthetic", "name: ptb"))
    assert "hmlm data ptb" in fails("train", "-c", str(missing), "--run-dir", "m")
    assert not (tmp_path / "m" / "checkpoints").exists()

    assert "did you mean train.max_steps" in fails("train", "-c", str(config), "-s", "train.max_stepz=3")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "r/checkpoints/last.pt").read_bytes()[:1000])
    assert "corrupt" in fails("eval", str(corrupt))

    assert "vocabulary" in fails("sample", "r", "--prompt", "se \u00e9\u00e9")


@pytest.mark.parametrize(
    ("spoiled", "found", "kept"),
    [
        (5, "the training loss became non-finite .* in steps 5-8", "the last good checkpoint is .*last.pt"),
        (8, "the validation loss became non-finite at step 8", "the last good checkpoint is .*last.pt"),
        (1, "the training loss became non-finite .* in steps 1-4", "no checkpoint was written yet"),
    ],
)
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, capsys, monkeypatch, spoiled, found, kept
):
    """Adam at a learning rate of 1e30 from step `spoiled` on: that step's update makes the weights huge and every
    later loss non-finite. The next check (log_every 4) finds it in the losses of the steps after it; where the
    spoiling step is the one checked before an evaluation (8), the validation loss finds it. Either way the run
    stops with one line and exit status 2 before anything is saved: last.pt stays step 4's (or none exists)."""
    original = Trainer.train_step

    def train_step(self, *args):
        if self.schedule.step + 1 == spoiled:
            for group in self.optimizer.param_groups:
                group["lr"] = 1e30
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    config = write_config(tmp_path / "c.yaml", data_dir, max_steps=12, eval_every=4, log_every=4)
    result = run_cli(capsys, "train", "-c", str(config), "--run-dir", str(tmp_path / "r"), "-q")
    assert result.code == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(f"error: {found}; {kept}. Lower train.lr .*", line), line
    last = tmp_path / "r/checkpoints/last.pt"
    if spoiled == 1:
        assert not last.exists()
        return
    payload = torch.load(last, weights_only=True)
    assert payload["schedule"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_resume_with_new_limits(data_dir, tmp_path, monkeypatch):
    """A finished run trained on with a larger max_steps continues from where it stopped: it runs steps 9-12 only,
    and ends with the weights and the optimizer state of a run of 12 steps that never stopped."""
    train(small_config(data_dir, max_steps=8, eval_every=4), tmp_path / "r", progress=False)
    steps = record_steps(monkeypatch)
    summary = train(None, tmp_path / "r", resume=True, overrides=["train.max_steps=12"], progress=False)
    assert summary.step == 12 and steps == [9, 10, 11, 12]
    train(small_config(data_dir, max_steps=12, eval_every=4), tmp_path / "whole", progress=False)
    whole, resumed = (torch.load(tmp_path / r / "checkpoints/last.pt", weights_only=True) for r in ("whole", "r"))
    assert params_equal(whole["model"], resumed["model"])
    assert adam_steps(resumed) == {12}


def test_restarts_are_spread_and_each_stream_restarts_once_a_period():
    batch, every = 8, 4
    restarted = [row for step in range(1, 1 + 3 * every) for row in restarting_rows(step, every, batch, 0, batch)]
    assert sorted(restarted) == sorted(list(range(batch)) * 3)
    for step in range(1, 2 * every):
        rows = restarting_rows(step, every, batch, 0, batch)
        assert len(rows) == batch // every  # the same number at every step
        halves = restarting_rows(step, every, batch, 0, 4) + [4 + r for r in restarting_rows(step, every, batch, 4, 4)]
        assert halves == rows  # two processes of 4 streams restart what one process of 8 does
    assert restarting_rows(0, every, batch, 0, batch) == [] and restarting_rows(4, 0, batch, 0, batch) == []


def test_streams_restart_from_zeros_and_a_resume_repeats_it(data_dir, tmp_path, monkeypatch):
    """train.reset_every: the rows due start their training step from the zero state, the others from the state
    carried; a run stopped and resumed restarts the same streams at the same steps."""
    starts: list[list[torch.Tensor] | None] = []  # the state every training forward starts from
    forward = CharLM.forward

    def spy(self, tokens, state=None, *args, **kwargs):
        if torch.is_grad_enabled():  # training; evaluation and sampling run without gradients
            starts.append(None if state is None else [t.detach().clone() for part in state for t in part])
        return forward(self, tokens, state, *args, **kwargs)

    monkeypatch.setattr(CharLM, "forward", spy)
    train(small_config(data_dir, max_steps=12, eval_every=4, reset_every=3), tmp_path / "whole", progress=False)
    assert len(starts) == 12 and starts[0] is None
    for step, parts in enumerate(starts[1:], start=1):
        due = restarting_rows(step, 3, 4, 0, 4)
        assert due, "with 4 streams and reset_every 3, some stream restarts at every step"
        for row in range(4):
            assert all(not t[row].any() for t in parts) == (row in due), (step, row)

    train(small_config(data_dir, max_steps=7, eval_every=4, reset_every=3), tmp_path / "resumed", progress=False)
    train(None, tmp_path / "resumed", resume=True, overrides=["train.max_steps=12"], progress=False)
    whole, resumed = (torch.load(tmp_path / r / "checkpoints/last.pt", weights_only=True) for r in ("whole", "resumed"))
    assert params_equal(whole["model"], resumed["model"])


def test_the_study_tools_read_a_run(data_dir, tmp_path):
    """The study tools (docs/boundary-study.md, docs/locked-streams.md) on a trained run."""
    train(small_config(data_dir, max_steps=4, eval_every=4), tmp_path / "run", progress=False)
    tools = Path(__file__).parents[1] / "tools"

    def tool(name: str, *args: str) -> list[str]:
        command = [sys.executable, str(tools / name), str(tmp_path / "run"), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()

    lines = tool("fresh_starts.py", "--streams", "4", "--symbols", "2000")
    assert [line.split(":")[0] for line in lines] == ["zero state", "warm state"]
    assert all("bpc over 4 streams of 500 symbols" in line for line in lines)
    lines = tool("firing_symbols.py", "--symbols", "2000")
    assert [line.split(" (")[0] for line in lines] == ["layer 1", "layer 2"]  # the 3-layer model's lower layers
    assert all("' ' " in line and "',' " in line for line in lines)  # the space and the comma, with their fractions
    lines = tool("sample_locks.py", "--seeds", "2", "--length", "250", "--prompt", "se ")
    assert [line.split(":")[0] for line in lines[:2]] == ["seed 0", "seed 1"]
    assert lines[-1].startswith("highest rate of any layer in any sample: ")
    lines = tool("valid_noise.py", "--split", "valid", "--slice", "2000", "--streams", "4", "--checkpoint", "last")
    assert lines[0].startswith("slice 1 (symbols 0-2,000): zero state ")
    assert [line.split(":")[0] for line in lines[-3:]] == ["zero state", "warm state", "warm minus zero per slice"]
    lines = tool("lock_anatomy.py", "--streams", "4", "--symbols", "800")
    assert re.match(r"[0-4] of 4 streams of 200 symbols locked; detector bias b_z = [-+]\d", lines[0])
    assert any(line.startswith(("healthy: zhat^2 ", "locked: zhat^2 ")) for line in lines)
