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


def backends_to_test() -> list[str]:
    """Backends that can run on TEST_DEVICE: torch always, triton when importable."""
    return ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.fixture
def device() -> torch.device:
    return TEST_DEVICE
