"""Typed configuration: dataclasses per section, loaded from YAML, overridden with `-s key=value`.

A config file has the sections `data`, `model`, `train`, `slope` and `prior`; every key is optional and falls back
to the defaults below. Unknown keys and wrong types raise `UserError` naming the key (and the closest valid
key for a misspelling), so a typo never trains the wrong model silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hmlm.cell import CELLS
from hmlm.errors import UserError
from hmlm.model import ModelConfig
from hmlm.model.prior import PriorConfig
from hmlm.precision import PRECISIONS


@dataclass
class DataConfig:
    name: str = "synthetic"  # a prepared dataset under `dir`: ptb, text8, enwik8, synthetic, or your own
    dir: str = "data"


@dataclass
class TrainConfig:
    batch_size: int = 64  # the global batch: the number of contiguous streams
    seq_len: int = 100  # truncated-BPTT length
    lr: float = 0.002
    lr_decay: float = 50.0  # divide the learning rate by this when validation loss stops improving
    lr_patience: int = 1  # evaluations without improvement tolerated before dividing: 1, so one bad one cannot
    min_lr: float = 1e-6  # stop dividing below this
    grad_clip: float = 1.0  # gradient-norm clip
    max_epochs: int = 100
    max_steps: int = 0  # 0: no limit
    max_time: float = 0.0  # seconds of training before stopping cleanly; 0: no limit
    reset_every: int = 50  # steps between fresh starts (zero state) of each stream, staggered; 0: never
    eval_every: int = 1000  # steps between evaluations (and checkpoints); also at the end of every epoch
    eval_tokens: int = 0  # validation tokens per evaluation during training; 0: the whole split
    log_every: int = 10  # steps between TensorBoard points
    sample_length: int = 200  # characters generated into TensorBoard at each evaluation; 0: none
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    precision: str = "fp32"  # fp32 (TF32 matmuls on CUDA); fp32-strict; bf16 (autocast, CUDA only); fp64
    cuda_graph: str = "auto"  # auto, on, off: capture the training step on CUDA as one CUDA graph
    memory_check: bool = True  # stop before training when the memory estimate is above what is free


@dataclass
class SlopeConfig:
    """The slope a of the hard sigmoid. It changes only the gradients of the boundary detectors."""

    schedule: str = "epoch"  # epoch: a = min(end, start + rate * epoch); step: linear from start to end
    start: float = 1.0
    end: float = 5.0
    rate: float = 0.04  # per epoch, for schedule: epoch
    steps: int = 10000  # length of the ramp, for schedule: step

    def at(self, step: int, epoch: int) -> float:
        if self.schedule == "step":
            return self.start + (self.end - self.start) * min(1.0, step / max(1, self.steps))
        return min(self.end, self.start + self.rate * epoch)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slope: SlopeConfig = field(default_factory=SlopeConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)  # a boundary-rate prior (hmlm/model/prior.py); off

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "model.kind": ("hmlstm", "lstm"),
    "model.boundary": ("step", "sample", "soft"),
    "model.cell": CELLS,
    "train.precision": PRECISIONS,
    "train.cuda_graph": ("auto", "on", "off"),
    "slope.schedule": ("epoch", "step"),
}
POSITIVE = ("train.batch_size", "train.seq_len", "train.lr", "train.eval_every", "train.log_every")
NONNEGATIVE = ("train.reset_every", "prior.start", "prior.ramp")


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Build a Config from plain data (a parsed YAML file), checking every key and type."""
    config = _build(Config, raw or {}, prefix="")
    _validate(config)
    return config


# Defaults that changed: a saved config (a checkpoint's) from before a key existed was trained with these values.
SAVED_DEFAULTS = {"train": {"reset_every": 0, "lr_patience": 0}}


def from_saved(raw: dict[str, Any]) -> Config:
    """The config a checkpoint was trained with: absent keys whose default has changed since take the old value."""
    raw = {**raw, **{section: {**keys, **(raw.get(section) or {})} for section, keys in SAVED_DEFAULTS.items()}}
    return from_dict(raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config and apply `key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: pass a file such as configs/tiny.yaml") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (data, model, train, slope, prior)")
    raw = raw or {}
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` in the raw mapping; the value is parsed as YAML (so [256,256] is a list)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {item!r} must look like section.key=value, e.g. -s train.lr=0.001")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"override {item!r}: the value is not valid YAML") from None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`model:` with every key commented out)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:  # an empty section: all defaults
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, not {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(raw[name], kind, f"{prefix}{name}")
    return cls(**values)


ON_OFF = ("train.cuda_graph",)  # string keys whose values include on and off
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check (and widen int to float) one value against its annotation."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            if option is type(None) and value is None:
                return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a list of {item.__name__}, not {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if key in ON_OFF and isinstance(value, bool):  # YAML 1.1 (PyYAML) reads on/off (and yes/no) as booleans
        return "on" if value else "off"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string: only 1.0e-3 is a float there. Users write 1e-3.
        return float(value)
    if kind in (int, float) and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"config key {key} must be {kind.__name__}, not {value!r}")
    return value


def _validate(config: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise UserError(f"config key {key} must be one of {', '.join(allowed)}, not {value!r}")
    for key in POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(config, section), name) <= 0:
            raise UserError(f"config key {key} must be positive")
    for key in NONNEGATIVE:
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < 0:
            raise UserError(f"config key {key} must be zero (off) or positive")
    try:
        config.model.validate()
        config.prior.validate(config.model)
    except ValueError as error:
        raise UserError(f"config key {error}") from None
