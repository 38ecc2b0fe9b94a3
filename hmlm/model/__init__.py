"""The model: the HM-LSTM stack (`hmlstm.py`, on the fast path of hmlm/fast/ or the reference cell of
hmlm/cell.py), the character-level language model around it (`charlm.py`), and the boundary-rate prior
(`prior.py`)."""

from hmlm.model.charlm import CharLM, CharLMOutput, OutputModule
from hmlm.model.hmlstm import HMLSTM, IMPLS, MODEL_KINDS, HMLSTMOutput, HMLSTMState, ModelConfig

__all__ = [
    "CharLM", "CharLMOutput", "OutputModule", "HMLSTM", "IMPLS", "MODEL_KINDS", "HMLSTMOutput", "HMLSTMState",
    "ModelConfig",
]  # fmt: skip
