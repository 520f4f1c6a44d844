"""Experiment 1: semantic channel attention vs a plain CNN and three simpler fusions of the same map.

Multi-label attribute classification of the product in cluttered ``street`` images, where the
distractor garments carry the same kinds of attributes as the product: a classifier that pools
over the whole image sees the distractors' colours and patterns too. Every method gets the same
CNN (same initial weights, same batches); only how the product's semantic map enters differs.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from torchfg._validation import check_choice
from torchfg.demo._common import (
    PRODUCT_CHANNELS,
    Stopwatch,
    batched_forward,
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
from torchfg.datasets.synthetic_products import MAP_QUALITIES
from torchfg.demo.backbone import SmallCNN
from torchfg.heads import MultiLabelHead
from torchfg.layers import SemanticFusion, make_semantic_module, widen_first_conv, wrap_backbone
from torchfg.metrics import multilabel_auc, relative_improvement

__all__ = ["SEMANTIC_METHODS", "AttributeClassifier", "semantic_attention_experiment"]

SEMANTIC_METHODS = ("baseline", "attention", "input_concat", "feature_concat", "mask")
"""``baseline``: no map; ``attention``: :class:`torchfg.layers.SemanticChannelAttention`; the rest:
the :class:`torchfg.layers.SemanticFusion` modes."""

STAGES = ("stage1", "stage2", "stage3", "stage4")


class AttributeClassifier(nn.Module):
    """:class:`SmallCNN` + average pooling + linear attribute logits, with the map fused by ``method``.

    * ``"baseline"``: the map is ignored.
    * ``"attention"``, ``"feature_concat"``, ``"mask"``: the semantic module runs on the output of
      ``stage`` (:func:`torchfg.layers.wrap_backbone`).
    * ``"input_concat"``: the map is appended to the image channels before ``stage1``, whose first
      conv is widened by :func:`torchfg.layers.widen_first_conv`.

    The backbone and the head are built first, so for a given ``torch.manual_seed`` every method
    starts from the same backbone and head weights.

    Args:
        method: one of :data:`SEMANTIC_METHODS`.
        num_labels: L.
        semantic_channels: K, channels of the map passed to ``forward``.
        stage: the stage whose output the feature-level modules transform.

    Shapes:
        images (B, 3, H, W), semantic (B, K, h, w) -> logits (B, L).

    Example:
        >>> model = AttributeClassifier("attention", num_labels=23, semantic_channels=2)
        >>> model(torch.rand(4, 3, 64, 64), torch.rand(4, 2, 64, 64)).shape
        torch.Size([4, 23])
    """

    def __init__(self, method: str, num_labels: int, semantic_channels: int = 2, *, stage: str = "stage3") -> None:
        super().__init__()
        self.method = check_choice(method, "method", SEMANTIC_METHODS)
        check_choice(stage, "stage", STAGES)
        backbone = SmallCNN()
        self.head = MultiLabelHead(backbone.out_channels, num_labels, pooling="avg")
        if method == "baseline":
            self.net: nn.Module = backbone
        elif method == "input_concat":
            first_conv = cast(nn.Conv2d, backbone.stage1[0])  # _conv_block's first layer
            backbone.stage1[0] = widen_first_conv(first_conv, semantic_channels)
            fusion = SemanticFusion(first_conv.in_channels, semantic_channels, mode="input_concat")
            self.net = wrap_backbone(backbone, "stage1", fusion, position="before")
        else:
            channels = backbone.widths[STAGES.index(stage)]
            self.net = wrap_backbone(backbone, stage, make_semantic_module(method, channels, semantic_channels))

    def forward(self, images: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Attribute logits (B, L) of images (B, 3, H, W) with product maps (B, K, h, w)."""
        features = self.net(images) if self.method == "baseline" else self.net(images, semantic)
        return self.head(features)


def semantic_attention_experiment(
    *,
    num_products: int = 100,
    views_per_domain: int = 8,
    test_views: int = 2,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 3e-3,
    methods: tuple[str, ...] = SEMANTIC_METHODS,
    stage: str = "stage3",
    map_quality: str | Sequence[str] = "predicted",
    seed: int = 0,
    device: torch.device | str | None = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one attribute classifier per method on street images; per-label AUC on held-out views.

    Data: the ``street`` images of all ``num_products`` products (seeded :class:`SyntheticProducts`);
    views ``0 .. views_per_domain - test_views - 1`` of each product train, the last ``test_views``
    views test. Targets: the product's 23 multi-hot attributes (distractors do not count). The map
    given to the methods is the product region, channels (body, trim) of the semantic map: by default
    the *predicted* map (:meth:`torchfg.datasets.SyntheticProducts.predicted_maps`: blurred, offset,
    with missed parts and false blobs, as a parsing model would give it), or the exact rendered one.

    Training: AdamW with a one-cycle schedule, BCE-with-logits, random horizontal flips (of images and
    maps together); the same seed, hence the same initial weights and batch order, for every method.

    Args:
        num_products: products in the catalogue.
        views_per_domain: street images per product.
        test_views: of those, how many are held out for testing (>= 1).
        epochs: passes over the training images, per method.
        batch_size: images per step.
        lr: peak learning rate.
        methods: which of :data:`SEMANTIC_METHODS` to train; must include ``"baseline"``.
        stage: where the feature-level modules sit (see :class:`AttributeClassifier`).
        map_quality: ``"predicted"``, ``"exact"``, or a sequence of both to train every map-using method
            on each (the images, hence the baseline, are the same for both: it is trained once).
        seed: dataset and training seed.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... (images are rendered on the CPU).
        threads: ``torch.set_num_threads`` during the run (None: unchanged).
        progress: show tqdm progress bars.

    Returns:
        A JSON-serialisable dict: ``"methods"`` maps each method to its ``mean_auc`` (macro over labels),
        ``per_label_auc`` (None where the test images hold a single class of that label), ``relative_improvement``
        over the baseline (mean of per-label ``(auc - auc_base) / auc_base`` over the labels with both AUCs
        defined and ``auc_base > 0``; 0 for the baseline itself) and
        timings, on the first ``map_quality``; ``"by_map_quality"`` the same for every map quality run
        (each with the baseline); ``"map_quality"`` (the first), ``"label_names"``,
        ``"undefined_auc_labels"``, ``"config"`` and total ``"timing"``.

    Example:
        >>> result = semantic_attention_experiment(num_products=20, views_per_domain=3, epochs=1, progress=False)
        >>> sorted(result["methods"])
        ['attention', 'baseline', 'feature_concat', 'input_concat', 'mask']
    """
    num_products = check_int(num_products, "num_products", 2)
    views_per_domain = check_int(views_per_domain, "views_per_domain", 2)
    test_views = check_int(test_views, "test_views", 1)
    if test_views >= views_per_domain:
        raise ValueError(f"test_views must be < views_per_domain={views_per_domain}, got {test_views}")
    epochs = check_int(epochs, "epochs", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    methods = tuple(methods)
    for method in methods:
        check_choice(method, "methods", SEMANTIC_METHODS)
    if "baseline" not in methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must hold distinct names including 'baseline', got {methods!r}")
    check_choice(stage, "stage", STAGES)
    qualities = (map_quality,) if isinstance(map_quality, str) else tuple(map_quality)
    for quality in qualities:
        check_choice(quality, "map_quality", MAP_QUALITIES)
    if not qualities or len(set(qualities)) != len(qualities):
        raise ValueError(f"map_quality must be one of {MAP_QUALITIES} or a sequence of distinct ones, got {map_quality!r}")
    target = resolve_device(device)
    clock = Stopwatch()

    with torch_threads(threads):
        dataset, batch = render_products(num_products, views_per_domain, seed)
        street = batch.domain == dataset.domain_names.index("street")
        train_rows = (street & (batch.view < views_per_domain - test_views)).nonzero().squeeze(1)
        test_rows = (street & (batch.view >= views_per_domain - test_views)).nonzero().squeeze(1)

        def product_maps(rows: torch.Tensor, quality: str) -> torch.Tensor:
            exact = batch.semantic_map[rows]
            maps = exact if quality == "exact" else dataset.predicted_maps(exact, rows)
            return maps[:, list(PRODUCT_CHANNELS)].to(target)

        train_images = batch.image[train_rows].to(target)
        train_targets = batch.attributes[train_rows].to(target)
        test_images = batch.image[test_rows].to(target)
        test_targets = batch.attributes[test_rows]
        maps = {q: (product_maps(train_rows, q), product_maps(test_rows, q)) for q in qualities}
        render_timing = clock.seconds()

        n_steps = epochs * steps_per_epoch(train_rows.numel(), batch_size)

        def train_and_test(method: str, quality: str) -> tuple[dict[str, Any], torch.Tensor]:
            train_maps, test_maps = maps[quality]
            method_clock = Stopwatch()
            generator = seed_everything(seed)
            model = AttributeClassifier(method, dataset.num_attributes, len(PRODUCT_CHANNELS), stage=stage)
            # Module.to takes memory_format at run time; torch's overloads of it omit the keyword.
            model = model.to(target, memory_format=torch.channels_last)  # type: ignore[call-overload]
            optimizer, scheduler = make_optimizer(model, n_steps, lr=lr)
            model.train()
            last_loss = float("nan")
            label = method if method == "baseline" or len(qualities) == 1 else f"{method} ({quality} maps)"
            with progress_bar(n_steps, f"[1/3] attributes: {label}", progress) as bar:
                for _ in range(epochs):
                    for index in shuffled_batches(train_rows.numel(), batch_size, generator):
                        index = index.to(target)
                        images, batch_maps = random_flip(train_images[index], train_maps[index], generator=generator)
                        logits = model(images.contiguous(memory_format=torch.channels_last), batch_maps)
                        loss = F.binary_cross_entropy_with_logits(logits, train_targets[index])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        last_loss = loss.item()
                        bar.update(1)
                        bar.set_postfix(loss=f"{last_loss:.3f}")
            model.eval()
            scores = batched_forward(model, test_images, test_maps).float().cpu()
            with warnings.catch_warnings():
                # Labels with a single class among the test images (small catalogues) have no AUC:
                # they are None in per_label_auc, listed in "undefined_auc_labels" and left out of means.
                warnings.simplefilter("ignore", UserWarning)
                auc = multilabel_auc(scores, test_targets, average=None)
            return {
                "mean_auc": finite_or_none(float(torch.nanmean(auc))),
                "per_label_auc": [finite_or_none(a) for a in auc.tolist()],
                "final_train_loss": finite_or_none(last_loss),
                "parameters": sum(p.numel() for p in model.parameters()),
                **method_clock.seconds(),
            }, auc

        # The baseline never sees the map, and the images are the same for every map quality.
        baseline, baseline_auc = train_and_test("baseline", qualities[0])
        by_quality: dict[str, dict[str, dict[str, Any]]] = {}
        for quality in qualities:
            results: dict[str, dict[str, Any]] = {}
            per_label: dict[str, torch.Tensor] = {}
            for method in methods:
                if method == "baseline":
                    results[method], per_label[method] = copy.deepcopy(baseline), baseline_auc
                else:
                    results[method], per_label[method] = train_and_test(method, quality)
            # A baseline AUC of exactly 0 (possible only with a handful of test images) has no relative
            # change: such labels are left out of the mean, like labels without an AUC.
            base = baseline_auc.masked_fill(baseline_auc == 0, float("nan"))
            for method in methods:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # no label left: None, as documented
                    improvement = relative_improvement(per_label[method], base)
                results[method]["relative_improvement"] = finite_or_none(float(improvement))
            by_quality[quality] = results

    return {
        "experiment": "semantic_attention",
        "methods": by_quality[qualities[0]],
        "map_quality": qualities[0],
        "by_map_quality": by_quality,
        "label_names": list(dataset.attribute_names),
        "undefined_auc_labels": [
            name for name, a in zip(dataset.attribute_names, baseline_auc.tolist()) if math.isnan(a)
        ],
        "config": {
            "num_products": num_products,
            "views_per_domain": views_per_domain,
            "test_views": test_views,
            "train_images": int(train_rows.numel()),
            "test_images": int(test_rows.numel()),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "stage": stage,
            "map_quality": list(qualities),
            "seed": seed,
            "device": str(target),
        },
        "timing": {"render": render_timing, **clock.seconds()},
    }
