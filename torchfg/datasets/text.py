"""A deterministic hashed bag-of-words text encoder: a *stand-in* for a real text encoder.

Methods that use weak text labels (e.g. the adaptive triplet loss, whose margin grows with the
distance between product descriptions) need one embedding per description. In practice that
comes from a pretrained sentence encoder (a sentence-transformer, CLIP's text tower, ...).
:class:`HashedBagOfWordsEncoder` needs no download and no training: each word is hashed to one
of ``dim`` buckets with a random sign, counts are summed and the vector is L2-normalised. The
cosine similarity of two embeddings then approximately counts the words the texts share, which
is exactly the semantic distance the synthetic product descriptions carry, but it knows nothing
about synonyms, word order or meaning. Swap in a real encoder for real data.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Sequence

import torch

__all__ = ["DEFAULT_STOPWORDS", "HashedBagOfWordsEncoder"]

DEFAULT_STOPWORDS: frozenset[str] = frozenset({"a", "an", "and", "in", "of", "on", "the", "with"})
"""Words ignored by default: they occur in every description and carry no attribute."""

_TOKEN = re.compile(r"[a-z0-9]+")


class HashedBagOfWordsEncoder:
    """Turns texts into fixed-size, L2-normalised float embeddings by signed feature hashing.

    Each lower-cased alphanumeric token (stopwords removed) adds ``+1`` or ``-1`` to one of ``dim``
    buckets; bucket and sign come from BLAKE2b of ``"<seed>:<token>"`` (not Python's per-process
    salted ``hash()``), so embeddings are identical across processes and machines. The random sign
    makes colliding words cancel in expectation instead of always adding up.

    This is a stand-in for a real text encoder (e.g. a sentence-transformer): it measures word
    overlap, not meaning.

    Args:
        dim: embedding size (>= 1). Larger means fewer hash collisions between different words.
        seed: selects the hash function family (int >= 0).
        stopwords: tokens to ignore.
        dtype: dtype of the returned embeddings.

    Example:
        >>> enc = HashedBagOfWordsEncoder(dim=128)
        >>> e = enc(["red striped shirt with white collar", "red plain shirt with white collar"])
        >>> e.shape
        torch.Size([2, 128])
        >>> round(float(e[0] @ e[1]), 2)  # 4 of 5 content words shared (no collision here): 4 / 5
        0.8
    """

    def __init__(
        self,
        dim: int = 128,
        *,
        seed: int = 0,
        stopwords: Iterable[str] = DEFAULT_STOPWORDS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if isinstance(stopwords, str):
            raise TypeError("stopwords must be an iterable of words, not a single str")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.dim = dim
        self.seed = seed
        self.stopwords = frozenset(w.lower() for w in stopwords)
        self.dtype = dtype
        self._buckets: dict[str, tuple[int, float]] = {}

    def tokenize(self, text: str) -> list[str]:
        """Lower-cased alphanumeric tokens of ``text`` without stopwords, in order."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [t for t in _TOKEN.findall(text.lower()) if t not in self.stopwords]

    def bucket(self, token: str) -> tuple[int, float]:
        """``(index, sign)`` of one token: where and with which sign it is counted."""
        cached = self._buckets.get(token)
        if cached is None:
            digest = hashlib.blake2b(f"{self.seed}:{token}".encode(), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            cached = (value % self.dim, 1.0 if (value >> 63) & 1 else -1.0)
            self._buckets[token] = cached
        return cached

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts``: ``(N, dim)`` for a sequence of N strings, ``(dim,)`` for one string.

        Rows have unit L2 norm, except that a text whose signed counts are all zero maps to the
        zero vector (rather than NaN): one without any non-stopword token, and also one whose tokens
        cancel, i.e. tokens hashed to the same bucket with opposite signs in equal numbers (with
        ``seed=0``, "aa aj" at ``dim=128``; any two words of opposite sign at ``dim=1``).
        """
        single = isinstance(texts, str)
        if single:
            batch: Sequence[str] = [texts]  # type: ignore[list-item]
        elif isinstance(texts, Sequence):
            batch = texts
        else:
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        counts = torch.zeros(len(batch), self.dim, dtype=torch.float64)
        for row, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be a str, got {type(text).__name__}")
            for token in self.tokenize(text):
                index, sign = self.bucket(token)
                counts[row, index] += sign
        norms = counts.norm(dim=1, keepdim=True)
        embeddings = torch.where(norms > 0, counts / norms.clamp_min(1e-12), counts).to(self.dtype)
        return embeddings[0] if single else embeddings

    __call__ = encode

    def __repr__(self) -> str:
        return f"HashedBagOfWordsEncoder(dim={self.dim}, seed={self.seed}, stopwords={len(self.stopwords)})"
