"""torchfg.ops.precision: the one TF32 policy every Triton launcher follows."""

from __future__ import annotations

import pytest
import torch

from torchfg.ops.precision import dot_operand_dtypes, fp32_matmul_precision


@pytest.fixture
def restore_precision():
    matmul, default = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.fp32_precision = default


def test_fp32_precision_follows_pytorch(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    assert fp32_matmul_precision() == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert fp32_matmul_precision() == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert fp32_matmul_precision() == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"  # defers to the global setting
    torch.backends.fp32_precision = "tf32"
    assert fp32_matmul_precision() == "tf32"


def test_legacy_switches_are_honoured(restore_precision):
    torch.set_float32_matmul_precision("high")
    assert fp32_matmul_precision() == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert fp32_matmul_precision() == "ieee"


def test_operand_dtypes(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert dot_operand_dtypes(torch.float32, interpreter=False) == (torch.float32, torch.float32, "tf32")
    assert dot_operand_dtypes(torch.float32, interpreter=True) == (torch.float32, torch.float32, "ieee")
    assert dot_operand_dtypes(torch.bfloat16, interpreter=False) == (torch.bfloat16, torch.float32, "ieee")
    assert dot_operand_dtypes(torch.float16, interpreter=True) == (torch.float32, torch.float32, "ieee")
    assert dot_operand_dtypes(torch.float64, interpreter=False) == (torch.float64, torch.float64, "ieee")
