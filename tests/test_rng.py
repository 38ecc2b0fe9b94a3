"""Random number streams: one per process, saved per process, restored on resume (also from the older format)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import params_equal, small_config

from hmlm.data import prepare_dataset
from hmlm.training import rng
from hmlm.training.trainer import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def draws_after(setup) -> torch.Tensor:
    setup()
    return torch.rand(8)


def test_process_zero_keeps_its_stream_and_the_others_start_from_seed_plus_rank():
    torch.manual_seed(5)
    expected = torch.rand(8)
    assert torch.equal(draws_after(lambda: (torch.manual_seed(5), rng.seed_process(5, 0))), expected)
    torch.manual_seed(6)
    expected = torch.rand(8)
    assert torch.equal(draws_after(lambda: (torch.manual_seed(5), rng.seed_process(5, 1))), expected)


def test_restore_gives_each_process_its_own_state():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng.capture(CPU))
    saved = {"ranks": states}
    for rank, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        expected = torch.rand(8)
        assert torch.equal(draws_after(lambda rank=rank: rng.restore(saved, rank, CPU, seed=0, step=10)), expected)


def test_a_process_without_a_saved_state_gets_a_deterministic_one_of_its_own():
    torch.manual_seed(0)
    saved = {"ranks": [rng.capture(CPU)]}  # one process saved; three resume
    first = [draws_after(lambda r=r: rng.restore(saved, r, CPU, seed=3, step=40)) for r in (1, 2)]
    again = [draws_after(lambda r=r: rng.restore(saved, r, CPU, seed=3, step=40)) for r in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], draws_after(lambda: rng.restore(saved, 0, CPU, seed=3, step=40)))


def test_older_checkpoint_format_restores_into_process_zero():
    torch.manual_seed(9)
    legacy = {"torch": torch.get_rng_state(), "cuda": []}  # what checkpoints held before per-process states
    expected = torch.rand(8)
    torch.manual_seed(0)
    assert torch.equal(draws_after(lambda: rng.restore(legacy, 0, CPU, seed=0, step=4)), expected)


def test_checkpoint_holds_every_process_state_and_an_older_one_still_resumes_exactly(data_dir, tmp_path):
    """boundary: sample draws from the generator: a run resumed from a checkpoint in the older format (written
    before per-process states) ends bit for bit where an unbroken run ends, and so does one from the new format."""
    sample = {"max_steps": 8, "eval_every": 4, "sample_length": 0}
    config = small_config(data_dir, **sample)
    config.model.boundary = "sample"
    train(config, tmp_path / "whole", progress=False)
    whole = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)
    assert len(whole["rng"]["ranks"]) == 1 and whole["rng"]["ranks"][0]["cuda"] is None

    config.train.max_steps = 4
    for name in ("new", "legacy"):
        train(config, tmp_path / name, progress=False)
    last = tmp_path / "legacy/checkpoints/last.pt"
    payload = torch.load(last, weights_only=True)
    payload["rng"] = {"torch": payload["rng"]["ranks"][0]["torch"], "cuda": []}
    torch.save(payload, last)
    for name in ("new", "legacy"):
        summary = train(None, tmp_path / name, resume=True, overrides=["train.max_steps=8"], progress=False)
        assert summary.step == 8
        resumed = torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=True)
        assert params_equal(whole["model"], resumed["model"]), name
        assert torch.equal(whole["rng"]["ranks"][0]["torch"], resumed["rng"]["ranks"][0]["torch"]), name
