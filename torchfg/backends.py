"""Backend discovery and dispatch.

Every op in :mod:`torchfg.ops` takes ``backend="auto" | "torch" | "triton" | "cuda"``:

* ``"torch"``: the chunked pure-PyTorch reference (any device; the ground truth).
* ``"triton"``: fused Triton kernels, for CUDA tensors. CPU tensors are accepted only
  under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks kernels.
* ``"cuda"``: kernels from ``csrc/`` compiled with ``torch.utils.cpp_extension``.
* ``"auto"``: the fastest backend that the op implements and that is available for
  the tensor's device (``cuda`` > ``triton`` > ``torch`` unless the op says otherwise).

The environment variable ``TORCHFG_BACKEND`` replaces ``"auto"`` globally: with
``TORCHFG_BACKEND=triton`` every op that has a Triton kernel runs it (and raises if
Triton is unavailable); ops without one use their reference. An explicit ``backend=``
argument other than ``"auto"`` always wins over the environment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import torch

from torchfg.errors import BackendUnavailableError

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "resolve_backend",
    "triton_status",
    "cuda_extension_status",
    "triton_interpreter_enabled",
]

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "TORCHFG_BACKEND"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'torchfg[triton]')"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break torchfg
        return False, f"triton failed to import: {exc!r}"
    return True, f"triton {triton.__version__}"


def triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device`` (any CUDA device if None), and why not."""
    ok, why = _triton_import_status()
    if not ok:
        return False, why
    if device is not None and device.type == "cpu":
        if triton_interpreter_enabled():
            return True, why + " (interpreter, TRITON_INTERPRET=1)"
        return False, "tensor is on the CPU; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if device is not None and device.type != "cuda":
        return False, f"Triton kernels do not support device type {device.type!r}"
    if not triton_interpreter_enabled() and not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, why


def cuda_extension_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the compiled ``csrc/`` extension can run on ``device``, and why not."""
    if device is not None and device.type != "cuda":
        return False, f"the CUDA extension needs a CUDA tensor, got device {device.type!r}"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    try:
        from torchfg.ops import _cuda_extension
    except ImportError:
        return False, "torchfg was installed without the CUDA extension sources"
    return _cuda_extension.status()


def _status(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "torch":
        return True, "pure PyTorch"
    if backend == "triton":
        return triton_status(device)
    if backend == "cuda":
        return cuda_extension_status(device)
    raise AssertionError(backend)


def resolve_backend(
    backend: str | None,
    device: torch.device,
    *,
    op: str,
    implemented: Sequence[str] = ("torch",),
    preference: Sequence[str] = ("cuda", "triton", "torch"),
) -> str:
    """Turn a user's ``backend`` argument into the concrete backend to run.

    Args:
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or None (= ``"auto"``).
        device: device of the op's inputs.
        op: op name, used in error messages.
        implemented: backends that this op has.
        preference: order tried by ``"auto"``; ``"torch"`` must be in it.

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: an explicitly requested backend cannot run here.
    """
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    from_env = False
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            backend, from_env = env, True
    if backend == "auto":
        for candidate in preference:
            if candidate in implemented and _status(candidate, device)[0]:
                # Interpreted Triton is for checking kernels, never a default.
                if candidate == "triton" and device.type == "cpu":
                    continue
                return candidate
        return "torch"
    if backend not in implemented:
        if from_env:
            return "torch"
        raise BackendUnavailableError(
            f"{op}: backend={backend!r} is not implemented for this op (it has {tuple(implemented)})"
        )
    ok, why = _status(backend, device)
    if not ok:
        source = f"{ENV_VAR}={backend}" if from_env else f"backend={backend!r}"
        raise BackendUnavailableError(f"{op}: {source} is unavailable: {why}")
    return backend
