"""Few-shot accuracy over episodes, with the 95% confidence interval reported in the literature."""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from torchfg._validation import check_labels

__all__ = ["few_shot_accuracy"]

EpisodeResults = Union[
    Sequence[tuple[torch.Tensor, torch.Tensor]],
    torch.Tensor,
    np.ndarray,
    Sequence[float],
    Sequence[int],
]


def _episode_accuracy(index: int, logits: object, labels: object) -> float:
    name = f"results[{index}]"
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a (logits, labels) pair of tensors")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"{name}: logits must have shape (Q, C) with Q, C >= 1, got {tuple(logits.shape)}")
    labels = check_labels(labels, f"{name}: labels", logits.shape[0])
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"{name}: labels must be column indices in [0, {logits.shape[1]}) of the logits")
    nan_rows = int(logits.isnan().any(dim=1).sum())
    if nan_rows:
        # argmax takes a NaN as the maximum: a diverged embedder would score a plausible accuracy.
        raise ValueError(f"{name}: logits hold NaN in {nan_rows} of {logits.shape[0]} rows (non-finite embeddings?)")
    correct = (logits.argmax(dim=1) == labels.to(logits.device)).sum().item()
    return correct / logits.shape[0]


def check_ddof(ddof: object) -> int:
    """``ddof`` of the confidence interval's std: 0 (population) or 1 (sample)."""
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    return 1 if ddof == 1 else 0


def few_shot_accuracy(
    results: EpisodeResults,
    *,
    n_per_episode: Union[int, Sequence[int], torch.Tensor, None] = None,
    ddof: int = 1,
) -> tuple[float, float]:
    """Mean accuracy over episodes and its 95% confidence half-width.

    ``ci95 = 1.96 * std(acc) / sqrt(n_episodes)``, the normal-approximation interval that
    miniImageNet / tieredImageNet / CUB few-shot results report as ``mean +- ci95``.

    Which std: by default the *sample* standard deviation (``ddof=1``, Bessel-corrected), because
    the interval estimates the standard error of the mean from the episodes themselves, and the
    sample std is the usual estimator for that. Many reference implementations call ``np.std``,
    i.e. the population std (``ddof=0``); pass ``ddof=0`` to reproduce them exactly. The two differ
    by a factor ``sqrt(n / (n - 1))``: 1.0008 for 600 episodes, far below the reported precision.

    Args:
        results: one of

            * a sequence of ``(logits, labels)`` pairs, one per episode: logits (Q, C) and labels
              (Q,) integer column indices (e.g. the position of the query's class in the head's
              ``classes``); an episode's accuracy is the fraction of rows whose argmax equals the label;
            * per-episode accuracies: a 1-D floating tensor / array / sequence of floats in [0, 1];
            * per-episode correct counts: a 1-D integer tensor / array / sequence, with
              ``n_per_episode`` (queries per episode, an int or one per episode).
        n_per_episode: required with correct counts, rejected otherwise.
        ddof: 1 (sample std, default) or 0 (population std, ``np.std``).

    Returns:
        ``(mean, ci95)`` as Python floats, fractions in [0, 1] (multiply by 100 for percent).

    Raises:
        ValueError: fewer than 2 episodes (no confidence interval), accuracies outside [0, 1],
            counts above ``n_per_episode``, malformed pairs, NaN logits.

    Example:
        >>> few_shot_accuracy(torch.tensor([0.5, 0.75, 1.0, 0.75]))  # doctest: +ELLIPSIS
        (0.75, 0.2000...)
        >>> few_shot_accuracy([2, 3, 4, 3], n_per_episode=4)  # doctest: +ELLIPSIS
        (0.75, 0.2000...)
    """
    check_ddof(ddof)
    if isinstance(results, (str, bytes)) or not isinstance(results, (torch.Tensor, np.ndarray, Sequence)):
        raise TypeError(
            "results must be a sequence of (logits, labels) pairs, or per-episode accuracies / correct "
            f"counts as a 1-D tensor, array or sequence, got {type(results).__name__}"
        )
    first = results[0] if isinstance(results, tuple) and len(results) == 2 else None
    if isinstance(first, torch.Tensor) and first.dim() == 2 and isinstance(results[1], torch.Tensor):
        # One episode's (logits, labels) pair itself, not a sequence of them (it read as two accuracies).
        raise ValueError("results must be a sequence of (logits, labels) pairs, one per episode (at least 2), "
                         "got one (logits, labels) pair: pass [(logits, labels), ...]")
    is_pairs = (
        not isinstance(results, (torch.Tensor, np.ndarray))
        and len(results) > 0
        and isinstance(results[0], (tuple, list))
    )
    if is_pairs:
        if n_per_episode is not None:
            raise ValueError("n_per_episode is only used with correct counts, not with (logits, labels) pairs")
        for i, pair in enumerate(results):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"results[{i}] must be a (logits, labels) pair")
        accuracies = np.array([_episode_accuracy(i, *pair) for i, pair in enumerate(results)], dtype=np.float64)
    else:
        values = results.detach().cpu() if isinstance(results, torch.Tensor) else torch.as_tensor(np.asarray(results))
        if values.dim() != 1:
            raise ValueError(f"results must be 1-D (one value per episode), got shape {tuple(values.shape)}")
        if values.dtype == torch.bool or values.dtype.is_complex:
            raise TypeError(f"results must hold accuracies (float) or correct counts (int), got {values.dtype}")
        if values.dtype.is_floating_point:
            if n_per_episode is not None:
                raise ValueError(
                    "n_per_episode is only used with integer correct counts; results holds floats "
                    "(taken as accuracies in [0, 1])"
                )
            accuracies = values.to(torch.float64).numpy()
            if not np.all((accuracies >= 0) & (accuracies <= 1)):  # also rejects NaN
                raise ValueError("results: per-episode accuracies must lie in [0, 1] (pass fractions, not percent)")
        else:
            if n_per_episode is None:
                raise ValueError("n_per_episode is required when results holds integer correct counts")
            counts = values.to(torch.float64).numpy()
            totals = np.asarray(
                n_per_episode.detach().cpu().numpy() if isinstance(n_per_episode, torch.Tensor) else n_per_episode
            )
            if totals.dtype.kind not in "iu" or totals.ndim > 1:
                raise TypeError("n_per_episode must be an int or 1-D integers (queries per episode)")
            totals = np.broadcast_to(totals, counts.shape) if totals.ndim == 0 else totals
            if totals.shape != counts.shape:
                raise ValueError(f"n_per_episode must have {counts.shape[0]} entries, got {totals.shape[0]}")
            if np.any(totals <= 0):
                raise ValueError("n_per_episode must be >= 1")
            if np.any(counts < 0) or np.any(counts > totals):
                raise ValueError("results: correct counts must lie in [0, n_per_episode]")
            accuracies = counts / totals
    n_episodes = accuracies.shape[0]
    if n_episodes < 2:
        raise ValueError(f"results must cover at least 2 episodes for a confidence interval, got {n_episodes}")
    mean = float(accuracies.mean())
    std = float(accuracies.std(ddof=ddof))
    return mean, 1.96 * std / math.sqrt(n_episodes)
