"""`hmlm bench`: the structure of what it reports (never its timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hmlm.bench.throughput import (
    SHAPES,
    Shape,
    cpu_peak_memory,
    format_report,
    peak_rss_rise,
    resident_bytes,
    run_bench,
)
from hmlm.errors import UserError
from hmlm.fast import kernels

TINY = ["--device", "cpu", "--batch", "2", "--seq-len", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]
MODELS = ("fast", "reference", "lstm")


def hmlm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmlm", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report() -> dict:
    result = hmlm_cli("bench", "--json", "--no-memory", *TINY)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_json_report_describes_the_run(report: dict):
    assert report["shape"] == {"name": "small", **{**SHAPES["small"].__dict__, "batch": 2, "seq_len": 4}}
    assert report["device"]["type"] == "cpu" and report["device"]["threads"] == 1
    assert report["layer_norm"] is True
    assert report["warmup_rounds"] == 1 and report["measured_rounds"] == 2
    assert report["torch"] == torch.__version__
    assert report["fast_kernels"] == kernels.select(torch.device("cpu"), torch.float32)
    assert report["fast_kernels_detail"] == kernels.describe(torch.device("cpu"), torch.float32)


def test_json_report_has_every_model_and_ratio(report: dict):
    assert set(report["results"]) == set(MODELS)
    for key, result in report["results"].items():
        assert result["label"]
        assert len(result["train_step_s"]) == len(result["infer_step_s"]) == 2  # the measured rounds only
        assert all(t > 0 for t in result["train_step_s"] + result["infer_step_s"])
        median_train = sorted(result["train_step_s"])[0] / 2 + sorted(result["train_step_s"])[1] / 2
        assert result["train_chars_per_s"] == pytest.approx(2 * 4 / median_train), key
        assert result["peak_memory_bytes"] is None  # --no-memory
    assert set(report["ratios"]) == {"fast/lstm", "reference/lstm", "fast/reference"}
    for pair, ratio in report["ratios"].items():
        a, b = pair.split("/")
        for phase in ("train", "infer"):
            expected = report["results"][a][f"{phase}_chars_per_s"] / report["results"][b][f"{phase}_chars_per_s"]
            assert ratio[phase] == pytest.approx(expected)


def test_the_table_names_every_model_and_the_ratios(report: dict):
    text = format_report(report)
    for label in ("HM-LSTM fast", "HM-LSTM reference", "nn.LSTM"):
        assert label in text
    assert "vs LSTM" in text and "fast path vs reference" in text and "n/a" in text


def test_the_cli_prints_the_table_and_shows_progress_on_stderr():
    result = hmlm_cli("bench", "--no-memory", "--no-layer-norm", *TINY)
    assert result.returncode == 0, result.stderr
    assert "nn.LSTM" in result.stdout and "layer norm off" in result.stdout
    assert "round 3/3" in result.stderr


@pytest.mark.skipif(resident_bytes() is None, reason="no /proc/self/statm on this system")
def test_cpu_memory_is_measured_in_bytes():
    shape = Shape(batch=2, seq_len=3, embed=8, hidden=8, layers=2, out_embed=8, vocab=5)
    assert isinstance(peak_rss_rise("fast", shape, True), int)
    peak = cpu_peak_memory("lstm", shape, False)  # in a fresh process
    assert isinstance(peak, int) and peak >= 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape_name": "enwik9"}, "--shape must be one of ptb, text8, small, enwik8"),
        ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"warmup": -1}, "--warmup must be 0 or more"),
        ({"seq_len": 0}, "--seq-len must be at least 1"),
        ({"batch": -2}, "--batch must be at least 1"),
        ({"precision": "fp8"}, "--precision must be one of fp32, fp32-strict, bf16"),
        ({"precision": "bf16"}, "--precision bf16 is for CUDA; on the CPU it only goes with --launches"),
        ({"models": ("fast", "graph")}, r"--models graph \(a captured CUDA graph\) needs --device cuda"),
        ({"models": ("fast", "gru")}, "--models: unknown gru; choose from fast, reference, lstm, graph"),
        ({"models": ()}, "--models: none named"),
    ],
)
def test_bad_arguments_name_the_option(kwargs: dict, message: str):
    with pytest.raises(UserError, match=message):
        run_bench(**{"device": "cpu", **kwargs})


def test_a_bad_argument_on_the_command_line_is_one_line_and_exit_status_2():
    result = hmlm_cli("bench", "--device", "cpu", "--shape", "enwik9")
    assert result.returncode == 2 and result.stdout == ""
    expected = "error: --shape must be one of ptb, text8, small, enwik8, not 'enwik9'"
    assert result.stderr.strip().splitlines() == [expected]


def test_launches_per_training_step_are_counted_and_shown():
    """On the CPU only the aten operators count (no GPU kernels, no launch calls); make gpu-check counts on CUDA."""
    report = run_bench("small", "cpu", steps=1, warmup=0, models=("fast", "lstm"), memory=False, batch=2, seq_len=3,
                       launches=True)  # fmt: skip
    for key in ("fast", "lstm"):
        counts = report["results"][key]["launches_per_train_step"]
        assert counts["aten_ops"] > 0 and counts["gpu_kernels"] == counts["launch_calls"] == 0
        assert 0 < counts["dispatched"] < counts["aten_ops"]  # nested operators and views launch nothing
    # The HM-LSTM's step dispatches more operators than nn.LSTM's, whose recurrence is one fused op.
    fast, lstm = (report["results"][key]["launches_per_train_step"]["aten_ops"] for key in ("fast", "lstm"))
    assert fast > lstm
    assert "per training step" in format_report(report)
    assert report["precision"] == "fp32" and report["tf32"] is False and report["lstm_autocast_dtype"] is None
