"""Locked streams (hmlm/analysis/locks.py): a model built to lock is caught by evaluation, `hmlm eval`, `hmlm sample`
and the
fresh-start check; a model trained as the shipped configs train does not lock; the learning-rate rule survives one
bad evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_hmlm, small_config

from hmlm.analysis.evaluate import evaluate
from hmlm.analysis.locks import LOCK_TAIL, LockWatch, fresh_starts, locked_rows
from hmlm.checkpoint import save_checkpoint
from hmlm.config import TrainConfig
from hmlm.data import open_dataset
from hmlm.model import CharLM, HMLSTMState, ModelConfig
from hmlm.training.state import Schedule
from hmlm.training.trainer import train
from hmlm.training.validation import plateau

H = 8  # units per layer of the model built to lock


def locking_model(vocab_size: int) -> CharLM:
    """A 3-layer HM-LSTM (no layer norm) whose layer 2 fires on every step once it has fired, and fires at once
    from the zero state, while from a state with a very negative cell it never fires.

    Layer 1's detector has a bias of +5 and no weights: it fires on every step, so layer 2 never copies. Layer 2's
    gates are constants (f = sigm(10), i = sigm(-2), o = sigm(10), g = tanh(10)), so each step adds i*g = 0.12 to
    its cell, and its detector reads zhat = 0.5 + sum(h^2_{t-1}). From the zero state zhat = 0.5 > 0: it fires, the
    next step flushes (c = 0.12, h = 0.12 > 0), zhat = 1.4: it fires again, for ever. From a cell of -1000 (an UPDATE
    keeps nearly all of it: f = 0.99995) h stays near -1 and zhat near -7.5: it never fires."""
    config = ModelConfig(embed_dim=H, hidden_sizes=[H, H, H], output_embed_dim=H, layer_norm=False, boundary="step")
    torch.manual_seed(0)
    model = CharLM(vocab_size, config).double()
    rnn = model.rnn
    with torch.no_grad():
        rnn.weight[0][4 * H].zero_()
        rnn.bias[0][4 * H] = 5.0
        rnn.weight[1].zero_()
        rnn.bias[1].copy_(torch.cat([torch.full((H,), v) for v in (10.0, -2.0, 10.0, 10.0)] + [torch.tensor([0.5])]))
        rnn.weight[1][4 * H, H : 2 * H] = 1.0  # zhat's recurrent weights: [W_below (H) | U_rec (H) | U_above (H)]
    return model.eval()


def warm_state(batch: int) -> HMLSTMState:
    """A state from which locking_model's layer 2 never fires: a cell of -1000 in layer 2."""
    zeros = [torch.zeros(batch, H, dtype=torch.float64) for _ in range(3)]
    c = [t.clone() for t in zeros]
    c[1] -= 1000.0
    h = [t.clone() for t in zeros]
    h[1] -= 1.0
    return HMLSTMState(h, c, [torch.zeros(batch, 1, dtype=torch.float64) for _ in range(3)])


@pytest.fixture(scope="module")
def tokens(data_dir: Path) -> np.ndarray:
    return open_dataset("synthetic", str(data_dir)).split("valid")[:4001]


def test_a_layer_that_fires_once_it_has_fired_locks_every_stream_read_from_the_zero_state(tokens):
    model = locking_model(20)
    result = evaluate(model, tokens, batch_size=4, seq_len=50)
    locks = result.locks
    assert (locks.streams, locks.locked, locks.layer) == (4, 4, 2)
    assert locks.tokens == result.tokens
    assert locks.bpc == pytest.approx(result.bpc, rel=1e-6)  # all streams locked: their BPC is the whole (float32 sums)
    assert result.boundary_rate[1] == 1.0
    assert "4 of 4 streams locked: layer 2 fires" in locks.warning() and "train.reset_every" in locks.warning()


def test_the_lock_is_judged_on_each_stream_s_last_steps():
    z = torch.zeros(3, 600)
    z[0, -LOCK_TAIL:] = 1.0  # locked at its end
    z[1, :400] = 1.0  # fired on every step, then stopped: not locked
    z[2, -LOCK_TAIL:] = 1.0
    z[2, -LOCK_TAIL // 5 :] = 0.0  # fires on 80% of its last steps: not locked
    assert locked_rows(z).tolist() == [True, False, False]
    watch = LockWatch()
    for part in z.split(70, dim=1):  # batch by batch, as evaluation reads them
        watch.add(torch.stack([torch.zeros_like(part), part], dim=-1), torch.ones_like(part))
    locks = watch.result()
    assert (locks.streams, locks.locked, locks.layer, locks.tokens, locks.nll) == (3, 1, 2, 600, 600.0)


def test_the_fresh_start_check_fails_on_the_locking_model_and_passes_from_a_warm_state(tokens):
    model = locking_model(20)
    check = fresh_starts(model, tokens, streams=4, symbols=4000, seq_len=50)
    assert check.zero.locked == 4  # what a check of "no locked stream from the zero state" catches
    z_warm = []
    state = warm_state(4)
    x = torch.from_numpy(tokens[:4000].astype(np.int64)).view(4, -1)
    with torch.no_grad():
        for part in x.split(50, dim=1):
            out = model(part, state)
            state = out.state
            z_warm.append(out.boundaries)
    assert torch.cat(z_warm, dim=1)[..., 1].sum() == 0  # from the cold cell, layer 2 never fires


@pytest.mark.slow
def test_a_model_trained_with_the_default_resets_reads_as_well_from_the_zero_state(data_dir, tmp_path):
    """The shipped configs' train.reset_every (the default): trained briefly, no stream locks from the zero state, and
    the zero and warm states read alike; the same check fails on the locking model (above)."""
    config = small_config(data_dir, max_steps=120, eval_every=60)
    assert config.train.reset_every == 50
    train(config, tmp_path / "run", progress=False)
    model = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    trained = CharLM(20, config.model)
    trained.load_state_dict(model)
    tokens = open_dataset("synthetic", str(data_dir)).split("test")
    check = fresh_starts(trained, tokens, streams=16, symbols=32_000, seq_len=20)
    assert check.zero.locked == 0 and check.warm.locked == 0
    assert abs(check.zero_bpc - check.warm_bpc) < 0.01, (check.zero_bpc, check.warm_bpc)


def test_training_logs_the_locked_streams_to_tensorboard(data_dir, tmp_path, capsys):
    """At every evaluation, as evaluating the checkpoint counts them; the warning is printed where a lock stands beside
    a layer that fires less in training (a layer firing on nearly every step in training too is not such a lock)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(small_config(data_dir, max_steps=8, eval_every=4, eval_tokens=400), tmp_path / "run", progress=False)
    printed = capsys.readouterr().out.split("step 8 epoch 0")[1]
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    counts = [(e.step, e.value) for e in events.Scalars("valid/locked_streams")]
    assert [step for step, _ in counts] == [4, 8]
    payload = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    model = CharLM(20, small_config(data_dir).model)
    model.load_state_dict(payload["model"])
    valid = open_dataset("synthetic", str(data_dir)).split("valid")
    locks = evaluate(model, valid, batch_size=4, seq_len=20, max_tokens=400).locks
    assert counts[-1][1] == locks.locked
    rate = [e.value for e in events.Scalars("train/boundary_rate_layer2")][-1]
    assert ("warning: " in printed) == (locks.locked > 0 and rate <= 0.9)


def test_hmlm_eval_and_sample_report_a_lock(data_dir, tmp_path):
    """A run whose checkpoint holds the locking model: `hmlm eval` (text and --json) reports the locked streams and
    their BPC with one warning line, and `hmlm sample` warns that its sample locked."""
    config = small_config(data_dir, max_steps=4, eval_every=4)
    config.model = locking_model(20).config
    config.train.precision = "fp64"
    train(config, tmp_path / "run", progress=False)
    best = tmp_path / "run/checkpoints/best.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"] = locking_model(20).state_dict()
    save_checkpoint(best, payload)

    result = run_hmlm("eval", str(tmp_path / "run"), "--json", "--batch-size", "8", cwd=tmp_path)
    report = json.loads(result.stdout)
    assert (report["streams"], report["locked_streams"]) == (8, 8)
    assert report["locked_bpc"] == pytest.approx(report["bpc"], rel=1e-6)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "8 of 8 streams locked: layer 2" in warnings[0]

    text = run_hmlm("eval", str(tmp_path / "run"), "--batch-size", "8", cwd=tmp_path)
    assert text.stdout.startswith("valid bpc ") and ", 8 of 8 streams locked (at " in text.stdout
    assert "8 of 8 streams locked" in text.stderr

    sample = run_hmlm("sample", str(tmp_path / "run"), "--prompt", "se ", "--length", "300", cwd=tmp_path)
    assert "warning: the sample locked: layer 2 fired on more than 90% of its last 200 steps" in sample.stderr


def test_a_sample_of_a_model_that_does_not_lock_gives_no_warning(data_dir, tmp_path):
    train(small_config(data_dir, max_steps=4, eval_every=4), tmp_path / "run", progress=False)
    sample = run_hmlm("sample", str(tmp_path / "run"), "--prompt", "se ", "--length", "50", cwd=tmp_path)
    assert "warning" not in sample.stderr


def cuts(losses: list[float], patience: int) -> list[int]:
    """The evaluations (0-based) after which the plateau rule cuts the learning rate."""
    cfg = TrainConfig(lr=0.002, lr_decay=50.0, lr_patience=patience, min_lr=1e-9)
    schedule = Schedule(lr=cfg.lr)
    return [i for i, loss in enumerate(losses) if plateau(schedule, loss, cfg)[1]]


def test_one_bad_evaluation_cannot_cut_the_learning_rate():
    """A falling validation figure with noise and one spike (a locked evaluation): the paper's rule read literally
    (patience 0) cuts at the spike and at every wobble; with a patience of 1 only a real plateau cuts."""
    rng = np.random.default_rng(0)
    falling = 2.0 - 0.03 * np.arange(12) + rng.normal(0, 0.004, 12)  # improves by 0.03 per evaluation
    spiked = falling.copy()
    spiked[4] += 0.7  # one bad evaluation
    flat = np.full(4, falling[-1] + 0.002)  # then a plateau
    losses = [*spiked, *flat]
    assert 4 in cuts(losses, patience=0)
    assert cuts(losses, patience=1) == [13, 15]  # every second evaluation of the plateau, and nothing before it
    assert cuts(losses, patience=1) == cuts([*falling, *flat], patience=1)


def test_the_plateau_rule_keeps_the_best_and_stops_at_min_lr():
    cfg = TrainConfig(lr=1e-3, lr_decay=10.0, lr_patience=1, min_lr=1e-5)
    schedule = Schedule(lr=cfg.lr)
    verdicts = [plateau(schedule, loss, cfg) for loss in (1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 1.1)]
    assert [v[0] for v in verdicts] == [True, True] + [False] * 7
    assert schedule.best_valid_loss == 0.9
    assert [i for i, v in enumerate(verdicts) if v[1]] == [3, 5]  # 1e-3 -> 1e-4 -> 1e-5, then no lower
    assert math.isclose(schedule.lr, 1e-5)
