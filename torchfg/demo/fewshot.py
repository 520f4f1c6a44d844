"""Experiment 3: few-shot classification of novel products with a prototypical head.

An embedder is trained on the base products only, either without labels (DINO self-distillation
between two augmented views of each image) or with them (cross-entropy over the base products,
the cheap choice of ``torchfg demo --quick``). It is then frozen, and 5-way 1-shot / 5-shot episodes
over the novel products, never seen in training, are classified by the nearest class prototype
(:func:`torchfg.fewshot.evaluate`). The untrained network (the same initial weights) is evaluated
too, as the reference the training has to beat.
"""

from __future__ import annotations

import copy
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from torchfg._validation import check_choice
from torchfg.datasets import DOMAIN_NAMES, split_product_ids
from torchfg.demo._common import (
    Stopwatch,
    check_bool,
    check_int,
    finite_or_none,
    make_optimizer,
    progress_bar,
    random_flip,
    render_products,
    resolve_device,
    seed_everything,
    shuffled_batches,
    steps_per_epoch,
    torch_threads,
)
from torchfg.demo.backbone import SmallCNN
from torchfg.fewshot import evaluate
from torchfg.heads import DINOHead
from torchfg.layers import MultiCropWrapper
from torchfg.losses import DINOLoss
from torchfg.utils import cosine_schedule, ema_update_

__all__ = ["FEW_SHOT_METHODS", "PooledCNN", "augment", "few_shot_experiment"]

FEW_SHOT_METHODS = ("dino", "supervised")


class PooledCNN(nn.Module):
    """:class:`SmallCNN` followed by global average pooling: images (B, 3, H, W) -> features (B, C).

    Example:
        >>> PooledCNN()(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SmallCNN()
        self.out_channels = self.backbone.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images.contiguous(memory_format=torch.channels_last)).mean(dim=(-2, -1))


def augment(images: torch.Tensor, generator: torch.Generator, *, min_scale: float = 0.45) -> torch.Tensor:
    """One random view of each image: resized crop, horizontal flip, brightness and contrast jitter.

    The crop keeps a random ``[min_scale, 1]`` share of the area with aspect ratio in [3/4, 4/3], at a
    random position inside the image, resampled bilinearly to the input size. Colour is jittered only
    mildly (brightness and contrast, not hue): the products differ by colour, so an embedding made
    invariant to it could not tell them apart.

    Args:
        images: (B, 3, H, W) in [0, 1].
        generator: CPU generator that draws the random parameters.
        min_scale: smallest kept share of the area, in (0, 1].

    Returns:
        (B, 3, H, W) augmented images in [0, 1], on the input's device.

    Example:
        >>> views = augment(torch.rand(8, 3, 64, 64), torch.Generator().manual_seed(0))
        >>> views.shape, bool(views.min() >= 0) and bool(views.max() <= 1)
        (torch.Size([8, 3, 64, 64]), True)
    """
    b = images.shape[0]
    rand = torch.rand(b, 6, generator=generator).to(images.device)
    area = min_scale + (1.0 - min_scale) * rand[:, 0]
    log_ratio = (rand[:, 1] * 2.0 - 1.0) * math.log(4.0 / 3.0)
    ratio = torch.exp(log_ratio)
    # Half-widths of the crop in normalised coordinates ([-1, 1] spans the image).
    half_w = torch.sqrt(area * ratio).clamp(max=1.0)
    half_h = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (1.0 - half_w) * (rand[:, 2] * 2.0 - 1.0)
    centre_y = (1.0 - half_h) * (rand[:, 3] * 2.0 - 1.0)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = half_w * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = half_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = torch.rand(b, 2, generator=generator).to(images.device)
    brightness = (0.8 + 0.4 * jitter[:, 0]).view(b, 1, 1, 1)
    contrast = (0.8 + 0.4 * jitter[:, 1]).view(b, 1, 1, 1)
    views = views * brightness
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return ((views - mean) * contrast + mean).clamp(0.0, 1.0)


def _train_supervised(
    model: PooledCNN,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool,
) -> float:
    classifier = nn.Linear(model.out_channels, num_classes).to(images.device)
    both = nn.ModuleDict({"model": model, "classifier": classifier})
    n_steps = epochs * steps_per_epoch(images.shape[0], batch_size)
    optimizer, scheduler = make_optimizer(both, n_steps, lr=lr)
    last_loss = float("nan")
    model.train()
    with progress_bar(n_steps, "[3/3] few-shot: supervised", progress) as bar:
        for _ in range(epochs):
            for index in shuffled_batches(images.shape[0], batch_size, generator):
                index = index.to(images.device)
                (batch,) = random_flip(images[index], generator=generator)
                loss = F.cross_entropy(classifier(model(batch)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                last_loss = loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}")
    return last_loss


def _train_dino(
    model: PooledCNN,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    out_dim: int,
    generator: torch.Generator,
    progress: bool,
) -> tuple[PooledCNN, float]:
    """DINO with two global views per image; returns the EMA teacher's backbone and the last loss."""
    head = DINOHead(model.out_channels, out_dim, hidden_dim=256, bottleneck_dim=64, n_layers=2)
    student = MultiCropWrapper(model, head).to(images.device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = DINOLoss(
        out_dim,
        n_crops=2,
        n_global_crops=2,
        student_temp=0.1,
        teacher_temp=0.04,
        warmup_teacher_temp=0.04,
        n_epochs=epochs,
        center_momentum=0.9,
    ).to(images.device)
    per_epoch = steps_per_epoch(images.shape[0], batch_size)
    # A last batch of one image is skipped (BatchNorm needs two): the bar counts the steps taken.
    n_steps = epochs * (per_epoch - int(images.shape[0] % batch_size == 1))
    lr_schedule = cosine_schedule(lr, lr * 0.01, epochs, per_epoch, warmup_epochs=min(1, epochs - 1))
    # A short run needs a teacher that follows the student closely at first.
    momentum_schedule = cosine_schedule(0.98, 1.0, epochs, per_epoch)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.04)
    last_loss = float("nan")
    step = 0
    with progress_bar(n_steps, "[3/3] few-shot: DINO", progress) as bar:
        for epoch in range(epochs):
            student.train()
            teacher.train()
            for index in shuffled_batches(images.shape[0], batch_size, generator):
                if index.numel() < 2:
                    continue  # BatchNorm needs more than one image
                batch = images[index.to(images.device)]
                views = [augment(batch, generator), augment(batch, generator)]
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[step])
                with torch.no_grad():
                    teacher_out = teacher(views)
                loss = criterion(student(views), teacher_out, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update_(teacher, student, float(momentum_schedule[step]))
                last_loss = loss.item()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}")
    # The teacher is a deep copy of the student, whose backbone is model.
    return cast(PooledCNN, teacher.backbone), last_loss


def few_shot_experiment(
    *,
    methods: tuple[str, ...] = ("dino",),
    num_products: int = 100,
    views_per_domain: int = 8,
    novel_fraction: float = 0.25,
    dino_epochs: int = 10,
    dino_batch_size: int = 32,
    dino_lr: float = 1e-3,
    dino_out_dim: int = 256,
    dino_domains: tuple[str, ...] = ("studio",),
    supervised_epochs: int = 6,
    supervised_batch_size: int = 64,
    supervised_lr: float = 3e-3,
    n_way: int = 5,
    shots: tuple[int, ...] = (1, 5),
    n_query: int = 10,
    n_episodes: int = 600,
    seed: int = 0,
    device: torch.device | str | None = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train embedders on the base products, then N-way K-shot accuracy (95% CI) on the novel ones.

    Data: seeded :class:`SyntheticProducts`; base (train) products train, novel products form the
    episodes (their ``2 * views_per_domain`` images each, both domains: support and query can come
    from different domains). Embeddings: the backbone's average-pooled features, L2-normalised; the
    prototypical head (nearest class mean, squared euclidean) runs in :func:`torchfg.fewshot.evaluate`
    with the same episodes for every embedder.

    Methods (each starts from the same initial weights, which are also evaluated as ``"untrained"``):

    * ``"dino"``: self-supervised, no labels. :class:`torchfg.losses.DINOLoss` between a student and an
      EMA teacher (:class:`torchfg.heads.DINOHead`, :class:`torchfg.layers.MultiCropWrapper`, momentum
      from :func:`torchfg.utils.cosine_schedule`, :func:`torchfg.utils.ema_update_`) on two augmented
      views (:func:`augment`) of each image of the ``dino_domains``; the teacher's backbone is evaluated.
      By default only studio photos: in a street photo both views share the background and distractors,
      the cheapest cue for matching them, which says nothing about the product.
    * ``"supervised"``: cross-entropy over the base products, both domains.

    Args:
        methods: which of :data:`FEW_SHOT_METHODS` to train, in order.
        num_products: products in the catalogue; ``novel_fraction`` of them are held out.
        views_per_domain: images per product and domain.
        novel_fraction: share of held-out (novel) products.
        dino_epochs, dino_batch_size, dino_lr: DINO training (peak lr after a one-epoch warm-up).
        dino_out_dim: number of DINO prototypes.
        dino_domains: domains of the base images DINO trains on.
        supervised_epochs, supervised_batch_size, supervised_lr: supervised training.
        n_way: classes per episode (capped at the number of novel products).
        shots: support images per class, one result each.
        n_query: query images per class (capped so that ``max(shots) + n_query`` images exist).
        n_episodes: episodes per shot count.
        seed: dataset, training and episode seed.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        threads: ``torch.set_num_threads`` during the run (None: unchanged).
        progress: show tqdm progress bars.

    Returns:
        A JSON-serialisable dict: ``"methods"`` maps ``"untrained"`` and each trained method to
        ``{"accuracy": {shot: mean}, "ci95": {shot: half-width}}`` (fractions, shots as strings) with
        timings; ``"config"`` and ``"timing"``.

    Example:
        >>> result = few_shot_experiment(methods=("supervised",), num_products=24, views_per_domain=2,
        ...                              supervised_epochs=1, shots=(1, 2), n_episodes=20, progress=False)
        >>> sorted(result["methods"])
        ['supervised', 'untrained']
    """
    methods = tuple(methods)
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct names among {FEW_SHOT_METHODS}, got {methods!r}")
    for method in methods:
        check_choice(method, "methods", FEW_SHOT_METHODS)
    num_products = check_int(num_products, "num_products", 4)
    views_per_domain = check_int(views_per_domain, "views_per_domain", 1)
    dino_epochs = check_int(dino_epochs, "dino_epochs", 1)
    dino_batch_size = check_int(dino_batch_size, "dino_batch_size", 2)
    dino_out_dim = check_int(dino_out_dim, "dino_out_dim", 2)
    supervised_epochs = check_int(supervised_epochs, "supervised_epochs", 1)
    supervised_batch_size = check_int(supervised_batch_size, "supervised_batch_size", 2)
    dino_domains = tuple(dino_domains)
    if not dino_domains:
        raise ValueError("dino_domains must name at least one domain")
    for domain in dino_domains:
        check_choice(domain, "dino_domains", DOMAIN_NAMES)
    n_way = check_int(n_way, "n_way", 2)
    n_query = check_int(n_query, "n_query", 1)
    n_episodes = check_int(n_episodes, "n_episodes", 2)
    shots = tuple(check_int(s, "shots", 1) for s in shots)
    if not shots or len(set(shots)) != len(shots):
        raise ValueError(f"shots must be distinct positive ints, got {shots!r}")
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    train_ids, novel_ids = split_product_ids(num_products, novel_fraction)
    per_class = 2 * views_per_domain
    if len(novel_ids) < 2 or len(train_ids) < 2:
        raise ValueError(
            f"num_products={num_products} with novel_fraction={novel_fraction} must leave >= 2 train and >= 2 "
            f"novel products, got {len(train_ids)} and {len(novel_ids)}"
        )
    if max(shots) >= per_class:
        raise ValueError(
            f"shots must be < the {per_class} images of each novel product (2 domains x views_per_domain), "
            f"got {max(shots)}"
        )
    n_way = min(n_way, len(novel_ids))
    n_query = min(n_query, per_class - max(shots))
    target = resolve_device(device)
    clock = Stopwatch()

    with torch_threads(threads):
        _, batch = render_products(num_products, views_per_domain, seed)
        is_train = batch.product_id < len(train_ids)
        train_images = batch.image[is_train].to(target)
        train_labels = batch.product_id[is_train].to(target)
        in_dino_domains = torch.isin(batch.domain, torch.tensor([DOMAIN_NAMES.index(d) for d in dino_domains]))
        dino_images = batch.image[is_train & in_dino_domains].to(target)
        novel_images = batch.image[~is_train]
        novel_labels = batch.product_id[~is_train]
        render_timing = clock.seconds()

        def few_shot(model: nn.Module) -> dict[str, Any]:
            scores = evaluate(
                model,
                (novel_images, novel_labels),
                n_way=n_way,
                n_shot=shots,
                n_query=n_query,
                n_episodes=n_episodes,
                seed=seed,
                device=target,
                progress=False,
                normalize=True,
            )
            return {
                "accuracy": {str(shot): finite_or_none(mean) for shot, (mean, _) in scores.items()},
                "ci95": {str(shot): finite_or_none(ci) for shot, (_, ci) in scores.items()},
            }

        results: dict[str, dict[str, Any]] = {}
        method_clock = Stopwatch()
        seed_everything(seed)
        # Module.to takes memory_format at run time; torch's overloads of it omit the keyword.
        initial = PooledCNN().to(target, memory_format=torch.channels_last)  # type: ignore[call-overload]
        results["untrained"] = {**few_shot(copy.deepcopy(initial)), **method_clock.seconds()}
        for method in methods:
            method_clock = Stopwatch()
            generator = seed_everything(seed)
            model = copy.deepcopy(initial)
            if method == "supervised":
                last_loss = _train_supervised(
                    model,
                    train_images,
                    train_labels,
                    len(train_ids),
                    epochs=supervised_epochs,
                    batch_size=supervised_batch_size,
                    lr=supervised_lr,
                    generator=generator,
                    progress=progress,
                )
            else:
                model, last_loss = _train_dino(
                    model,
                    dino_images,
                    epochs=dino_epochs,
                    batch_size=dino_batch_size,
                    lr=dino_lr,
                    out_dim=dino_out_dim,
                    generator=generator,
                    progress=progress,
                )
            results[method] = {
                **few_shot(model),
                "final_train_loss": finite_or_none(last_loss),
                **method_clock.seconds(),
            }

    return {
        "experiment": "few_shot",
        "methods": results,
        "config": {
            "methods": list(methods),
            "num_products": num_products,
            "base_products": len(train_ids),
            "novel_products": len(novel_ids),
            "views_per_domain": views_per_domain,
            "dino": {
                "images": int(dino_images.shape[0]),
                "domains": list(dino_domains),
                "epochs": dino_epochs,
                "batch_size": dino_batch_size,
                "lr": dino_lr,
                "out_dim": dino_out_dim,
            },
            "supervised": {
                "images": int(train_images.shape[0]),
                "epochs": supervised_epochs,
                "batch_size": supervised_batch_size,
                "lr": supervised_lr,
            },
            "n_way": n_way,
            "shots": list(shots),
            "n_query": n_query,
            "n_episodes": n_episodes,
            "seed": seed,
            "device": str(target),
        },
        "timing": {"render": render_timing, **clock.seconds()},
    }
