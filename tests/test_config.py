"""Configuration: YAML in, typed dataclasses out; every mistake names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hmlm.config import Config, from_dict, load_config
from hmlm.errors import UserError
from hmlm.model import CharLM

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_round_trip_through_yaml(tmp_path: Path):
    config = Config()
    assert load_config(write(tmp_path, config.to_yaml())) == config


def test_a_changed_config_round_trips_through_yaml(tmp_path: Path):
    config = load_config(
        write(tmp_path, "model: {hidden_sizes: [32, 16], layer_norm: false, boundary: soft}\ntrain: {lr: 0.01}\n"),
        ["slope.schedule=step", "train.min_lr=1e-7", "data.name=ptb"],
    )
    assert config.model.hidden_sizes == [32, 16] and config.model.boundary == "soft" and not config.model.layer_norm
    assert config.train.lr == 0.01 and config.train.min_lr == 1e-7 and config.slope.schedule == "step"
    assert load_config(write(tmp_path, config.to_yaml())) == config


@pytest.mark.skipif(not CONFIG_FILES, reason="no configs/*.yaml yet")
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_a_model(path: Path):
    config = load_config(path)
    assert isinstance(config, Config)
    CharLM(50, config.model)  # the model section is buildable as it stands


def test_an_empty_file_or_section_means_the_defaults(tmp_path: Path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\ntrain:\n")) == Config()
    assert load_config(write(tmp_path, "model:\n"), ["model.embed_dim=64"]).model.embed_dim == 64


@pytest.mark.parametrize(
    "text, suggestion",
    [
        ("model: {hiden_sizes: [8]}", "did you mean model.hidden_sizes?"),
        ("trian: {lr: 0.1}", "did you mean train?"),
        ("train: {learning_rate: 0.1}", "train.learning_rate"),
    ],
)
def test_an_unknown_key_fails_naming_it_and_the_closest_key(tmp_path: Path, text: str, suggestion: str):
    with pytest.raises(UserError, match="unknown config key") as error:
        load_config(write(tmp_path, text))
    assert suggestion in str(error.value)


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys():
    with pytest.raises(UserError, match="valid keys: name, dir"):
        from_dict({"data": {"zzzz": 1}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"batch_size": 3.5}}, "train.batch_size"),
        ({"train": {"batch_size": True}}, "train.batch_size"),
        ({"model": {"layer_norm": "yes"}}, "model.layer_norm"),
        ({"model": {"hidden_sizes": 512}}, "model.hidden_sizes"),
        ({"model": {"hidden_sizes": [512, "a"]}}, "model.hidden_sizes[1]"),
        ({"model": 5}, "model"),
    ],
)
def test_a_wrong_type_fails_naming_the_key(raw: dict, key: str):
    with pytest.raises(UserError) as error:
        from_dict(raw)
    assert key in str(error.value)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"boundary": "hard"}}, "model.boundary"),
        ({"model": {"kind": "gru"}}, "model.kind"),
        ({"model": {"hidden_sizes": []}}, "model.hidden_sizes"),
        ({"model": {"kind": "lstm", "hidden_sizes": [8, 4]}}, "model.hidden_sizes"),
        ({"train": {"seq_len": 0}}, "train.seq_len"),
        ({"train": {"precision": "fp16"}}, "train.precision"),
        ({"train": {"reset_every": -1}}, "train.reset_every"),
    ],
)
def test_a_bad_value_fails_naming_the_key(raw: dict, key: str):
    with pytest.raises(UserError) as error:
        from_dict(raw)
    assert key in str(error.value)


def test_overrides_are_parsed_as_yaml(tmp_path: Path):
    config = load_config(
        write(tmp_path, "train: {lr: 0.002}\n"),
        [
            "model.hidden_sizes=[256, 128]",  # a list
            "model.layer_norm=false",  # a bool
            "train.lr=1e-3",  # PyYAML reads this as a string; it is a float here
            "train.batch_size=16",  # an int
            "train.max_time=60",  # an int where a float is expected widens
            "data.name=ptb",  # a string
        ],
    )
    assert config.model.hidden_sizes == [256, 128] and config.model.layer_norm is False
    assert config.train.lr == 0.001 and config.train.batch_size == 16 and config.data.name == "ptb"
    assert config.train.max_time == 60.0 and isinstance(config.train.max_time, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "section.key=value"),
        ("=3", "section.key=value"),
        ("model.hidden_sizes=[1, 2", "not valid YAML"),
        ("train.lr.x=1", "train.lr"),  # lr is a value, not a section
        ("model.hiden_sizes=[8]", "did you mean model.hidden_sizes?"),
    ],
)
def test_bad_overrides_fail_with_a_message(tmp_path: Path, override: str, message: str):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(write(tmp_path, ""), [override])


def test_a_missing_or_broken_file_fails_with_a_message(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(UserError, match="mapping of sections"):
        load_config(write(tmp_path, "- a list\n"))


def test_an_override_below_a_value_fails(tmp_path: Path):
    with pytest.raises(UserError, match="lr is not a section"):
        load_config(write(tmp_path, "train: {lr: 0.1}\n"), ["train.lr.x=1"])
