"""Plumbing shared by the demo experiments: devices, threads, seeds, rendering, progress, training."""

from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from torchfg.datasets import SyntheticProducts
from torchfg.datasets.synthetic_products import ProductSample
from torchfg._validation import check_bool, check_int  # noqa: F401  (re-exported to the demo modules)


# The product region of the semantic map: (body, trim). The background channel is their complement
# (the three sum to 1), so it adds no information; leaving it out makes "all channels" mean "the product".
PRODUCT_CHANNELS = (1, 2)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``"auto"`` / None (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but no CUDA device is available")
    return resolved


def default_threads() -> int:
    """Intra-op CPU threads the demo uses unless told otherwise: 1.

    The demo's convolutions are small (64 x 64 images, batches of 32 to 64). On the 2-core machine the
    demo was sized on, shared with other jobs (load average ~5), training the demo CNN with two threads
    cost 3-4x more CPU time per image than with one (threads spin at barriers while their core is
    taken) and was slower in wall time too. One thread also makes the results independent of the
    machine's core count. Pass ``threads`` (``--threads``) to use more on an idle many-core machine.
    """
    return 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: leave as is), then restore."""
    if threads is None:
        yield
        return
    threads = check_int(threads, "threads", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global CPU (and CUDA) generators and return a CPU generator for data order."""
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@functools.lru_cache(maxsize=2)
def _render_cached(num_products: int, views_per_domain: int, seed: int, image_size: int) -> ProductSample:
    dataset = SyntheticProducts(
        "all", num_products=num_products, views_per_domain=views_per_domain, image_size=image_size, seed=seed
    )
    return dataset.render_batch()


def clear_render_cache() -> None:
    """Free the rendered catalogues kept by :func:`render_products` (~160 MB for the full demo)."""
    _render_cached.cache_clear()


def render_products(
    num_products: int, views_per_domain: int, seed: int, *, image_size: int = 64
) -> tuple[SyntheticProducts, ProductSample]:
    """All products of a catalogue in both domains, rendered once (cached; treat as read-only).

    Returns:
        ``(dataset, batch)``: the ``split="all"`` dataset (for names, splits and descriptions) and its
        batched samples, images ``(N, 3, S, S)`` and semantic maps ``(N, 3, S, S)`` on the CPU with
        ``N = num_products * 2 * views_per_domain``.
    """
    dataset = SyntheticProducts(
        "all", num_products=num_products, views_per_domain=views_per_domain, image_size=image_size, seed=seed
    )
    return dataset, _render_cached(num_products, views_per_domain, seed, image_size)


def interactive_stream(stream: Any) -> bool:
    """Whether ``stream`` shows a live progress bar well: a terminal, or a Jupyter kernel's widgets.

    Anywhere else (a pipe, ``| tee``, a CI log, a file) tqdm's carriage-return redraws pile up into
    thousands of characters of repeated bars, so the demo prints one plain line per stage there.
    """
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an IPython being imported or shut down
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class StageLine:
    """The non-interactive stand-in for a tqdm bar: one line when the stage ends, nothing before.

    Same calls as the bars the demo uses (``update``, ``set_postfix``, ``close``, context manager);
    the line reads ``"<desc>: <n>/<total> <unit>s in <s> s (<postfix>)"``.
    """

    def __init__(self, total: int, desc: str, stream: Any, unit: str = "step") -> None:
        self.total, self.desc, self.stream, self.unit = total, desc, stream, unit
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s in {seconds:.1f} s{extra}", file=self.stream,
              flush=True)

    def __enter__(self) -> "StageLine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int, desc: str, enabled: bool, *, stream: Any = None) -> Any:
    """Progress of one training stage on ``stream`` (default ``sys.stderr``).

    A live tqdm bar on a terminal or in a notebook; one :class:`StageLine` when the stage ends
    anywhere else (pipes, CI logs); a disabled (silent) tqdm when ``enabled`` is False.
    """
    from tqdm.auto import tqdm

    stream = sys.stderr if stream is None else stream
    if enabled and not interactive_stream(stream):
        return StageLine(total, desc, stream)
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, unit="step",
                file=stream)


def random_flip(images: torch.Tensor, *others: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Flip each image (and the matching rows of ``others``, e.g. semantic maps) left-right with p = 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    flip = flip.to(images.device)
    out = []
    for tensor in (images,) + others:
        out.append(torch.where(flip.view(-1, 1, 1, 1), tensor.flip(-1), tensor))
    return out


def make_optimizer(
    model: nn.Module, total_steps: int, lr: float = 3e-3, weight_decay: float = 1e-4
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle learning-rate schedule over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1))
    return optimizer, scheduler


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of one epoch over ``range(n)`` in a seeded random order (last one may be short)."""
    order = torch.randperm(n, generator=generator)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


@torch.no_grad()
def batched_forward(fn: Any, *inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``torch.cat([fn(*chunk) for chunk in batches])`` without gradients."""
    outputs = []
    for start in range(0, inputs[0].shape[0], batch_size):
        outputs.append(fn(*(x[start : start + batch_size] for x in inputs)))
    return torch.cat(outputs)


def finite_or_none(value: float) -> float | None:
    """A float for JSON: NaN / inf become None."""
    value = float(value)
    return value if math.isfinite(value) else None


class Stopwatch:
    """Wall and CPU (process) seconds since construction."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def seconds(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall0, 2),
            "cpu_s": round(time.process_time() - self.cpu0, 2),
        }
