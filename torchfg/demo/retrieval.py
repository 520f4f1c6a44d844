"""Experiment 2: adaptive triplet loss (text-weighted margins) vs batch-hard triplet loss.

Cross-domain retrieval: an embedder trained on the base products (studio and street photos) must
find, for a street photo of a *novel* product, studio photos of the same product. The adaptive
triplet loss (ATL) knows, from the product descriptions, how different two products are and asks
for a larger margin between products that share fewer attributes; the triplet baseline uses one
margin for every pair, set to the mean ATL margin over the training products' pairs so that the
two losses differ only in how the margin is distributed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from torchfg.data import PKSampler
from torchfg.datasets import HashedBagOfWordsEncoder, split_product_ids
from torchfg.demo._common import (
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
    torch_threads,
)
from torchfg.demo.backbone import EmbeddingNet
from torchfg.losses import AdaptiveTripletLoss, TripletMarginLoss
from torchfg.metrics import recall_at_k

__all__ = ["recall_curve", "atl_vs_triplet_experiment"]


def recall_curve(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    max_k: int,
    *,
    metric: str = "euclidean",
) -> torch.Tensor:
    """Recall@1 .. Recall@max_k: the share of queries with a same-label item among their k nearest.

    :func:`torchfg.metrics.recall_at_k` for every k up to ``max_k``, as one tensor (for plotting).
    Queries without any same-label gallery item are left out, as there.

    Args:
        query: (Q, D) query embeddings.
        query_labels: (Q,) integer labels.
        gallery: (G, D) gallery embeddings (a separate set: no query is removed from it).
        gallery_labels: (G,) integer labels.
        max_k: largest k, at most G.
        metric: distance, see :func:`torchfg.pairwise_distance`.

    Returns:
        (max_k,) float64 tensor, entry ``k - 1`` is Recall@k (non-decreasing, in [0, 1]).

    Example:
        >>> q = torch.tensor([[0.0, 0.0], [1.0, 1.0]]); g = torch.tensor([[0.0, 0.1], [1.0, 0.9], [5.0, 5.0]])
        >>> recall_curve(q, torch.tensor([0, 2]), g, torch.tensor([0, 1, 2]), max_k=3).tolist()
        [0.5, 0.5, 1.0]
    """
    max_k = check_int(max_k, "max_k", 1)
    if max_k > gallery.shape[0]:
        raise ValueError(f"max_k must be <= the gallery size {gallery.shape[0]}, got {max_k}")
    ks = range(1, max_k + 1)
    recalls = recall_at_k(query.float(), query_labels, gallery.float(), gallery_labels, ks, metric, progress=False)
    return torch.tensor([recalls[k] for k in ks], dtype=torch.float64)


def _mean_adaptive_margin(text: torch.Tensor, base_margin: float, margin_scale: float) -> float:
    """Mean ATL margin ``m0 + s (1 - cos) / 2`` over the ordered pairs of distinct rows of ``text``."""
    cosine = text @ text.T
    off_diagonal = ~torch.eye(text.shape[0], dtype=torch.bool)
    return base_margin + margin_scale * float(((1.0 - cosine[off_diagonal]) / 2.0).mean())


def atl_vs_triplet_experiment(
    *,
    num_products: int = 100,
    views_per_domain: int = 8,
    novel_fraction: float = 0.25,
    epochs: int = 12,
    classes_per_batch: int = 16,
    items_per_class: int = 4,
    embedding_dim: int = 64,
    lr: float = 3e-3,
    base_margin: float = 0.1,
    margin_scale: float = 0.5,
    text_dim: int = 128,
    max_k: int = 10,
    seed: int = 0,
    device: torch.device | str | None = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one embedder with TripletMarginLoss and one with AdaptiveTripletLoss; Recall@K on novel products.

    Data: seeded :class:`SyntheticProducts`; the base (train) products' studio and street images train,
    sampled by :class:`torchfg.data.PKSampler` (``classes_per_batch`` products x ``items_per_class``
    images, domains mixed). Text: :class:`HashedBagOfWordsEncoder` embeddings of the product
    descriptions (a stand-in for a real sentence encoder). Test: street photos of the novel products
    query a gallery of their studio photos.

    Losses (euclidean distance on unit-norm embeddings, batch-hard mining):
    ``AdaptiveTripletLoss(base_margin, margin_scale)`` and ``TripletMarginLoss(margin=m)`` with ``m``
    the mean ATL margin over all pairs of training products. Both runs share the seed, hence the
    initial weights and the batches.

    Args:
        num_products: products in the catalogue; ``novel_fraction`` of them are held out.
        views_per_domain: images per product and domain.
        novel_fraction: share of held-out products (the queries and gallery).
        epochs: passes over the training images (each ``len(train) // batch`` PK batches).
        classes_per_batch, items_per_class: P and K of the PK batches.
        embedding_dim: D.
        lr: peak learning rate.
        base_margin, margin_scale: ATL margin ``m0 + s * (1 - cos(text_a, text_n)) / 2``.
        text_dim: width of the hashed text embeddings.
        max_k: the recall curve runs from Recall@1 to Recall@max_k.
        seed: dataset and training seed.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        threads: ``torch.set_num_threads`` during the run (None: unchanged).
        progress: show tqdm progress bars.

    Returns:
        A JSON-serialisable dict: ``"methods"`` maps ``"untrained"`` (the shared initial weights, for
        reference), ``"triplet"`` and ``"atl"`` to ``recall`` (Recall@1..max_k), ``recall_at_1``,
        ``recall_at_10`` (None when ``max_k < 10``), ``recall_at_1_stderr`` (binomial standard error) and
        timings; ``"atl_relative_improvement_r1"``, ``"triplet_margin"``, ``"config"`` and ``"timing"``.

    Example:
        >>> result = atl_vs_triplet_experiment(num_products=16, views_per_domain=2, epochs=1, max_k=5,
        ...                                    progress=False)
        >>> 0.0 <= result["methods"]["atl"]["recall_at_1"] <= 1.0
        True
    """
    num_products = check_int(num_products, "num_products", 4)
    views_per_domain = check_int(views_per_domain, "views_per_domain", 1)
    epochs = check_int(epochs, "epochs", 1)
    classes_per_batch = check_int(classes_per_batch, "classes_per_batch", 2)
    items_per_class = check_int(items_per_class, "items_per_class", 2)
    embedding_dim = check_int(embedding_dim, "embedding_dim", 1)
    text_dim = check_int(text_dim, "text_dim", 1)
    max_k = check_int(max_k, "max_k", 1)
    seed = check_int(seed, "seed", 0)
    progress = check_bool(progress, "progress")
    target = resolve_device(device)
    clock = Stopwatch()
    train_ids, novel_ids = split_product_ids(num_products, novel_fraction)
    if len(novel_ids) < 2 or len(train_ids) < 2:
        raise ValueError(
            f"num_products={num_products} with novel_fraction={novel_fraction} must leave >= 2 train and >= 2 "
            f"novel products, got {len(train_ids)} and {len(novel_ids)}"
        )
    classes_per_batch = min(classes_per_batch, len(train_ids))
    gallery_size = len(novel_ids) * views_per_domain
    if max_k > gallery_size:
        raise ValueError(f"max_k must be <= the gallery size {gallery_size} (novel products x views), got {max_k}")

    with torch_threads(threads):
        dataset, batch = render_products(num_products, views_per_domain, seed)
        is_train = batch.product_id < len(train_ids)
        train_rows = is_train.nonzero().squeeze(1)
        train_images = batch.image[train_rows].to(target)
        train_labels = batch.product_id[train_rows].to(target)
        encoder = HashedBagOfWordsEncoder(text_dim, seed=seed)
        product_text = encoder(dataset.descriptions).to(target)  # (num_products, text_dim), by product id
        street = dataset.domain_names.index("street")
        query_rows = (~is_train & (batch.domain == street)).nonzero().squeeze(1)
        gallery_rows = (~is_train & (batch.domain != street)).nonzero().squeeze(1)
        query_images, query_labels = batch.image[query_rows].to(target), batch.product_id[query_rows]
        gallery_images, gallery_labels = batch.image[gallery_rows].to(target), batch.product_id[gallery_rows]
        triplet_margin = _mean_adaptive_margin(product_text[: len(train_ids)].cpu(), base_margin, margin_scale)
        render_timing = clock.seconds()

        def evaluate(model: torch.nn.Module) -> dict[str, Any]:
            model.eval()
            query = batched_forward(model, query_images)
            gallery = batched_forward(model, gallery_images)
            curve = recall_curve(query, query_labels, gallery, gallery_labels, max_k)
            r1 = float(curve[0])
            return {
                "recall": [finite_or_none(r) for r in curve.tolist()],
                "recall_at_1": finite_or_none(r1),
                "recall_at_10": finite_or_none(float(curve[9])) if max_k >= 10 else None,
                "recall_at_1_stderr": finite_or_none((r1 * (1.0 - r1) / query_rows.numel()) ** 0.5),
            }

        losses = {
            "triplet": TripletMarginLoss(margin=triplet_margin, metric="euclidean", mining="batch_hard"),
            "atl": AdaptiveTripletLoss(base_margin=base_margin, margin_scale=margin_scale, metric="euclidean"),
        }
        results: dict[str, dict[str, Any]] = {}
        sampler = PKSampler(train_labels.cpu(), classes_per_batch, items_per_class, seed=seed)
        n_steps = epochs * len(sampler)
        for name, criterion in losses.items():
            method_clock = Stopwatch()
            generator = seed_everything(seed)
            # Module.to takes memory_format at run time; torch's overloads of it omit the keyword.
            model = EmbeddingNet(embedding_dim).to(target, memory_format=torch.channels_last)  # type: ignore[call-overload]
            if name == "triplet":  # the shared initial weights, evaluated once for reference
                results["untrained"] = {**evaluate(copy.deepcopy(model)), **method_clock.seconds()}
                method_clock = Stopwatch()
            optimizer, scheduler = make_optimizer(model, n_steps, lr=lr)
            last_loss = float("nan")
            with progress_bar(n_steps, f"[2/3] retrieval: {name}", progress) as bar:
                for epoch in range(epochs):
                    sampler.set_epoch(epoch)
                    model.train()
                    for sampled in sampler:
                        index = torch.as_tensor(sampled, device=target)
                        (images,) = random_flip(train_images[index], generator=generator)
                        embeddings = model(images.contiguous(memory_format=torch.channels_last))
                        labels = train_labels[index]
                        if name == "atl":
                            loss = criterion(embeddings, labels, product_text[labels])
                        else:
                            loss = criterion(embeddings, labels)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        scheduler.step()
                        last_loss = loss.item()
                        bar.update(1)
                        bar.set_postfix(loss=f"{last_loss:.3f}")
            results[name] = {**evaluate(model), "final_train_loss": finite_or_none(last_loss), **method_clock.seconds()}

    r1_triplet, r1_atl = results["triplet"]["recall_at_1"], results["atl"]["recall_at_1"]
    improvement = (r1_atl - r1_triplet) / r1_triplet if r1_triplet else None
    return {
        "experiment": "atl_vs_triplet",
        "methods": results,
        "atl_relative_improvement_r1": finite_or_none(improvement) if improvement is not None else None,
        "triplet_margin": triplet_margin,
        "config": {
            "num_products": num_products,
            "train_products": len(train_ids),
            "novel_products": len(novel_ids),
            "views_per_domain": views_per_domain,
            "queries": int(query_rows.numel()),
            "gallery": int(gallery_rows.numel()),
            "epochs": epochs,
            "steps": n_steps,
            "batch": f"{classes_per_batch} products x {items_per_class} images",
            "embedding_dim": embedding_dim,
            "lr": lr,
            "base_margin": base_margin,
            "margin_scale": margin_scale,
            "text_encoder": repr(encoder),
            "max_k": max_k,
            "seed": seed,
            "device": str(target),
        },
        "timing": {"render": render_timing, **clock.seconds()},
    }
