"""--device on every command that runs a model, load_model(device=...), and checkpoints written on a GPU."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import params_equal, run_hmlm, small_config

from hmlm import load_model
from hmlm.analysis.evaluate import device_batches
from hmlm.data import StreamBatcher, prepare_dataset
from hmlm.devices import available_devices, local_cuda_device, resolve_device
from hmlm.errors import UserError
from hmlm.training.trainer import train

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("devices")
    prepare_dataset("synthetic", work / "data")
    train(small_config(work / "data", max_steps=4, eval_every=4, sample_length=0), work / "run", progress=False)
    return work / "run"


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as the device names go (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert available_devices()[0] == "cpu"


def test_device_names_on_a_machine_with_two_gpus(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")  # torch's current device
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"--device cuda:7: .*available: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:7")
    with pytest.raises(UserError, match=r"train.device cuda:2"):
        resolve_device("cuda:2", "train.device")


@pytest.mark.parametrize("name", ["tpu", "CUDA", "cuda:", "cuda:x", "cuda:0:1", "", "gpu"])
def test_unknown_device_names(name):
    with pytest.raises(UserError, match=r"must be auto, cpu, cuda or cuda:N, not .*available here: cpu"):
        resolve_device(name)


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda(name):
    with pytest.raises(UserError, match=r"no CUDA device is available here \(available: cpu\); use cpu"):
        resolve_device(name)


def test_torchrun_local_device_wraps_around_the_visible_gpus(two_gpus, monkeypatch):
    """Under SLURM each process may see one GPU only: LOCAL_RANK is then not an index into what it sees."""
    assert [local_cuda_device(r) for r in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_cuda_device(5) == torch.device("cuda", 0)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "RUN", "--device", "tpu"],
        ["sample", "RUN", "--prompt", "se", "--device", "tpu"],
        ["boundaries", "RUN", "--text", "se", "--device", "tpu"],
        ["bench", "--device", "tpu", "--steps", "1"],
    ],
)
def test_commands_refuse_an_unknown_device_in_one_line(args, run):
    args = [str(run) if a == "RUN" else a for a in args]
    result = run_hmlm(*args, cwd=run.parent, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--device must be auto, cpu, cuda or cuda:N, not 'tpu'" in lines[0] and "available here: cpu" in lines[0]


@NO_CUDA
@pytest.mark.parametrize("command", [["eval"], ["sample", "--prompt", "se"], ["boundaries", "--text", "se"]])
def test_commands_refuse_cuda_without_cuda(command, run):
    result = run_hmlm(command[0], str(run), *command[1:], "--device", "cuda:7", cwd=run.parent, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--device cuda:7: no CUDA device is available here (available: cpu)" in result.stderr


def test_commands_run_with_device_cpu(run):
    """--device cpu gives what the default gives on this machine (auto is the CPU here)."""
    commands = (["eval", "--json"], ["sample", "--prompt", "se ", "--length", "20"], ["boundaries", "--text", "se"])
    for command in commands:
        auto = run_hmlm(command[0], str(run), *command[1:], cwd=run.parent).stdout
        cpu = run_hmlm(command[0], str(run), *command[1:], "--device", "cpu", cwd=run.parent).stdout
        if not torch.cuda.is_available():
            assert auto == cpu


def test_load_model_on_a_device(run):
    model, vocab = load_model(run, device="cpu")
    assert next(model.parameters()).device == torch.device("cpu") and not model.training
    same, _ = load_model(run, device=torch.device("cpu"))
    assert params_equal(model.state_dict(), same.state_dict())
    auto, _ = load_model(run, device="auto")
    assert next(auto.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="device must be"):
        load_model(run, device="tpu")


def cuda_tagged_copy(source: Path, target: Path) -> None:
    """`source` as torch.save writes it on a GPU: every tensor's storage tagged with location cuda:0."""
    original = zipfile.ZipFile(io.BytesIO(source.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as copy:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("data.pkl"):  # the pickled location strings (protocol 2 BINUNICODE)
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            copy.writestr(info.filename, data)
    target.write_bytes(out.getvalue())


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(run, tmp_path):
    tagged = tmp_path / "cuda.pt"
    cuda_tagged_copy(run / "checkpoints" / "best.pt", tagged)
    if not torch.cuda.is_available():  # the copy really is a GPU checkpoint: torch refuses it without map_location
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tagged, weights_only=True)
    model, _ = load_model(tagged, device="cpu")
    reference, _ = load_model(run, device="cpu")
    assert params_equal(model.state_dict(), reference.state_dict())
    result = run_hmlm("eval", str(tagged), "--device", "cpu", "--json", cwd=run.parent)
    assert '"bpc"' in result.stdout


def test_device_batches_are_the_batchers_batches():
    tokens = np.arange(103, dtype=np.uint8)
    for rank in (0, 1):
        batcher = StreamBatcher(tokens, batch_size=4, seq_len=7, rank=rank, world_size=2)
        expected = [(x.clone(), y.clone()) for x, y in batcher]
        got = list(device_batches(batcher, torch.device("cpu")))
        assert len(got) == len(expected) == len(batcher)
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert x.dtype == torch.int64 and torch.equal(x, ex) and torch.equal(y, ey)


@NO_CUDA
def test_train_device_cuda_without_cuda(run, tmp_path):
    config = small_config(run.parent / "data", device="cuda:1")
    with pytest.raises(UserError, match=r"^train.device cuda:1: no CUDA device is available here \(available: cpu\)"):
        train(config, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
