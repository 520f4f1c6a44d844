"""Shared test set-up: Triton's interpreter on CPU machines, hypothesis profiles, markers."""

from __future__ import annotations

import os

# Must be set before triton is imported anywhere: kernels then run on CPU tensors.
if not os.environ.get("TORCHFG_TEST_NO_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover
        pass

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=12,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

from torchfg.backends import triton_status  # noqa: E402

TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK, TRITON_WHY = triton_status(TEST_DEVICE)

requires_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend unavailable: {TRITON_WHY}")


def _interpreter_maxnum_is_ieee() -> bool:
    """Whether Triton's default ``tl.maximum`` (maxnum: a NaN operand loses) behaves as on a GPU.

    triton 3.6's interpreter computes it with ``np.maximum``, which propagates NaN (3.9's uses
    ``np.fmax``), so the kernels' NaN-candidate rules cannot be checked under that interpreter.
    """
    if not TRITON_OK or TEST_DEVICE.type != "cpu":
        return True
    import triton
    import triton.language as tl

    @triton.jit
    def _maxnum(x_ptr, out_ptr):
        offsets = tl.arange(0, 2)
        tl.store(out_ptr + offsets, tl.maximum(tl.load(x_ptr + offsets), 1.0))

    out = torch.zeros(2)
    _maxnum[(1,)](torch.tensor([float("nan"), 0.0]), out)
    return bool((out == 1.0).all())


INTERPRETER_MAXNUM_OK = _interpreter_maxnum_is_ieee()
requires_gpu_nan_semantics = pytest.mark.skipif(
    not INTERPRETER_MAXNUM_OK,
    reason="this Triton interpreter's maxnum propagates NaN (np.maximum), unlike a GPU: NaN-candidate rules untestable",
)


def _compiled_argmax_patch():
    """(ReduceOps class, the argmax combine functions) of this interpreter, or None."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    names = ("_argmax_combine_tie_break_left", "_argmax_combine_tie_break_fast")
    combines = tuple(getattr(tl.standard, name) for name in names if hasattr(tl.standard, name))
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    if not combines or reduce_ops is None or not all(hasattr(reduce_ops, a) for a in ("apply_impl", "to_tensor")):
        return None
    return reduce_ops, combines


def folded_argmax(data, axis: int):
    """(values, indices) of an argmax that folds ``value1 > value2 or (equal and index1 < index2)``
    left to right along ``axis``: a NaN on the right wins, and the next element then wins over it.
    So the result is the first maximum after the last NaN, or that NaN when it is the last element."""
    import numpy as np

    x = np.moveaxis(np.asarray(data), axis, -1)
    n = x.shape[-1]
    positions = np.arange(n)
    nan = np.isnan(x) if np.issubdtype(x.dtype, np.floating) else np.zeros(x.shape, dtype=bool)
    last_nan = np.where(nan, positions, -1).max(-1)
    after = positions > last_nan[..., None]
    masked = np.where(after, x, np.array(-np.inf, dtype=x.dtype) if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min)
    indices = masked.argmax(-1)
    # Nothing above -inf after the last NaN (or nothing after it): its first element won.
    flat = masked.max(-1) == masked.min(-1)
    indices = np.where(flat, np.minimum(last_nan + 1, n - 1), indices)
    values = np.take_along_axis(x, indices[..., None], -1)[..., 0]
    return values, indices


@pytest.fixture
def compiled_argmax(monkeypatch):
    """``tl.max(..., return_indices=True)`` as a compiled kernel folds it.

    The interpreter takes np.nanmax / np.nanargmax, which skip NaN. A GPU folds the elements with
    the combine function (``value1 > value2 or tie``), under which a NaN on the right wins: a NaN
    key at the end of a tile became the tile's maximum, and every other candidate of the tile was
    dropped. Here the interpreter folds left to right with those semantics (vectorised: see
    :func:`folded_argmax`), one order a GPU thread may fold its elements in.
    """
    import numpy as np
    import triton.language as tl

    patch = _compiled_argmax_patch()
    if patch is None:
        pytest.skip("this Triton interpreter's ReduceOps cannot be patched to fold argmax")
    reduce_ops, combines = patch
    original = reduce_ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn not in combines:
            return original(self, input)
        data = input[0] if isinstance(input, tuple) else input
        values, indices = folded_argmax(data.handle.data, self.axis)
        if self.keep_dims:
            values, indices = np.expand_dims(values, self.axis), np.expand_dims(indices, self.axis)
        return (self.to_tensor(np.asarray(values, dtype=data.handle.data.dtype), data.dtype),
                self.to_tensor(np.asarray(indices, dtype=np.int32), tl.int32))

    monkeypatch.setattr(reduce_ops, "apply_impl", apply_impl)


def backends_to_test() -> list[str]:
    """Backends that can run on TEST_DEVICE: torch always, triton when importable."""
    return ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE
