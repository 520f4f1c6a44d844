"""Shared pieces of the Triton launchers (imported only by ``ops/<op>/triton.py``, which need triton)."""

from __future__ import annotations

import math
import struct

import torch
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops.precision import dot_operand_dtypes

__all__ = ["TL_DTYPES", "dot_dtypes", "split_scalar"]

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def dot_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype, str]:
    """(``tl.dot`` operand dtype, accumulation dtype, input precision) under the TF32 policy of
    :mod:`torchfg.ops.precision`."""
    operand, acc, precision = dot_operand_dtypes(dtype, interpreter=triton_interpreter_enabled())
    return TL_DTYPES[operand], TL_DTYPES[acc], precision


def split_scalar(value: float) -> tuple[float, float]:
    """``value`` as ``(hi, lo)``, two float32 numbers whose sum is ``value`` to about 48 bits.

    A Python float reaches a compiled Triton kernel as fp32 (the interpreter keeps fp64): an fp64
    loss's margin of 0.4 became 0.4000000059604645 on the H200, 6e-9 off. A kernel that computes
    in fp64 rebuilds it as ``tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)``; in fp32 the sum
    rounds back to ``hi``, the value it had before. Past fp32's range it is ``(+-inf, 0)``.
    """
    value = float(value)
    if not math.isfinite(value):
        return value, 0.0
    try:
        hi = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # past fp32's range (some Pythons raise, others round to inf)
        return math.copysign(math.inf, value), 0.0
    lo = value - hi
    return hi, struct.unpack("f", struct.pack("f", lo))[0] if math.isfinite(lo) else 0.0
