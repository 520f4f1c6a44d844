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


def backends_to_test() -> list[str]:
    """Backends that can run on TEST_DEVICE: torch always, triton when importable."""
    return ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE
