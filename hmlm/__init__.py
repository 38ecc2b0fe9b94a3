"""hmlm: character-level language modelling with the Hierarchical Multiscale LSTM."""

from hmlm.model import HMLSTM, CharLM, CharLMOutput, HMLSTMOutput, HMLSTMState, ModelConfig

__version__ = "0.1.0"
__all__ = ["HMLSTM", "CharLM", "CharLMOutput", "HMLSTMOutput", "HMLSTMState", "ModelConfig", "__version__"]
