"""hmlm: character-level language modelling with the Hierarchical Multiscale LSTM."""

from hmlm.model import HMLSTM, CharLM, CharLMOutput, HMLSTMOutput, HMLSTMState, ModelConfig

__version__ = "0.1.0"
__all__ = ["HMLSTM", "CharLM", "CharLMOutput", "HMLSTMOutput", "HMLSTMState", "ModelConfig", "load_model"]


def __getattr__(name: str):
    # load_model pulls in checkpoints, configs and datasets: import them only when it is asked for.
    if name == "load_model":
        from hmlm.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'hmlm' has no attribute {name!r}")
