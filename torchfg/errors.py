"""Exceptions of torchfg (a leaf module: it imports nothing from torchfg)."""

from __future__ import annotations

import torch

__all__ = ["BackendUnavailableError", "ExtensionBuildError", "NotFittedError", "TripletMemoryError", "TripletOutOfMemoryError"]


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


class TripletMemoryError(RuntimeError):
    """The triplets asked for do not fit in memory; the message says how many and what to do."""


class TripletOutOfMemoryError(TripletMemoryError, torch.OutOfMemoryError):
    """:class:`TripletMemoryError` for a device whose allocator raises ``torch.OutOfMemoryError``
    (CUDA): handlers written for an out-of-memory error still catch it."""
