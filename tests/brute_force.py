"""Distances by explicit loops / differences in fp64: the brute force the tests hold every path to."""

from __future__ import annotations

import torch


def exact_distances(a: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, M) distances in fp64 from explicit differences / normalised rows."""
    a, c = a.double(), c.double()
    if metric in ("euclidean", "sqeuclidean"):
        sq = (a[:, None, :] - c[None, :, :]).square().sum(-1)
        return sq.sqrt() if metric == "euclidean" else sq
    if metric == "dot":
        return -(a @ c.T)
    return 1.0 - cosine_matrix(a, c)


def cosine_matrix(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    a, c = a.double(), c.double()
    norms = a.norm(dim=1)[:, None] * c.norm(dim=1)[None, :]
    return torch.where(norms > 0, (a @ c.T) / norms.clamp_min(1e-300), torch.zeros_like(norms))
