"""The command line as a user meets it: help, version, config show, and one clean line for a mistake."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import hmlm


def hmlm_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hmlm", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_help_lists_the_commands():
    result = hmlm_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "config" in result.stdout


def test_version():
    result = hmlm_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"hmlm {hmlm.__version__}"


def test_config_show_prints_the_resolved_yaml(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_sizes: [32, 32]}\ntrain: {lr: 0.01}\n")
    result = hmlm_cli("config", "show", "--config", str(path), "-s", "train.lr=1e-3", "-s", "model.layer_norm=false")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert set(shown) == {"data", "model", "train", "slope", "prior"}
    assert shown["model"]["hidden_sizes"] == [32, 32] and shown["model"]["layer_norm"] is False
    assert shown["train"]["lr"] == 0.001 and shown["train"]["batch_size"] == 64  # overridden, and a default


def test_a_bad_key_is_one_line_on_stderr_and_exit_status_2(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {hidden_sizes: [32, 32]}\n")
    result = hmlm_cli("config", "show", "--config", str(path), "-s", "model.hiden_sizes=[8]")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key model.hiden_sizes; did you mean model.hidden_sizes?"
    ]
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_is_one_line_too(tmp_path: Path):
    result = hmlm_cli("config", "show", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
