"""`hmlm bench --run RUN`: what it reports on a trained run (never its timings), and its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hmlm.bench.trained import format_run_report
from hmlm.config import from_dict
from hmlm.data import prepare_dataset
from hmlm.training.trainer import train

SMALL = ["--threads", "1", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4", "--seq-len", "8",
         "--sample-length", "6"]  # fmt: skip


def hmlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmlm", *args], capture_output=True, text=True, timeout=300)


def tiny_run(root: Path, data: Path, kind: str) -> Path:
    config = from_dict({
        "data": {"name": "synthetic", "dir": str(data)},
        "model": {"kind": kind, "embed_dim": 8, "hidden_sizes": [16, 16, 16], "output_embed_dim": 16},
        "train": {"batch_size": 4, "seq_len": 10, "max_steps": 4, "eval_every": 4, "eval_tokens": 200,
                  "log_every": 2, "sample_length": 0},
    })  # fmt: skip
    run_dir = root / kind
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    root = tmp_path_factory.mktemp("runs")
    return {kind: tiny_run(root, data, kind) for kind in ("hmlstm", "lstm")}


def test_a_run_is_measured_on_its_own_text(runs):
    result = hmlm_cli("bench", "--run", str(runs["hmlstm"]), "--json", *SMALL)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["hidden_sizes"] == [16, 16, 16]
    assert report["lstm"] == {"hidden": 16, "layers": 3}
    assert report["text"] == "synthetic valid"
    assert report["eval"] == {"batch": 4, "seq_len": 8} and report["sample"]["length"] == 6
    assert report["device"]["threads"] == 1 and report["measured_rounds"] == 2
    assert report["skipping_used"] is True
    assert set(report["results"]) == {"skip", "noskip", "lstm", "lstm_native"}
    for result in report["results"].values():
        assert len(result["sample_symbols_per_s_rounds"]) == len(result["eval_chars_per_s_rounds"]) == 2
        assert result["sample_symbols_per_s"] > 0 and result["eval_chars_per_s"] > 0
    for key in ("skip", "noskip"):
        for base in ("lstm", "lstm_native"):
            for phase, unit in (("sample", "sample_symbols_per_s"), ("eval", "eval_chars_per_s")):
                ratio = report["ratios"][f"{key}/{base}"][phase]
                assert ratio == pytest.approx(report["results"][key][unit] / report["results"][base][unit])
    assert len(report["boundary_rate"]) == 2 and all(0 <= r <= 1 for r in report["boundary_rate"])
    sampling = report["skip_fractions"]["sample"]
    # one stream: every layer's boundaries are checked; layer 1 never copies; what copies is skipped
    assert sampling["copy"][0] == 0 and sampling["skipped"][0] == 0
    assert sampling["copy"][1:] == sampling["skipped"][1:]
    text = format_run_report(report)
    needles = ("HM-LSTM, skipping", "HM-LSTM, no skipping", "nn.LSTM", "oneDNN off", "rows skipped", "boundary rate")
    for needle in needles:
        assert needle in text


@pytest.mark.parametrize("case", ["missing", "not a run", "not a checkpoint", "lstm"])
def test_bad_runs_give_one_line(case, runs, tmp_path):
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    path = {"missing": tmp_path / "nothing", "not a run": tmp_path, "not a checkpoint": garbage,
            "lstm": runs["lstm"]}[case]  # fmt: skip
    result = hmlm_cli("bench", "--run", str(path), *SMALL)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if case == "lstm":
        assert "LSTM run" in result.stderr and "HM-LSTM run" in result.stderr


def test_shape_does_not_go_with_run(runs):
    result = hmlm_cli("bench", "--run", str(runs["hmlstm"]), "--shape", "ptb", *SMALL)
    assert result.returncode == 2 and "--shape" in result.stderr


@pytest.mark.parametrize("option", [["--launches"], ["--precision", "fp32-strict"], ["--models", "fast"]])
def test_shape_options_do_not_go_with_run(option, runs):
    result = hmlm_cli("bench", "--run", str(runs["hmlstm"]), *option, *SMALL)
    assert result.returncode == 2 and "do not go with --run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_device_this_machine_lacks_gives_one_line(runs):
    """--run resolves --device as every command does (hmlm/devices.py)."""
    result = hmlm_cli("bench", "--run", str(runs["hmlstm"]), *SMALL, "--device", "cuda:7")  # the last one counts
    assert result.returncode == 2 and "--device" in result.stderr and "Traceback" not in result.stderr
