"""The standard few-shot evaluation protocol for a frozen embedder.

Embed every item once, then for each shot count draw ``n_episodes`` N-way K-shot episodes
(:class:`torchfg.data.EpisodicSampler`), classify the queries with a prototypical head and report
the mean accuracy with its 95% confidence interval (:func:`torchfg.metrics.few_shot_accuracy`), as
in miniImageNet / CUB few-shot results.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchfg._validation import check_bool, check_choice, check_labels
from torchfg.data.samplers import EpisodicSampler
from torchfg.backends import check_backend
from torchfg.metrics.fewshot import check_ddof, few_shot_accuracy
from torchfg.ops.metric import METRICS
from torchfg.ops.pairwise import pairwise_distance
from torchfg._validation import check_int as _check_int

__all__ = ["evaluate", "embed_dataset"]

EmbedFn = Callable[[Any], torch.Tensor]
DatasetOrTensors = Union[Dataset[Any], tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]

# Episodes are evaluated in chunks whose gathered embeddings stay under this many elements (~64 MiB fp32).
_CHUNK_ELEMENTS = 1 << 24

# Seconds between redraws of a progress bar written to a pipe or log file.
_NON_TTY_INTERVAL_S = 30.0


def _progress_bar(iterable: Any, *, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar (imported only when one is asked for), or ``iterable`` itself when disabled.

    On a stream that is not a terminal (a pipe, a CI log) tqdm's redraws would pile up as repeated
    lines, so there the bar redraws at most every ``_NON_TTY_INTERVAL_S`` seconds.
    """
    if not enabled:
        return iterable
    import sys

    from tqdm.auto import tqdm

    stream = kwargs.setdefault("file", sys.stderr)
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", _NON_TTY_INTERVAL_S)
    return tqdm(iterable, **kwargs)


def _module_device(embed_fn: object) -> Optional[torch.device]:
    if isinstance(embed_fn, nn.Module):
        for parameter in embed_fn.parameters():
            return parameter.device
        for buffer in embed_fn.buffers():
            return buffer.device
    return None


def _batches(
    dataset_or_tensors: object, batch_size: int, num_workers: int
) -> tuple[Iterator[tuple[Any, torch.Tensor]], Optional[int]]:
    """(inputs, labels) batches and their number (None if unknown)."""
    if isinstance(dataset_or_tensors, (tuple, list)):
        if len(dataset_or_tensors) != 2:
            raise ValueError(
                f"dataset_or_tensors as a tuple must be (inputs, labels), got {len(dataset_or_tensors)} items"
            )
        inputs, labels = dataset_or_tensors
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"dataset_or_tensors[0] (inputs) must be a torch.Tensor, got {type(inputs).__name__}")
        labels = check_labels(labels, "dataset_or_tensors[1] (labels)")
        if inputs.dim() == 0 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"dataset_or_tensors: inputs and labels must have the same length, got inputs of shape "
                f"{tuple(inputs.shape)} and {labels.shape[0]} labels"
            )
        starts = range(0, labels.shape[0], batch_size)
        return ((inputs[s : s + batch_size], labels[s : s + batch_size]) for s in starts), len(starts)
    if isinstance(dataset_or_tensors, Dataset):
        loader = DataLoader(dataset_or_tensors, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        try:
            n_batches: Optional[int] = len(loader)
        except TypeError:  # an IterableDataset without __len__
            n_batches = None

        def from_loader() -> Iterator[tuple[Any, torch.Tensor]]:
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError(
                        "dataset_or_tensors: a Dataset must return (input, label, ...) tuples; "
                        f"a collated batch was a {type(batch).__name__}"
                    )
                yield batch[0], check_labels(batch[1], "dataset_or_tensors: the Dataset's labels")

        return from_loader(), n_batches
    raise TypeError(
        "dataset_or_tensors must be an (inputs, labels) tuple of tensors or a torch.utils.data.Dataset "
        f"returning (input, label, ...) tuples, got {type(dataset_or_tensors).__name__}"
    )


# id(submodule) -> [calls in progress that switched it to eval, its training flag before the first].
# Per submodule, not per model: overlapping calls on a model and on one of its submodules (say
# evaluate(model) in one thread and embed_dataset(model.backbone) in another) then share the
# saving of the flags they have in common.
_EVAL_CALLS: dict[int, list] = {}
_EVAL_CALLS_LOCK = threading.Lock()


@contextlib.contextmanager
def _eval_mode(embed_fn: object) -> Iterator[None]:
    """``embed_fn`` (a module) in eval mode for the block; its submodules' own flags come back after.

    Every submodule's flag: eval() is recursive, and so is train(), which would wake a BatchNorm or
    dropout the caller had frozen inside a model in training mode. Calls that overlap (threads
    evaluating one model, or a model and one of its submodules) share the saving: the first call
    to reach a submodule saves its flag and the last to leave it restores it, so a later call does
    not save the modes an earlier one switched off and leave the model in eval mode.
    """
    if not isinstance(embed_fn, nn.Module):
        yield
        return
    modules = list(embed_fn.modules())
    with _EVAL_CALLS_LOCK:
        for module in modules:
            entry = _EVAL_CALLS.get(id(module))
            if entry is None:
                _EVAL_CALLS[id(module)] = [1, module.training]
            else:
                entry[0] += 1
    try:
        with _EVAL_CALLS_LOCK:
            embed_fn.eval()  # inside the try: an eval() override that raises must not leak the counts
        yield
    finally:
        with _EVAL_CALLS_LOCK:
            for module in modules:
                entry = _EVAL_CALLS[id(module)]
                entry[0] -= 1
                if entry[0] == 0:
                    del _EVAL_CALLS[id(module)]
                    module.training = entry[1]


@torch.no_grad()
def embed_dataset(
    embed_fn: Optional[EmbedFn],
    dataset_or_tensors: DatasetOrTensors,
    *,
    batch_size: int = 256,
    device: Union[torch.device, str, None] = None,
    progress: bool = False,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every item once, without gradients; the first half of :func:`evaluate`.

    Args: as in :func:`evaluate`.

    Returns:
        ``(embeddings, labels)``: (N, D) float32 embeddings on ``device`` and (N,) int64 labels on the CPU.
    """
    if embed_fn is not None and not callable(embed_fn):
        raise TypeError(f"embed_fn must be callable (a model or function) or None, got {type(embed_fn).__name__}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    num_workers = _check_int(num_workers, "num_workers", 0)
    target = torch.device(device) if device is not None else _module_device(embed_fn)
    batches, n_batches = _batches(dataset_or_tensors, batch_size, num_workers)
    chunks, label_chunks = [], []
    with _eval_mode(embed_fn):
        for inputs, labels in _progress_bar(batches, enabled=progress, total=n_batches, desc="embedding"):
            if target is not None and isinstance(inputs, torch.Tensor):
                inputs = inputs.to(target, non_blocking=True)
            out = inputs if embed_fn is None else embed_fn(inputs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"embed_fn must return a tensor of embeddings, got {type(out).__name__}")
            if out.dim() != 2 or out.shape[0] != labels.shape[0]:
                what = "the inputs (with embed_fn=None)" if embed_fn is None else "embed_fn's output"
                raise ValueError(
                    f"{what} must be (batch, D) embeddings, got shape {tuple(out.shape)} for a batch of "
                    f"{labels.shape[0]} items"
                )
            if not out.dtype.is_floating_point:
                raise TypeError(f"embeddings must be floating point, got {out.dtype}")
            chunk = out.to(target if target is not None else out.device, torch.float32)
            if chunk.untyped_storage().nbytes() > chunk.numel() * chunk.element_size():
                # A view (say the CLS token of a (B, T, C) output) would keep its whole parent
                # alive until the final cat: T times the memory, for every batch.
                chunk = chunk.clone()
            chunks.append(chunk)
            del out, chunk  # not alive during the next batch's forward
            label_chunks.append(labels.cpu().to(torch.int64))
    if not chunks:
        raise ValueError("dataset_or_tensors is empty")
    return torch.cat(chunks), torch.cat(label_chunks)


@torch.no_grad()
def evaluate(
    embed_fn: Optional[EmbedFn],
    dataset_or_tensors: DatasetOrTensors,
    n_way: int = 5,
    n_shot: Union[int, Sequence[int]] = (1, 5),
    n_query: int = 15,
    n_episodes: int = 600,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: Union[torch.device, str, None] = None,
    progress: bool = False,
    metric: str = "sqeuclidean",
    normalize: bool = False,
    num_workers: int = 0,
    ddof: int = 1,
    backend: str = "auto",
) -> dict[int, tuple[float, float]]:
    """N-way K-shot accuracy of a frozen embedder with a prototypical head, mean +- 95% CI.

    1. Embeds the whole dataset once (``embed_fn`` over batches, under ``torch.no_grad()``; an
       ``nn.Module`` is put in ``eval()`` mode for it, and every submodule gets its own mode back
       afterwards). Non-finite embeddings raise a ``ValueError``.
    2. For each shot count in ``n_shot``, draws ``n_episodes`` episodes with
       ``EpisodicSampler(labels, n_way, shot, n_query, n_episodes, seed=seed)`` (classes with fewer
       than ``shot + n_query`` items are skipped with a warning), builds prototypes from the support
       and classifies the ``n_way * n_query`` queries by their nearest prototype.
    3. Returns ``few_shot_accuracy(correct_counts, n_per_episode=n_way * n_query, ddof=ddof)`` per shot.

    Args:
        embed_fn: maps a batch of inputs (B, ...) to embeddings (B, D), e.g. a model or
            ``lambda x: model(x)[:, 0]``; ``None`` means the inputs already are (N, D) embeddings.
            A module is in eval mode during the call (every submodule's own mode comes back
            after, also when calls overlap in several threads); a thread that trains the same
            module meanwhile trains in eval mode, so evaluate a copy (or an EMA model) there.
        dataset_or_tensors: exactly one of

            * ``(inputs, labels)``: a tuple (or list) of two tensors, inputs (N, ...) (images, or
              (N, D) embeddings with ``embed_fn=None``) and labels (N,) integers; sliced into batches;
            * a map-style or iterable ``torch.utils.data.Dataset`` whose items are ``(input, label, ...)``
              tuples (extra fields are ignored), with ``label`` an int or 0-d integer tensor and
              ``input`` anything the default collate stacks. It is read once in order with
              ``DataLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)``.
        n_way: classes per episode.
        n_shot: support items per class, an int or a sequence of ints (one result each).
        n_query: query items per class (>= 1).
        n_episodes: episodes per shot count (>= 2; 600 in the usual protocol).
        seed: episodes are reproducible for a given seed (the same seed is used for every shot).
        batch_size: embedding batch size.
        device: where inputs are sent and the episodes run; default: the device of ``embed_fn``'s
            parameters for an ``nn.Module``, otherwise where the inputs / embeddings already are.
        progress: show tqdm progress bars (embedding, then episodes per shot); off by default.
        metric: ``"sqeuclidean"``, ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        normalize: L2-normalise embeddings before building prototypes (see :class:`PrototypicalHead`).
        num_workers: DataLoader workers, for a Dataset.
        ddof: std used in the confidence interval, see :func:`torchfg.metrics.few_shot_accuracy`.
        backend: distance backend, see :func:`torchfg.pairwise_distance`.

    Returns:
        ``{shot: (mean_accuracy, ci95)}``, fractions in [0, 1].

    Example:
        >>> centres = torch.randn(20, 32) * 4                     # 20 well-separated classes
        >>> labels = torch.arange(20).repeat_interleave(25)
        >>> features = centres[labels] + torch.randn(500, 32)
        >>> model = torch.nn.Identity()                            # any embedder
        >>> results = evaluate(model, (features, labels), n_way=5, n_shot=(1, 5), n_episodes=50,
        ...                    progress=False)
        >>> for shot, (mean, ci95) in results.items():
        ...     assert 0.9 < mean <= 1.0 and ci95 >= 0
    """
    n_way = _check_int(n_way, "n_way", 1)
    n_query = _check_int(n_query, "n_query", 1)
    n_episodes = _check_int(n_episodes, "n_episodes", 2)
    shots = [n_shot] if isinstance(n_shot, (int, np.integer)) and not isinstance(n_shot, bool) else n_shot
    if not isinstance(shots, Sequence) or len(shots) == 0:
        raise TypeError(f"n_shot must be an int or a non-empty sequence of ints, got {n_shot!r}")
    shots = [_check_int(s, "n_shot", 1) for s in shots]
    if len(set(shots)) != len(shots):
        raise ValueError(f"n_shot must not repeat a value, got {n_shot!r}")
    metric = check_choice(metric, "metric", METRICS)
    normalize = check_bool(normalize, "normalize")
    # Before the dataset is embedded (minutes, on a real one), not after the episodes.
    ddof = check_ddof(ddof)
    backend = check_backend(backend, "pairwise_distance")
    if seed is not None:  # (None: EpisodicSampler draws a seed)
        seed = _check_int(seed, "seed", 0)

    embeddings, labels = embed_dataset(
        embed_fn, dataset_or_tensors, batch_size=batch_size, device=device, progress=progress, num_workers=num_workers
    )
    # NaN distances would all lose to argmin's first index: chance accuracy, not an error.
    bad_rows = (~torch.isfinite(embeddings)).any(dim=1).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(
            f"embed_fn gave non-finite embeddings (NaN or inf) for {bad_rows.numel()} of {embeddings.shape[0]} "
            f"items, the first at index {bad_rows[0].item()}; few-shot accuracy would be meaningless"
        )
    if normalize:
        embeddings = F.normalize(embeddings, dim=-1)
    query_targets = torch.arange(n_way, device=embeddings.device).repeat_interleave(n_query)

    results: dict[int, tuple[float, float]] = {}
    for shot in shots:
        sampler = EpisodicSampler(labels, n_way, shot, n_query, n_episodes, seed=seed)
        n_support = n_way * shot
        episode_size = n_way * (shot + n_query)
        chunk = max(1, min(n_episodes, _CHUNK_ELEMENTS // (episode_size * embeddings.shape[1])))
        correct_counts = []
        bar = _progress_bar(
            None, enabled=progress, total=n_episodes, desc=f"{n_way}-way {shot}-shot", unit="episode"
        )
        episodes = iter(sampler)
        done = 0
        while done < n_episodes:
            take = min(chunk, n_episodes - done)
            index = torch.tensor([next(episodes) for _ in range(take)], device=embeddings.device)
            episode = embeddings[index]  # (take, episode_size, D), support then query, class-major
            # Class-major layout: the prototype of way w is the mean of support rows w*shot ... (w+1)*shot-1.
            prototypes = episode[:, :n_support].unflatten(1, (n_way, shot)).mean(dim=2)
            distances = pairwise_distance(episode[:, n_support:], prototypes, metric, backend=backend)
            correct_counts.append((distances.argmin(dim=2) == query_targets).sum(dim=1))
            done += take
            if progress:
                bar.update(take)
        if progress:
            bar.close()
        results[shot] = few_shot_accuracy(
            torch.cat(correct_counts).cpu(), n_per_episode=n_way * n_query, ddof=ddof
        )
    return results
