"""The distance metrics every op shares: names, kernel codes and the zero-safe row statistics.

One table so that the references, the Triton and CUDA kernels and the public functions agree on
what ``metric="cosine"`` means. All metrics are dissimilarities (smaller = closer):

* ``"sqeuclidean"``: ``|a - b|^2``;
* ``"euclidean"``: ``|a - b|`` (gradient 0, not NaN, at a zero distance);
* ``"cosine"``: ``1 - cos(a, b)``, where a zero row has cosine 0 to everything;
* ``"dot"``: ``-a.b``, the negative inner product.
"""

from __future__ import annotations

import torch

__all__ = [
    "METRICS",
    "METRIC_CODES",
    "DEFAULT_METRIC",
    "metric_code",
    "safe_inverse",
    "inverse_norms",
    "unit_rows",
    "nonzero_rows",
    "unit_and_nonzero_rows",
    "row_statistics",
]

METRICS = ("sqeuclidean", "euclidean", "cosine", "dot")
# The integer each kernel receives as its METRIC constexpr (the order of METRICS).
METRIC_CODES = {name: code for code, name in enumerate(METRICS)}
# The default of every function whose math is a plain distance between embeddings (losses, miners,
# mining ops, pairwise distances). Two other families keep their field's convention, each the same
# everywhere in it: searches (knn, retrieval metrics) default to "cosine", prototype logits
# (few-shot) to "sqeuclidean" (Snell et al.).
DEFAULT_METRIC = "euclidean"


def metric_code(metric: str) -> int:
    """The kernels' integer code of ``metric`` (validated by the caller)."""
    return METRIC_CODES[metric]


def safe_inverse(norm: torch.Tensor) -> torch.Tensor:
    """``1 / norm`` elementwise, and 0 where ``norm`` is 0: a zero row has cosine 0 to everything."""
    return torch.where(norm > 0, 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))


def inverse_norms(x: torch.Tensor, dtype: torch.dtype, *, keepdim: bool = False) -> torch.Tensor:
    """(R, D) -> (R,) (or (R, 1)) zero-safe inverse row norms computed in ``dtype``."""
    return safe_inverse(torch.linalg.vector_norm(x, dim=-1, keepdim=keepdim, dtype=dtype))


def unit_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, D) rows scaled to unit norm in ``dtype``; a zero row stays zero."""
    x = x.to(dtype)
    return x * inverse_norms(x, dtype, keepdim=True)


def unit_and_nonzero_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, D) -> (unit rows (R, D) in ``dtype`` as :func:`unit_rows`, (R,) bool as :func:`nonzero_rows` of them).

    The mask comes from the inverse norms, O(R) instead of an (R, D) comparison: a row with a
    positive finite norm has an element of at least norm / sqrt(D), which scales to a non-zero
    unit element; a zero norm (a zero row, or one whose squares all underflow) gives a zero unit
    row. Rows must be finite (a NaN norm would count as zero).
    """
    x = x.to(dtype)
    inverse = inverse_norms(x, dtype, keepdim=True)
    return x * inverse, inverse.squeeze(1) > 0


def nonzero_rows(x: torch.Tensor) -> torch.Tensor:
    """(R, D) -> (R,) bool: rows with any non-zero element (none when D = 0, so every row of a
    zero-width matrix is a zero row, at cosine distance 1 from everything)."""
    return x.ne(0).any(dim=1)


def row_statistics(x: torch.Tensor, metric: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, D) -> (R,) what a GEMM-based kernel needs per row to finish a distance tile in ``dtype``.

    Inverse norms for ``"cosine"`` (0 for a zero row), squared norms for the Euclidean metrics
    (summed squares: a sqrt-then-square would add a rounding step). ``"dot"`` needs none.
    """
    if metric == "cosine":
        return inverse_norms(x, dtype)
    return x.to(dtype).square().sum(1)
