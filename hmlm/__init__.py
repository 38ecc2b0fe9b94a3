"""hmlm: character-level language modelling with the Hierarchical Multiscale LSTM.

    from hmlm import HMLSTM, CharLM, ModelConfig, load_model

The names are imported on first use, so that `hmlm data` and `hmlm --help` start without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "HMLSTM": "hmlm.model",
    "HMLSTMOutput": "hmlm.model",
    "HMLSTMState": "hmlm.model",
    "CharLM": "hmlm.model",
    "CharLMOutput": "hmlm.model",
    "ModelConfig": "hmlm.model",
    "load_model": "hmlm.checkpoint",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'hmlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
