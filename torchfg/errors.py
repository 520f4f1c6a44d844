"""Exceptions of torchfg (a leaf module: it imports nothing from torchfg)."""

from __future__ import annotations

__all__ = ["BackendUnavailableError", "ExtensionBuildError", "NotFittedError"]


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


class ExtensionBuildError(BackendUnavailableError):
    """The CUDA extension could not be built or loaded; the message carries the reason."""


class NotFittedError(ValueError, AttributeError):
    """A fitted attribute (``PrototypicalHead.classes`` / ``.prototypes``) read before ``fit``.

    A ``ValueError``, as the head's other unfitted use (``head(query)`` before ``fit``), and an
    ``AttributeError``, so that ``hasattr(head, "classes")`` and ``getattr(head, "classes", None)``
    say whether it is fitted (and ``nn.Module``'s ``hasattr`` probe on buffer assignment works).
    """
