"""Shared pieces of the Triton launchers (imported only by ``ops/<op>/triton.py``, which need triton)."""

from __future__ import annotations

import torch
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops.precision import dot_operand_dtypes

__all__ = ["TL_DTYPES", "dot_dtypes"]

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def dot_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype, str]:
    """(``tl.dot`` operand dtype, accumulation dtype, input precision) under the TF32 policy of
    :mod:`torchfg.ops.precision`."""
    operand, acc, precision = dot_operand_dtypes(dtype, interpreter=triton_interpreter_enabled())
    return TL_DTYPES[operand], TL_DTYPES[acc], precision
