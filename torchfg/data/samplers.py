"""Samplers for few-shot episodes and for P x K metric-learning batches.

Both are *batch* samplers: pass them to ``DataLoader(dataset, batch_sampler=...)``; each item they
yield is the list of dataset indices of one episode / batch.

Randomness: each sampler draws from a NumPy generator seeded with ``(seed, epoch)``, so a given
seed and epoch always give the same indices, and each epoch gives new ones. The epoch advances by
one after every full or partial iteration; ``set_epoch(e)`` sets it explicitly (as with
``DistributedSampler``). Call it when a run resumes from a checkpoint (a new process counts from
epoch 0 again); trainers that call ``set_epoch`` on a DataLoader's sampler do not reach a batch
sampler (PyTorch Lightning: see the multi-GPU how-to). With ``seed=None`` the base seed is drawn
once from torch's global RNG at construction, so ``torch.manual_seed`` makes runs reproducible too.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Sampler

from torchfg._validation import check_int, check_labels, check_tensor

__all__ = ["EpisodicSampler", "PKSampler", "split_episode"]

LabelsLike = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _labels_to_numpy(labels: object, name: str = "labels") -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        tensor = labels.detach().cpu()
    elif isinstance(labels, (np.ndarray, list, tuple, range)):
        try:
            array = np.asarray(labels)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be 1-D integer labels, could not convert: {exc}") from None
        if array.size == 0 and not isinstance(labels, np.ndarray):
            # NumPy makes an empty sequence float64; let the samplers' own empty check speak.
            array = array.astype(np.int64)
        if array.dtype.kind not in "biuf":  # strings, objects: torch cannot take them
            raise TypeError(
                f"{name} must be 1-D integer labels, got an array of {array.dtype}; map class names to "
                f"integers first, e.g. np.unique({name}, return_inverse=True)[1]"
            )
        tensor = torch.as_tensor(array)
    else:
        raise TypeError(f"{name} must be a 1-D integer tensor, array or sequence, got {type(labels).__name__}")
    return check_labels(tensor, name).numpy().astype(np.int64, copy=False)


def _resolve_seed(seed: object) -> int:
    if seed is None:
        return int(torch.empty((), dtype=torch.int64).random_().item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    # SeedSequence takes non-negative ints of any size; mapping negatives onto them would alias.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(seed)


def _group_by_class(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted classes and, per class, its dataset indices in ascending order."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return classes, np.split(order, starts[1:])


def _check_replicas(num_replicas: object, rank: object, seed: object) -> tuple[int, int]:
    """(num_replicas, rank) of a sampler sharded over ranks, checked."""
    num_replicas = check_int(num_replicas, "num_replicas", 1)
    rank = check_int(rank, "rank", 0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
    if num_replicas > 1 and seed is None:
        # A seed drawn per rank from torch's generator differs between ranks whose generators
        # differ, and their "disjoint" shares would then overlap without a sign.
        raise ValueError("seed must be given (the same int on every rank) when num_replicas > 1")
    return num_replicas, rank


class _EpochSeeded:
    """Base for samplers whose randomness is a function of (seed, epoch)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = _resolve_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s indices on the next iteration (then continue from ``epoch + 1``)."""
        self.epoch = check_int(epoch, "epoch", 0)

    def _next_rng(self) -> np.random.Generator:
        # SeedSequence mixes (seed, epoch) so that nearby seeds / epochs give unrelated streams.
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        self.epoch += 1
        return rng


class EpisodicSampler(_EpochSeeded, Sampler[list[int]]):
    """N-way K-shot episodes: yields, per episode, the dataset indices of support then query.

    Each episode picks ``n_way`` distinct classes and, in each, ``n_shot + n_query`` distinct items
    (without replacement). The yielded list has ``n_way * (n_shot + n_query)`` indices laid out
    class-major: first the support, ``n_shot`` items of class 0, then of class 1, ...; then the
    query, ``n_query`` items of class 0, then of class 1, ... (classes in the episode's random order).
    :func:`split_episode` cuts a batch in that layout back into support and query.

    Classes with fewer than ``n_shot + n_query`` items are skipped (with a warning).

    Args:
        labels: (N,) integer class label of every dataset item (tensor, array or sequence).
        n_way: classes per episode.
        n_shot: support items per class.
        n_query: query items per class (>= 0).
        n_episodes: episodes per iteration (= ``len(sampler)``; per rank when sharded).
        seed: base seed, an int >= 0 or None; see the module docstring for the per-epoch streams.
            Required (the same on every rank) when ``num_replicas > 1``.
        num_replicas: number of ranks sharing one stream of episodes (>= 1): rank ``r`` gets
            episodes ``r``, ``r + num_replicas``, ... of it, so ranks never repeat each other's
            episodes and each yields ``n_episodes``. Pass ``dist.get_world_size()``.
        rank: this rank's index, in ``[0, num_replicas)``; pass ``dist.get_rank()``.

    Raises:
        ValueError: fewer than ``n_way`` classes have ``n_shot + n_query`` items, ``seed`` < 0, or
            a sharded sampler without a seed.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> labels = torch.arange(10).repeat_interleave(20)          # 10 classes x 20 items
        >>> dataset = TensorDataset(torch.randn(200, 16), labels)
        >>> sampler = EpisodicSampler(labels, n_way=5, n_shot=1, n_query=15, n_episodes=3, seed=0)
        >>> for features, episode_labels in DataLoader(dataset, batch_sampler=sampler):
        ...     support, support_labels, query, query_labels = split_episode(
        ...         features, episode_labels, n_way=5, n_shot=1, n_query=15)
        >>> support.shape, query.shape
        (torch.Size([5, 16]), torch.Size([75, 16]))
    """

    def __init__(
        self,
        labels: LabelsLike,
        n_way: int,
        n_shot: int,
        n_query: int,
        n_episodes: int,
        *,
        seed: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        label_array = _labels_to_numpy(labels)
        self.n_way = check_int(n_way, "n_way", 1)
        self.n_shot = check_int(n_shot, "n_shot", 1)
        self.n_query = check_int(n_query, "n_query", 0)
        self.n_episodes = check_int(n_episodes, "n_episodes", 1)
        self.num_replicas, self.rank = _check_replicas(num_replicas, rank, seed)
        _EpochSeeded.__init__(self, seed)
        per_class = self.n_shot + self.n_query
        classes, members = _group_by_class(label_array)
        keep = [i for i, m in enumerate(members) if len(m) >= per_class]
        skipped = len(classes) - len(keep)
        if skipped:
            warnings.warn(
                f"EpisodicSampler: skipping {skipped} of {len(classes)} classes with fewer than "
                f"n_shot + n_query = {per_class} items",
                stacklevel=2,
            )
        if len(keep) < self.n_way:
            raise ValueError(
                f"EpisodicSampler: n_way={self.n_way} classes are needed per episode but only {len(keep)} "
                f"classes in labels have at least n_shot + n_query = {per_class} items"
            )
        self.classes = classes[keep]
        self._members = [members[i] for i in keep]

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._next_rng()
        # Every rank draws every episode of the shared stream (the generators stay in step) and
        # yields its own.
        for episode in range(self.n_episodes * self.num_replicas):
            chosen = rng.choice(len(self._members), size=self.n_way, replace=False)
            items = np.stack(
                [rng.choice(self._members[c], size=self.n_shot + self.n_query, replace=False) for c in chosen]
            )
            if episode % self.num_replicas == self.rank:
                yield items[:, : self.n_shot].reshape(-1).tolist() + items[:, self.n_shot :].reshape(-1).tolist()


def split_episode(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    n_shot: int,
    n_query: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut one episode in :class:`EpisodicSampler`'s layout into support and query.

    Args:
        embeddings: (n_way * (n_shot + n_query), ...) the episode's embeddings (or raw inputs).
        labels: (n_way * (n_shot + n_query),) their integer labels.
        n_way, n_shot, n_query: the sampler's episode shape.

    Returns:
        ``(support, support_labels, query, query_labels)`` with shapes (n_way * n_shot, ...),
        (n_way * n_shot,), (n_way * n_query, ...), (n_way * n_query,).

    Raises:
        ValueError: wrong sizes, or labels that do not follow the class-major layout (e.g. a
            ``DataLoader`` that reordered the batch).

    Example:
        >>> lab = torch.tensor([7, 3, 7, 7, 3, 3])  # 2-way 1-shot 2-query, class-major
        >>> emb = torch.randn(6, 4)
        >>> support, support_labels, query, query_labels = split_episode(emb, lab, 2, 1, 2)
        >>> support_labels.tolist(), query_labels.tolist()
        ([7, 3], [7, 7, 3, 3])
    """
    n_way = check_int(n_way, "n_way", 1)
    n_shot = check_int(n_shot, "n_shot", 1)
    n_query = check_int(n_query, "n_query", 0)
    embeddings = check_tensor(embeddings, "embeddings")
    labels = check_labels(labels, "labels")
    total = n_way * (n_shot + n_query)
    if embeddings.dim() == 0 or embeddings.shape[0] != total:
        raise ValueError(
            f"embeddings must have n_way * (n_shot + n_query) = {total} rows, got shape {tuple(embeddings.shape)}"
        )
    if labels.shape[0] != total:
        raise ValueError(f"labels must have n_way * (n_shot + n_query) = {total} entries, got {labels.shape[0]}")
    n_support = n_way * n_shot
    support_labels, query_labels = labels[:n_support], labels[n_support:]
    way_labels = support_labels.view(n_way, n_shot)[:, 0]
    layout_ok = (
        bool((support_labels.view(n_way, n_shot) == way_labels.unsqueeze(1)).all())
        and bool((query_labels.view(n_way, n_query) == way_labels.unsqueeze(1)).all())
        and torch.unique(way_labels).numel() == n_way
    )
    if not layout_ok:
        raise ValueError(
            "labels do not follow the EpisodicSampler layout (support then query, class-major, "
            f"{n_way} distinct classes); was the batch shuffled or n_way/n_shot/n_query wrong?"
        )
    return embeddings[:n_support], support_labels, embeddings[n_support:], query_labels


class _DistinctStream:
    """Draws groups of distinct values from a stream of concatenated random permutations.

    Every value appears once per permutation, so over many draws all values are used equally
    often (within one). A value already in the current group is deferred to the next draw.
    """

    def __init__(self, values: np.ndarray, rng: np.random.Generator) -> None:
        self.values = values
        self.rng = rng
        self.pending: deque[int] = deque()

    def take(self, n: int) -> list[int]:
        assert n <= len(self.values)
        chosen: list[int] = []
        seen: set[int] = set()
        deferred: list[int] = []
        while len(chosen) < n:
            if not self.pending:
                self.pending.extend(self.rng.permutation(self.values).tolist())
            value = self.pending.popleft()
            if value in seen:
                deferred.append(value)
            else:
                seen.add(value)
                chosen.append(value)
        self.pending.extendleft(reversed(deferred))
        return chosen


class PKSampler(_EpochSeeded, Sampler[list[int]]):
    """P x K batches: ``p`` distinct classes, ``k`` items of each (what batch-hard mining needs).

    Yields lists of ``p * k`` dataset indices, class-major (``k`` indices of the first class, then
    the next class, ...). Use it as ``DataLoader(dataset, batch_sampler=PKSampler(labels, p, k))``.

    * Batches per epoch: ``len(sampler) = num_batches``, by default ``max(1, N // (p * k))`` so one
      epoch yields about as many items as the dataset holds.
    * Classes are taken from a stream of random permutations of all classes, so within an epoch each
      class appears in the same number of batches (within one), whatever its size; a batch never
      repeats a class.
    * Items of a class come from a stream of random permutations of that class, so the class's
      items are used evenly and a batch holds ``k`` distinct items when the class has at least ``k``.
      A class with fewer than ``k`` items contributes all of its items once plus ``k - n_c`` drawn
      again with replacement (so a 1-item class gives ``k`` copies of it: positives at distance 0).

    Distributed training: pass ``num_replicas=dist.get_world_size(), rank=dist.get_rank()`` and the
    same ``seed`` on every rank. Every step then draws ``p * num_replicas`` distinct classes, and rank
    ``r`` gets classes ``r * p .. (r + 1) * p - 1`` of them with their ``k`` items: the ranks' batches
    never share a class within a step, so together (e.g. gathered by ``cross_rank=True`` mining) they
    form one P x K batch of ``p * num_replicas`` classes, and every rank yields the same number of
    batches (``max(1, N // (p * k * num_replicas))`` by default). With ``num_replicas=1`` the batches
    are those of the unsharded sampler.

    Args:
        labels: (N,) integer class label of every dataset item.
        p: classes per batch, at most the number of classes (``p * num_replicas`` when sharded).
        k: items per class (>= 1; batch-hard mining needs k >= 2).
        seed: base seed, an int >= 0 or None; see the module docstring for the per-epoch streams.
            Required (the same on every rank) when ``num_replicas > 1``.
        num_batches: batches per epoch (per rank), overriding the default above.
        num_replicas: number of ranks sharing the stream of batches (>= 1).
        rank: this rank's index, in ``[0, num_replicas)``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> train_labels = torch.arange(50).repeat_interleave(6)    # 50 classes x 6 items
        >>> train_set = TensorDataset(torch.randn(300, 16), train_labels)
        >>> sampler = PKSampler(train_labels, p=8, k=4, seed=0)
        >>> loader = DataLoader(train_set, batch_sampler=sampler)
        >>> for epoch in range(2):
        ...     sampler.set_epoch(epoch)
        ...     for features, labels in loader:
        ...         assert len(labels.unique()) == 8 and len(labels) == 32
    """

    def __init__(
        self,
        labels: LabelsLike,
        p: int,
        k: int,
        *,
        seed: int | None = None,
        num_batches: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        label_array = _labels_to_numpy(labels)
        self.p = check_int(p, "p", 1)
        self.k = check_int(k, "k", 1)
        self.num_replicas, self.rank = _check_replicas(num_replicas, rank, seed)
        if label_array.shape[0] == 0:
            raise ValueError("labels must not be empty")
        _EpochSeeded.__init__(self, seed)
        self.classes, self._members = _group_by_class(label_array)
        if self.p * self.num_replicas > len(self.classes):
            per_step = f"p * num_replicas = {self.p * self.num_replicas}" if self.num_replicas > 1 else f"p={self.p}"
            raise ValueError(f"{per_step} classes per batch, but labels hold only {len(self.classes)} classes")
        if num_batches is None:
            self.num_batches: int = max(1, label_array.shape[0] // (self.p * self.k * self.num_replicas))
        else:
            self.num_batches = check_int(num_batches, "num_batches", 1)

    @property
    def batch_size(self) -> int:
        """Items per batch on this rank, ``p * k``."""
        return self.p * self.k

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._next_rng()
        class_stream = _DistinctStream(np.arange(len(self.classes)), rng)
        item_streams: dict[int, _DistinctStream] = {}
        # Every rank draws the whole step (all ranks' classes and items, in order) so that the
        # generators stay in step, and keeps its own slice.
        first, last = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in class_stream.take(self.p * self.num_replicas):
                members = self._members[c]
                if len(members) >= self.k:
                    stream = item_streams.get(c)
                    if stream is None:
                        stream = item_streams[c] = _DistinctStream(members, rng)
                    batch.extend(stream.take(self.k))
                else:
                    batch.extend(members.tolist())
                    batch.extend(rng.choice(members, size=self.k - len(members), replace=True).tolist())
            yield batch[first:last]
