"""Checkpoints: written atomically, loaded with weights_only=True, and rebuilt into a model.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so that
`torch.load(weights_only=True)` reads it and an untrusted file cannot run code. It holds everything an exact
resume needs: model, optimizer and schedule state, step, epoch, data position, the carried recurrent state,
RNG states, best validation loss, the resolved config and the vocabulary.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hmlm.config import Config, from_saved
from hmlm.data import Vocab
from hmlm.devices import resolve_device
from hmlm.errors import UserError
from hmlm.model import CharLM, HMLSTMState

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("best", "last")


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load on the CPU with weights_only=True; a damaged or foreign file is a UserError, not a traceback."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: train a model first with `hmlm train`")
    try:
        # map_location: a checkpoint written on a GPU loads on a machine without one (the model moves later)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file (RuntimeError, UnpicklingError, EOF)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} is corrupt or not an hmlm checkpoint ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not an hmlm checkpoint of format {FORMAT_VERSION}")
    return payload


def resolve_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """The checkpoint file `which` (best or last) of a run directory (runs/NAME, holding checkpoints/), of that
    checkpoints/ folder itself (what a shell completes to), or a checkpoint file as given."""
    path = Path(run_or_file)
    if path.is_dir():
        if which not in CHECKPOINT_NAMES:
            raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINT_NAMES)}, not {which!r}")
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = folder / f"{which}.pt"
        if not found.is_file() and which == "best" and (folder / "last.pt").is_file():
            found = folder / "last.pt"  # a run stopped before its first evaluation
        if not found.is_file():
            raise UserError(
                f"{path} holds no checkpoint {which}.pt: pass a run directory made by `hmlm train` (runs/NAME), "
                "its checkpoints/ folder, or a checkpoint file"
            )
        return found
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run directory (runs/NAME) or a checkpoint file")
    return path


def state_to_lists(state: HMLSTMState) -> list[list[torch.Tensor]]:
    """A NamedTuple is not weights-only loadable; plain lists of tensors are."""
    return [[t.detach().cpu() for t in part] for part in state]


def state_from_lists(parts: list[list[torch.Tensor]], device: torch.device | str) -> HMLSTMState:
    return HMLSTMState(*([t.to(device) for t in part] for part in parts))


def config_from_payload(payload: dict[str, Any]) -> Config:
    return from_saved(payload["config"])


@dataclass
class Trained:
    model: CharLM  # in eval mode, on the device asked for
    vocab: Vocab
    config: Config
    path: Path  # the checkpoint file it came from


def load_trained(
    run_or_checkpoint: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> Trained:
    """The trained model with its vocabulary and config, from a run directory or a checkpoint file, on `device`
    (auto, cpu, cuda, cuda:N or a torch.device)."""
    target = resolve_device(str(device), "device")  # before the load: a wrong device is the quicker error
    path = resolve_checkpoint(run_or_checkpoint, checkpoint)
    payload = load_checkpoint(path)
    config = config_from_payload(payload)
    vocab = Vocab.from_dict(payload["vocab"])
    model = CharLM(len(vocab), config.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not match its own config: {str(error).splitlines()[0]}") from None
    return Trained(model.to(target).eval(), vocab, config, path)


def load_model(
    run_or_checkpoint: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> tuple[CharLM, Vocab]:
    """The trained model (eval mode, on `device`: auto, cpu, cuda, cuda:N) and its vocabulary:
    `model, vocab = load_model("runs/ptb", device="cuda")`."""
    trained = load_trained(run_or_checkpoint, checkpoint, device)
    return trained.model, trained.vocab
