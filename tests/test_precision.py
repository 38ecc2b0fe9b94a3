"""train.precision: the choices the config accepts, and the TF32 flags each sets on CUDA (none on the CPU)."""

from __future__ import annotations

import pytest
import torch

from hmlm.config import from_dict
from hmlm.errors import UserError
from hmlm.precision import PRECISIONS, apply_precision


@pytest.fixture
def tf32_flags():
    """torch's process-wide TF32 flags, put back after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_is_a_valid_setting(precision: str):
    assert from_dict({"train": {"precision": precision}}).train.precision == precision


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(UserError, match="train.precision.*fp32-strict"):
        from_dict({"train": {"precision": "tf32"}})


@pytest.mark.parametrize(
    ("precision", "tf32"), [("fp32", True), ("bf16", True), ("fp32-strict", False), ("fp64", False)]
)
def test_tf32_on_cuda_except_in_strict_and_fp64(tf32_flags, precision: str, tf32: bool):
    """The flags are torch's, settable without a GPU; a CUDA device is what makes apply_precision set them."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    apply_precision(precision, torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")


def test_the_cpu_flags_are_left_alone(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    apply_precision("fp32", torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
