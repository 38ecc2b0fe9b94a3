"""`make gpu-check`'s plumbing (tools/gpu_check.py), on the CPU: every section in its tiny form, one report file, and a
failing section that does not lose the report. What the check measures needs a GPU (make gpu-check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402  (tools/ holds scripts, not a package)


def report_json(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text.split("```json\n", 1)[1].rsplit("\n```", 1)[0])


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_one_report_with_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(out)}
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu-smoke"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["gpu_check.md"]  # one report ($OUT)
    report = report_json(out / "gpu_check.md")
    sections = report["sections"]
    assert list(sections) == list(gpu_check.LIMITS) == ["env", "launches", "bench", "enwik8", "eval", "tests"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok"), sections
    # The rehearsal runs the GPU's plan: every section within the limit the GPU run has for it.
    assert {name: s["limit_s"] for name, s in sections.items()} == gpu_check.LIMITS
    assert sections["tests"]["result"]["counts"].get("skipped", 0) > 0  # the cuda tests, skipped without a GPU
    launches = sections["launches"]["result"]["torch fp32"]["per_train_step"]
    assert launches["HM-LSTM fast"]["dispatched"] > launches["nn.LSTM"]["dispatched"] > 0
    assert sections["eval"]["result"]["steps"] == 3 and sections["eval"]["result"]["eval_symbols"] == 2000
    assert sections["bench"]["result"]["runs"][0]["results"]["fast"]["train_chars_per_s"] > 0
    summary = (out / "gpu_check.md").read_text()
    assert "| bench | ok |" in summary and "Kernel launches per training step" in summary
    assert summary.splitlines()[4].startswith("Data: needs the enwik8 prefix prepared by `make gpu-data`")
    assert result.stderr.startswith("gpu-check: needs the enwik8 prefix prepared by `make gpu-data`")


def test_the_plan_fits_the_budget_on_paper():
    """Every section's limit is fixed in advance and the limits add up to the budget: none runs on what the others
    leave (a section that ends early leaves its time unused, as a margin)."""
    assert sum(gpu_check.LIMITS.values()) <= gpu_check.BUDGET
    for plan in (gpu_check.gpu_plan(gpu_check.BUDGET), gpu_check.smoke_plan(gpu_check.BUDGET)):
        assert plan.limits == gpu_check.LIMITS and plan.budget == gpu_check.BUDGET


def test_a_failing_or_skipped_section_is_reported_and_the_rest_still_written(tmp_path):
    report = {
        "mode": "gpu",
        "budget_s": 470,
        "sections": {
            "env": {"status": "ok", "result": {"gpu": "NVIDIA H200", "torch": "2.11.0"}, "seconds": 3.0},
            "tests": {"status": "error", "error": "TimeoutExpired: pytest", "seconds": 100.0, "limit_s": 95},
            "bench": {"status": "skipped", "error": "time budget spent"},
        },
    }
    path = gpu_check.write_report(tmp_path, report)
    text = path.read_text()
    assert "GPU: NVIDIA H200" in text and "| tests | error: TimeoutExpired: pytest | 100.0 | 95 |" in text
    assert "| bench | skipped: time budget spent | - | - |" in text
    assert report_json(path) == report


def test_failed_reads_every_kind_of_failure():
    assert not gpu_check.failed({"rc": 0, "counts": {"passed": 3}})
    assert gpu_check.failed({"rc": 1})
    assert gpu_check.failed({"timed_out": True, "rc": -9})
    assert gpu_check.failed({"counts": {"passed": 3, "failed": 1}})
    assert gpu_check.failed({"runs": [{"results": {}}, {"error": {"rc": 2}}]})
    assert gpu_check.failed({"torch": {"error": {"rc": 2}}, "triton": {"per_train_step": {}}})
    assert not gpu_check.failed({"runs": [{"skipped": "time budget"}]})


def test_a_hanging_command_is_killed_at_its_limit():
    result = gpu_check.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                   timeout=2)  # fmt: skip
    assert result["timed_out"] and result["seconds"] < 30 and "started" in result["stdout"]
