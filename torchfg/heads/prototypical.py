"""Prototypical few-shot classification head (nearest class mean in embedding space)."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Optional, Union

import torch
from torch import nn

from torchfg._validation import check_bool, check_choice, check_positive
from torchfg.backends import check_backend
from torchfg.errors import NotFittedError
from torchfg.ops.metric import METRICS
from torchfg.functional.fewshot import class_prototypes, prototype_logits

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = ["PrototypicalHead"]

_FITTED_STATE = ("prototypes", "classes")

# One lock for every head: an episode's prototypes and classes are stored together and read
# together, so a thread's head(query) / predict never pairs one episode's logits with another
# episode's classes while a second thread fits. (Module-level: a lock attribute would make heads
# unpicklable.)
_STATE_LOCK = threading.Lock()


def _state_lock() -> contextlib.AbstractContextManager:
    # A compiled graph does not take Python locks; its tracing reads the buffers once anyway.
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _STATE_LOCK


def _not_fitted(name: str) -> NotFittedError:
    return NotFittedError(
        f"PrototypicalHead.{name} is not set before the head is fitted: call "
        "head.fit(support, support_labels) or head(support, support_labels, query) first"
    )


class PrototypicalHead(nn.Module):
    """Classify queries by their distance to the mean support embedding of each class.

    Two ways to call it:

    * ``head(support, support_labels, query)``: one episode, differentiable w.r.t. ``support`` and
      ``query`` (episodic training). It also records the episode's prototypes and ``classes``.
    * ``head.fit(support, support_labels)`` once, then ``head(query)`` for as many query batches
      as needed (evaluation). ``fit`` stores *detached* prototypes, so gradients reach the query but
      not the support through this path; train with the three-argument form.

    The stored prototypes and classes are non-persistent buffers: they follow ``.to(device)`` but
    are not part of the ``state_dict`` (their shape depends on the episode). Reading ``classes`` or
    ``prototypes`` before the first ``fit`` or episode raises a ``ValueError`` (``hasattr(head,
    "classes")`` is False); ``n_way`` is 0 then.

    Args:
        metric: ``"sqeuclidean"`` (the original method), ``"euclidean"``, ``"cosine"`` (1 - cos) or
            ``"dot"`` (negative inner product).
        temperature: > 0; logits are ``-distance / temperature``.
        normalize: L2-normalise support and query embeddings first (prototypes are means of unit
            vectors, not re-normalised).
        backend: distance backend, see :func:`torchfg.pairwise_distance`.

    Raises:
        TypeError: ``normalize`` is not a bool.
        ValueError: unknown ``metric`` or ``backend``, or ``temperature`` out of range.

    Shapes:
        support (S, D), support_labels (S,) arbitrary integers, query (Q, D) -> logits (Q, C) with
        C = number of distinct support labels; column ``c`` is class ``head.classes[c]``.

    Example:
        >>> head = PrototypicalHead()
        >>> support = torch.randn(10, 32)
        >>> support_labels = torch.tensor([4, 4, 9, 9, 1, 1, 7, 7, 3, 3])
        >>> logits = head(support, support_labels, torch.randn(6, 32))  # (6, 5)
        >>> head.classes.tolist()
        [1, 3, 4, 7, 9]
        >>> predictions = head.predict(torch.randn(6, 32))  # original labels, (6,)
    """

    def __init__(
        self,
        metric: str = "sqeuclidean",
        *,
        temperature: float = 1.0,
        normalize: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.metric = check_choice(metric, "metric", METRICS)
        self.temperature = check_positive(temperature, "temperature", reciprocal=True)
        self.normalize = check_bool(normalize, "normalize")
        # Checked here, not only at the first forward, so a typo fails where it is written.
        self.backend = check_backend(backend, "pairwise_distance")
        self.register_buffer("prototypes", None, persistent=False)
        self.register_buffer("classes", None, persistent=False)

    # Properties over the buffers, not Optional attributes: code written after fit, as in the docs
    # (torch.searchsorted(head.classes, labels)), type-checks without a None check, and reading
    # them too early names the cause instead of failing on None further on. They stay buffers
    # (nn.Module.__setattr__ assigns into _buffers, never through the property), so .to(),
    # deepcopy, pickling, functional_call and the state_dict treat them as before. The error is an
    # AttributeError too because nn.Module.__setattr__ probes hasattr(self, name) when a buffer
    # is assigned: any other exception there would break fit and functional_call on an unfitted head.

    @property
    def classes(self) -> torch.Tensor:
        """(C,) sorted distinct support labels of the last ``fit`` or episode; column ``c`` of the
        logits is class ``classes[c]``.

        Raises:
            NotFittedError: (a ``ValueError`` and an ``AttributeError``) no ``fit`` nor episode yet.
        """
        return self._fitted("classes")

    @classes.setter
    def classes(self, value: torch.Tensor) -> None:
        # nn.Module.__setattr__ stores into the registered buffer without reaching this setter;
        # it is here for type checkers (an assignment to the attribute was allowed before).
        self.register_buffer("classes", value, persistent=False)

    @property
    def prototypes(self) -> torch.Tensor:
        """(C, D) detached mean support embedding of each class, in the order of ``classes``.

        Raises:
            NotFittedError: (a ``ValueError`` and an ``AttributeError``) no ``fit`` nor episode yet.
        """
        return self._fitted("prototypes")

    @prototypes.setter
    def prototypes(self, value: torch.Tensor) -> None:
        self.register_buffer("prototypes", value, persistent=False)  # as classes' setter

    def _fitted(self, name: str) -> torch.Tensor:
        value = self._buffers.get(name)
        if value is None:
            raise _not_fitted(name)
        return value

    def __getattr__(self, name: str) -> Union[torch.Tensor, nn.Module]:
        # Python calls this when a property raised an AttributeError; nn.Module's own would return
        # the buffer's None (or, while it is being registered, replace the message).
        if name in _FITTED_STATE:
            raise _not_fitted(name)
        return super().__getattr__(name)

    @property
    def n_way(self) -> int:
        """Number of classes of the fitted prototypes (0 before ``fit``)."""
        classes = self._buffers["classes"]
        return 0 if classes is None else int(classes.shape[0])

    def fit(self, support: torch.Tensor, support_labels: torch.Tensor) -> Self:
        """Compute and store (detached) prototypes and sorted classes; returns ``self``.

        Args:
            support: (S, D) support embeddings, S >= 1.
            support_labels: (S,) integer labels.
        """
        prototypes, classes = class_prototypes(support, support_labels, normalize=self.normalize)
        self._record(prototypes, classes)
        return self

    def _record(self, prototypes: torch.Tensor, classes: torch.Tensor) -> None:
        if torch.is_inference_mode_enabled():
            # Fitted under inference mode (an evaluation loop), the buffers would be inference
            # tensors, which a later differentiable head(query) could not save for backward.
            with torch.inference_mode(False):
                prototypes, classes = prototypes.clone(), classes.clone()
        with _state_lock():
            self.prototypes = prototypes.detach()
            self.classes = classes

    def _logits(self, query: torch.Tensor, prototypes: Optional[torch.Tensor]) -> torch.Tensor:
        if prototypes is None or prototypes.shape[0] == 0:
            raise ValueError(
                "PrototypicalHead has 0 classes: pass support and support_labels, i.e. "
                "head(support, support_labels, query), or call head.fit(support, support_labels) first"
            )
        return prototype_logits(
            query,
            prototypes,
            metric=self.metric,
            temperature=self.temperature,
            normalize=self.normalize,
            backend=self.backend,
        )

    def forward(
        self,
        support_or_query: torch.Tensor,
        support_labels: Optional[torch.Tensor] = None,
        query: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``forward(support, support_labels, query)`` or ``forward(query)`` after :meth:`fit`.

        Returns:
            (Q, C) logits, columns in the order of ``self.classes``.
        """
        return self._logits_and_classes(support_or_query, support_labels, query)[0]

    def _logits_and_classes(
        self, support_or_query: torch.Tensor, support_labels: Optional[torch.Tensor], query: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits (Q, C), classes (C,)) of this call's own prototypes, whatever another thread
        records meanwhile."""
        if support_labels is None and query is None:
            with _state_lock():
                # The buffers themselves: None before fit, for _logits' own error.
                prototypes, classes = self._buffers["prototypes"], self._buffers["classes"]
            return self._logits(support_or_query, prototypes), classes
        if support_labels is None or query is None:
            missing = "support_labels" if support_labels is None else "query"
            raise ValueError(
                f"PrototypicalHead: {missing} is missing; call head(support, support_labels, query) "
                "or head(query) after head.fit(support, support_labels)"
            )
        prototypes, classes = class_prototypes(support_or_query, support_labels, normalize=self.normalize)
        self._record(prototypes, classes)
        return self._logits(query, prototypes), classes

    @torch.no_grad()
    def predict(
        self,
        support_or_query: torch.Tensor,
        support_labels: Optional[torch.Tensor] = None,
        query: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predicted original labels, (Q,): same arguments as :meth:`forward`.

        Raises ValueError where a logit is not finite (a NaN or inf embedding, or distances past the
        dtype's range): argmax would still name a class.
        """
        logits, classes = self._logits_and_classes(support_or_query, support_labels, query)
        assert classes is not None
        bad_rows = (~logits.isfinite()).any(dim=1)
        if bool(bad_rows.any()):
            raise ValueError(
                f"the logits of {int(bad_rows.sum())} of {logits.shape[0]} queries are not finite: the support "
                "or query embeddings hold NaN or inf (or their distances overflow)"
            )
        return classes[logits.argmax(dim=1)]

    def extra_repr(self) -> str:
        return (
            f"metric={self.metric!r}, temperature={self.temperature}, normalize={self.normalize}, "
            f"n_way={self.n_way}, backend={self.backend!r}"
        )
