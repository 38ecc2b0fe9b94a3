"""Limits: a config that cannot fit is refused before it allocates, memory errors are one line, and a finished run
stays finished. The memory estimate is held to the buffers hmlm/fast/ really allocates."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hmlm import fast
from hmlm.data import prepare_dataset
from hmlm.errors import UserError
from hmlm.fast import kernels as backends
from hmlm.model import CharLM, ModelConfig
from hmlm.training.limits import AlreadyFinished, check_split
from hmlm.training.memory import (
    RUNTIME_BYTES,
    MemoryShape,
    OutOfMemory,
    check_fits,
    count_parameters,
    estimate,
    fast_bytes,
    layer_tape,
    out_of_memory_as_user_error,
    out_of_memory_in,
)
from hmlm.training.trainer import Trainer, train
from tests.helpers import adam_steps, record_steps, run_hmlm, small_config, write_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def one_line(result) -> str:
    """The single line a failed command printed, after checking it failed the way a user's mistake should."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- The estimate counts what the code allocates -----------------------------------------------------------------

MODELS = [
    ModelConfig(embed_dim=8, hidden_sizes=[16, 24, 12], output_embed_dim=20, layer_norm=True),
    ModelConfig(embed_dim=8, hidden_sizes=[16, 24], output_embed_dim=20, layer_norm=False),
    ModelConfig(embed_dim=8, hidden_sizes=[16], output_embed_dim=20, layer_norm=True),
    ModelConfig(kind="lstm", embed_dim=8, hidden_sizes=[16, 16], output_embed_dim=20),
]


@pytest.mark.parametrize("config", MODELS, ids=["ln-3", "no-ln-2", "ln-1", "lstm"])
def test_parameter_count_from_the_shapes(config):
    model = CharLM(11, config)
    assert count_parameters(config, 11) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
@pytest.mark.parametrize("config", MODELS[:3], ids=["ln-3", "no-ln-2", "ln-1"])
def test_tape_bytes_are_the_buffers_fast_py_allocates(config, precision, save):
    dtype = torch.float64 if precision == "fp64" else torch.float32
    B, T = 3, 7
    sizes = tuple(config.hidden_sizes)
    plan = fast.Plan(sizes, (0, *sizes[:-1]), config.layer_norm, "step", True, 1.0, dtype)
    Z = torch.zeros(T + 1, B, len(sizes), dtype=dtype)
    shape = MemoryShape(config, 11, B, T, precision=precision)
    for layer in range(len(sizes)):
        tape = fast.LayerTape(plan, layer, B, T, torch.device("cpu"), dtype, save)
        tape.attach(Z)
        buffers = {id(t): t for t in vars(tape).values() if isinstance(t, torch.Tensor)}  # views share storage
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in buffers.values()}
        assert layer_tape(shape, layer, save) == sum(storages.values())


@pytest.mark.parametrize("kernels", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("config", MODELS[:3], ids=["ln-3", "no-ln-2", "ln-1"])
def test_gradient_bytes_are_the_buffers_the_backward_allocates(config, kernels):
    B, T = 3, 7
    sizes = tuple(config.hidden_sizes)
    plan = fast.Plan(sizes, (0, *sizes[:-1]), config.layer_norm, "step", True, 1.0, torch.float32, kernels)
    Z = torch.zeros(T + 1, B, len(sizes))
    tapes = [fast.LayerTape(plan, layer, B, T, torch.device("cpu"), torch.float32, True) for layer in range(len(sizes))]
    for tape in tapes:
        tape.attach(Z)
    grads = [fast.LayerGrads(plan, tape, layer, Z, None, None, None) for layer, tape in enumerate(tapes)]
    held = {t.untyped_storage().data_ptr() for x in [Z, *tapes] for t in tensors_of(x)}
    expected = [
        sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_of(grad)
             if t.untyped_storage().data_ptr() not in held}.values())
        for grad in grads
    ]  # fmt: skip
    shape = MemoryShape(config, 11, B, T, kernels=kernels)
    assert fast_bytes(shape, B, save=True)[1 + len(sizes) :] == expected


def tensors_of(holder) -> list[torch.Tensor]:
    if isinstance(holder, torch.Tensor):
        return [holder]
    values = [v for v in vars(holder).values()]
    flat = [t for v in values for t in (v if isinstance(v, list | tuple) else [v])]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def allocator_peak_of_a_step(config: ModelConfig, vocab: int, B: int, T: int, trace: Path) -> int:
    """The highest number of bytes torch's CPU allocator holds during a first training step, beyond what it held
    before (the model), as the profiler records every allocation and free."""
    torch.manual_seed(0)
    model = CharLM(vocab, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (B, T + 1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = F.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        live += event["args"]["Bytes"]
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("kernels", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("config", MODELS[:2], ids=["ln-3", "no-ln-2"])
def test_estimate_of_a_step_matches_the_allocator(config, kernels, monkeypatch, tmp_path):
    """Without the libraries' own workspaces (RUNTIME_BYTES), the first step's estimate is what the allocator
    holds at its highest, to a few percent (what is not counted: (B, 1) and (B, H) temporaries of single steps)."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", kernels)
    if backends.select(torch.device("cpu"), torch.float32) != kernels:  # triton: interpreted, on CPU tensors
        pytest.skip(f"the {kernels} kernels cannot run on the CPU here")
    config = replace(config, hidden_sizes=[64] * len(config.hidden_sizes), output_embed_dim=96)
    B, T = 16, 40
    measured = allocator_peak_of_a_step(config, 30, B, T, tmp_path / "trace.json")
    shape = MemoryShape(config, 30, B, T, kernels=kernels)
    estimated = estimate(shape).first_step - RUNTIME_BYTES
    assert abs(estimated - measured) <= 0.05 * measured, (estimated, measured)


def test_the_estimate_grows_with_every_size():
    base = MemoryShape(MODELS[0], 11, 4, 10)
    total = estimate(base).total
    assert estimate(replace(base, batch_size=8)).total > total
    assert estimate(replace(base, seq_len=20)).total > total
    assert estimate(replace(base, model=replace(MODELS[0], hidden_sizes=[32, 24, 12]))).total > total


def test_too_little_memory_names_the_largest_batch_that_fits(monkeypatch):
    shape = MemoryShape(ModelConfig(embed_dim=8, hidden_sizes=[64, 64], output_embed_dim=64), 20, 256, 100)
    free = estimate(replace(shape, batch_size=50)).total + 1
    monkeypatch.setattr("hmlm.training.memory.available_bytes", lambda device: free)
    with pytest.raises(UserError, match=r"lower train\.batch_size to 50 or less") as error:
        check_fits(shape, torch.device("cpu"))
    assert "train.memory_check=false" in str(error.value)
    monkeypatch.setattr("hmlm.training.memory.available_bytes", lambda device: 1000)
    with pytest.raises(UserError, match=r"lower model\.hidden_sizes"):
        check_fits(shape, torch.device("cpu"))


# --- Split lengths -----------------------------------------------------------------------------------------------


def test_split_checks_name_the_largest_values_that_work():
    check_split(1000, "train", 10, 99, "train.batch_size", "train.seq_len", full_batch=True)  # 100 a stream: fits
    with pytest.raises(UserError, match=r"train\.batch_size=9 or less, or train\.seq_len=98 or less") as error:
        check_split(999, "train", 10, 99, "train.batch_size", "train.seq_len", full_batch=True)
    assert "the train split (999 tokens)" in str(error.value)
    with pytest.raises(UserError, match=r"use --batch-size=500 or less$"):
        check_split(1000, "test", 501, 99, "--batch-size", None, full_batch=False)


def test_train_refuses_what_the_splits_cannot_hold_before_allocating(data_dir, tmp_path):
    """Configs that once failed deep inside training: seq_len longer than the streams, a batch larger than the
    split, and the validation split too short for one batch. One line each, exit status 2, nothing written."""
    config = write_config(tmp_path / "c.yaml", data_dir)
    train_tokens = 2_700_000  # the synthetic corpus's train split
    cases = {
        "train.seq_len=1000000": f"train.seq_len={train_tokens // 4 - 1} or less",
        "train.batch_size=2000000": f"train.batch_size={train_tokens // 21} or less",
        "train.eval_tokens=10": "train.eval_tokens=80 or more",
    }
    for override, expected in cases.items():
        result = run_hmlm("train", "-c", str(config), "-s", override, "--run-dir", "r", cwd=tmp_path, check=False)
        assert expected in one_line(result), override
        assert not (tmp_path / "r").exists()
    result = run_hmlm(
        "train", "-c", str(config), "-s", "train.batch_size=20000", "-s", "train.eval_tokens=0", "--run-dir", "r",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert one_line(result).startswith("error: the valid split (150,000 tokens) is too short")


# --- Memory: refused before allocating, and out-of-memory errors as one line --------------------------------------


def test_a_model_too_large_for_memory_is_refused_before_it_allocates(data_dir, tmp_path):
    """-s model.hidden_sizes=[60000,60000,60000] (~375 GiB of parameters) stops at the estimate."""
    config = write_config(tmp_path / "c.yaml", data_dir)
    result = run_hmlm("train", "-c", str(config), "-s", "model.hidden_sizes=[60000,60000,60000]", "--run-dir", "r",
                      cwd=tmp_path, check=False)  # fmt: skip
    line = one_line(result)
    assert "GiB is free" in line and "model.hidden_sizes" in line and "train.memory_check=false" in line
    assert not (tmp_path / "r").exists()


def test_without_the_check_the_allocator_error_is_one_line_too(data_dir, tmp_path):
    """train.memory_check=false: the first weight asks for more address space than a 64-bit process has (~300 TiB),
    which the allocator refuses at once on any machine, so nothing is ever touched."""
    config = write_config(tmp_path / "c.yaml", data_dir)
    result = run_hmlm("train", "-c", str(config), "-s", "model.hidden_sizes=[3000000,3000000]", "-s",
                      "train.memory_check=false", "--run-dir", "r", cwd=tmp_path, check=False)  # fmt: skip
    line = one_line(result)
    assert line.startswith("error: out of memory (one allocation of ") and "train.batch_size" in line
    assert not (tmp_path / "r").exists()
    assert "parameters on cpu; estimated peak memory" in result.stdout  # printed beside the parameters and device


def test_allocator_errors_become_out_of_memory_and_others_pass():
    with pytest.raises(OutOfMemory, match=r"out of memory \(one allocation of .* GiB\) for a test: lower x"):
        with out_of_memory_as_user_error("a test", "x"):
            torch.empty(2**48, dtype=torch.uint8)  # 256 TiB: more than a process's address space
    with pytest.raises(RuntimeError, match="something else"):
        with out_of_memory_as_user_error("a test", "x"):
            raise RuntimeError("something else")

    def pieces():
        yield 1
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 1000 bytes.")  # fmt: skip

    with pytest.raises(OutOfMemory, match="sampling: lower --length"):
        list(out_of_memory_in(pieces(), "sampling", "--length"))


def fail_at_step(monkeypatch, step: int) -> None:
    """Make the training step `step` fail as the CPU allocator does."""
    original = Trainer.train_step

    def train_step(self, *args):
        if self.schedule.step + 1 == step:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes.")
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_out_of_memory_before_the_first_checkpoint_leaves_nothing(data_dir, tmp_path, monkeypatch):
    fail_at_step(monkeypatch, 2)
    with pytest.raises(OutOfMemory, match=r"out of memory \(one allocation of 118 MiB\) for training"):
        train(small_config(data_dir, max_steps=8, eval_every=4), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_out_of_memory_after_a_checkpoint_keeps_it(data_dir, tmp_path, monkeypatch):
    fail_at_step(monkeypatch, 6)
    with pytest.raises(OutOfMemory, match="the last checkpoint .*last.pt is kept"):
        train(small_config(data_dir, max_steps=8, eval_every=4), tmp_path / "r", progress=False)
    payload = torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)
    assert payload["schedule"]["step"] == 4
    monkeypatch.undo()
    steps = record_steps(monkeypatch)
    assert train(None, tmp_path / "r", resume=True, progress=False).step == 8  # and the run resumes from it:
    assert steps == [5, 6, 7, 8]  # the steps after the checkpoint's, and no other
    assert adam_steps(torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)) == {8}


def test_eval_refuses_a_batch_larger_than_the_split(data_dir, tmp_path):
    config = small_config(data_dir, max_steps=2, eval_every=2)
    train(config, tmp_path / "r", progress=False)
    result = run_hmlm("eval", "r", "--batch-size", "100000", cwd=tmp_path, check=False)
    assert one_line(result).endswith("use --batch-size=75000 or less")  # the 150,000-token valid split


# --- A finished run stays finished -------------------------------------------------------------------------------


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path, monkeypatch):
    config = small_config(data_dir, max_steps=4, eval_every=2)
    train(config, tmp_path / "r", progress=False)
    before = snapshot(tmp_path / "r")
    result = run_hmlm("train", "--run-dir", "r", "--resume", cwd=tmp_path, check=False)
    line = one_line(result)  # exit status 2 and one line on stderr, as every limit
    assert "already finished" in line and "-s train.max_steps=8" in line, line
    assert result.stdout == ""
    assert snapshot(tmp_path / "r") == before  # checkpoints, config, event files: byte for byte
    steps = record_steps(monkeypatch)  # a larger limit: the run continues from step 4
    assert train(None, tmp_path / "r", resume=True, overrides=["train.max_steps=6"], progress=False).step == 6
    assert steps == [5, 6] and adam_steps(torch.load(tmp_path / "r/checkpoints/last.pt", weights_only=True)) == {6}


@pytest.mark.parametrize(
    ("limits", "key"), [({"max_epochs": 0}, "train.max_epochs"), ({"max_time": 0.001}, "train.max_time")]
)
def test_every_limit_counts_as_finished(data_dir, tmp_path, limits, key):
    train(small_config(data_dir, max_steps=3, eval_every=3), tmp_path / "r", progress=False)
    before = snapshot(tmp_path / "r")
    overrides = ["train.max_steps=0", *(f"train.{k}={v}" for k, v in limits.items())]
    with pytest.raises(AlreadyFinished, match=rf"reached {key}=.* -s {key}="):
        train(None, tmp_path / "r", resume=True, overrides=overrides, progress=False)
    assert snapshot(tmp_path / "r") == before


def test_bench_prints_the_estimate_beside_the_measured_memory():
    from hmlm.bench.throughput import format_report, run_bench

    report = run_bench("small", "cpu", steps=1, warmup=0, models=("fast", "lstm"), memory=False, batch=2, seq_len=3)
    assert report["results"]["fast"]["estimated_memory_bytes"] > 0
    assert report["results"]["lstm"]["estimated_memory_bytes"] is None
    assert "estimate" in format_report(report).splitlines()[4]
    json.dumps(report)


def test_bench_out_of_memory_is_one_line(tmp_path):
    """A batch whose token tensor alone (~700 TiB) is more than a process's address space: refused at once."""
    result = run_hmlm("bench", "--batch", "100000000", "--seq-len", "1000000", "--steps", "1", "--warmup", "0",
                      "--no-memory", "--device", "cpu", cwd=tmp_path, check=False)  # fmt: skip
    line = one_line(result)
    assert line.startswith("error: out of memory (one allocation of ") and "--batch or --seq-len" in line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_estimate_of_a_step_on_cuda_matches_the_caching_allocator():
    """On CUDA (the Triton kernels, or the torch ops where they cannot run), the peak of a step with Adam's state
    allocated, as `hmlm bench` measures it."""
    device = torch.device("cuda")
    config = ModelConfig(embed_dim=64, hidden_sizes=[256, 256, 256], output_embed_dim=256, layer_norm=True)
    B, T, V = 32, 50, 50
    torch.manual_seed(0)
    model = CharLM(V, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, V, (B, T + 1), device=device)
    for _ in range(2):  # the second step has Adam's state and the previous gradients, as every later one
        torch.cuda.reset_peak_memory_stats(device)
        loss = F.cross_entropy(model(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    measured = torch.cuda.max_memory_allocated(device)
    est = estimate(MemoryShape(config, V, B, T, kernels=backends.select(device, torch.float32)))
    estimated = est.parameters + est.gradients + est.optimizer + est.activations
    assert abs(estimated - measured) <= 0.10 * measured, (estimated, measured)


def test_out_of_memory_resuming_a_run_without_checkpoint_keeps_its_config(data_dir, tmp_path, monkeypatch):
    """A run stopped before its first checkpoint resumes from its config.yaml; running out of memory there
    leaves that config for the next try."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(small_config(data_dir, max_steps=8, eval_every=4).to_yaml())
    fail_at_step(monkeypatch, 1)
    with pytest.raises(OutOfMemory):
        train(None, run, resume=True, progress=False)
    assert (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_eval_names_the_largest_batch_whose_memory_fits(data_dir, tmp_path, monkeypatch):
    from hmlm.checkpoint import load_trained
    from hmlm.data import open_dataset
    from hmlm.training.limits import check_evaluation

    train(small_config(data_dir, max_steps=2, eval_every=2), tmp_path / "r", progress=False)
    trained = load_trained(tmp_path / "r")
    dataset = open_dataset("synthetic", data_dir)
    check_evaluation(trained, dataset, "valid", 64)  # fits: nothing said
    shape = MemoryShape(trained.config.model, len(trained.vocab), 40, 20, eval_tokens=dataset.tokens("valid"))
    monkeypatch.setattr("hmlm.training.limits.available_bytes", lambda device: estimate(shape).evaluation)
    with pytest.raises(UserError, match=r"evaluating with --batch-size 64 needs .*: use --batch-size=40 or less$"):
        check_evaluation(trained, dataset, "valid", 64)
