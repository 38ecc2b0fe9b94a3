"""On a GPU: the commands give the CPU's results, a resumed run ends where an unbroken one ends, and two
processes under torchrun train what one does. Marked `cuda`; they skip without a GPU (`pytest -m cuda` runs
only these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import params_equal, run_hmlm, write_config

from hmlm.data import prepare_dataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch here)"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cuda")
    prepare_dataset("synthetic", work / "data")
    write_config(work / "c.yaml", work / "data", max_steps=40, eval_every=20)
    run_hmlm("train", "-c", "c.yaml", "-s", "train.device=cpu", "--run-dir", "cpu-run", "-q", cwd=work)
    return work


def hmlm_json(workdir: Path, *args: str) -> dict:
    return json.loads(run_hmlm(*args, "--json", cwd=workdir).stdout)


def test_eval_and_boundaries_on_cuda_give_the_cpus_results(workdir):
    for command in (["eval", "cpu-run", "--split", "test"], ["boundaries", "cpu-run", "--split", "valid"]):
        cpu, cuda = (hmlm_json(workdir, *command, "--device", device) for device in ("cpu", "cuda"))
        assert cpu["tokens"] == cuda["tokens"]
        assert abs(cpu["bpc"] - cuda["bpc"]) < 1e-4, (command, cpu["bpc"], cuda["bpc"])
        for key in (k for k in cpu if k.startswith("boundary_rate")):
            assert abs(cpu[key] - cuda[key]) < 1e-3, (command, key)
    text = ["boundaries", "cpu-run", "--text", "se toranu repese, ke pebale."]
    cpu, cuda = (hmlm_json(workdir, *text, "--device", device) for device in ("cpu", "cuda"))
    assert cpu["boundaries"] == cuda["boundaries"]
    for layer, gates in cpu["gates"].items():
        torch.testing.assert_close(torch.tensor(cuda["gates"][layer]), torch.tensor(gates), rtol=0, atol=1e-4)


def test_sample_on_cuda_gives_the_cpus_text(workdir):
    """The draws are made on the CPU generator whatever the model's device (hmlm/analysis/sample.py), so one seed gives
    one text; only a rounding difference at a draw's edge could change it, which a 40-symbol sample does not meet."""
    args = ("sample", "cpu-run", "--prompt", "se toranu ", "--length", "40", "--seed", "3")
    cpu, cuda = (run_hmlm(*args, "--device", device, cwd=workdir).stdout for device in ("cpu", "cuda"))
    assert cpu == cuda


RESUME_SCRIPT = """
import sys
from pathlib import Path
import torch
torch.use_deterministic_algorithms(True, warn_only=True)  # atomics would make two equal runs differ in rounding
from hmlm.config import load_config
from hmlm.training.trainer import train
run, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume"
overrides = ["model.boundary=sample", "train.device=cuda", f"train.max_steps={steps}"]
config = None if resume else load_config(Path("c.yaml"), overrides)
train(config, run, resume=resume, overrides=overrides if resume else [], progress=False)
"""


def test_resumed_cuda_run_with_sampled_boundaries_ends_where_an_unbroken_one_ends(workdir):
    script = workdir / "resume.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def python(*args: str) -> None:
        done = subprocess.run([sys.executable, str(script), *args], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    python("cuda-whole", "40", "new")
    python("cuda-resumed", "20", "new")
    python("cuda-resumed", "40", "resume")
    runs = ("cuda-whole", "cuda-resumed")
    whole, resumed = (torch.load(workdir / run / "checkpoints/last.pt", weights_only=True) for run in runs)
    assert resumed["schedule"]["step"] == 40
    assert whole["rng"]["ranks"][0]["cuda"] is not None  # the GPU's generator was saved
    assert params_equal(whole["model"], resumed["model"])
    assert torch.equal(whole["rng"]["ranks"][0]["cuda"], resumed["rng"]["ranks"][0]["cuda"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two NCCL processes need two GPUs (NCCL will not share one)")
def test_two_cuda_processes_match_one(workdir):
    from test_distributed import assert_same_run, finish, torchrun

    config = ("-c", "c.yaml", "-s", "train.device=cuda", "-s", "train.precision=fp64", "-s", "train.max_steps=30")
    run_hmlm("train", *config, "--run-dir", "cuda-one", "-q", cwd=workdir)
    finish(torchrun("train", *config, "--run-dir", "cuda-two", "-q", cwd=workdir))
    assert_same_run(workdir / "cuda-one", workdir / "cuda-two")
