"""Exceptions of torchfg (a leaf module: it imports nothing from torchfg)."""

from __future__ import annotations

__all__ = ["BackendUnavailableError", "ExtensionBuildError"]


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


class ExtensionBuildError(BackendUnavailableError):
    """The CUDA extension could not be built or loaded; the message carries the reason."""
