"""``SyntheticProducts``: a procedural, seeded stand-in for fine-grained product photo collections.

Every image shows one garment-like *product* whose look is fixed by five attribute groups
(colour, pattern, shape, trim, trim colour) plus a few per-product details (silhouette width,
pattern period and phase, trim thickness, a slight shade of its colour). Products are distinct
attribute combinations, so telling them apart means reading all attributes, and the novel
(held-out) products are unseen combinations of seen attribute values.

Two domains imitate shop (``studio``) and consumer (``street``) photos:

* studio: plain light-grey background, even neutral light, large and centred product;
* street: two-tone textured background, 2 to 4 *distractor* garments drawn from the same attribute
  vocabulary (behind the product, partly hidden by it), a colour cast, a light gradient, sensor
  noise, a smaller product at a random position and tilt.

Nothing is downloaded: images are rendered on the fly by the vectorised rasteriser in
:mod:`torchfg.datasets._render` (about 1,500 64 x 64 images per CPU-second on one core through
:meth:`SyntheticProducts.render_batch`, about 500 through ``dataset[i]``). Sample ``(product, domain, view)`` always renders the same
image for a given seed: its random numbers come from a generator seeded with exactly those values,
never from a global RNG, so worker count, shuffling and the chosen split do not change it.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from torchfg._validation import check_bool, check_choice
from torchfg.datasets._predicted_maps import predict_semantic_maps, sample_map_errors
from torchfg.datasets._render import (
    PATTERN_NAMES,
    SHAPE_NAMES,
    TRIM_NAMES,
    ObjectParams,
    SceneParams,
    render_scenes,
)
from torchfg._validation import check_int as _check_int

if sys.version_info >= (3, 11):
    from typing import NamedTuple
else:  # a generic NamedTuple needs Python 3.11; typing_extensions (a dependency of torch) backports it
    from typing_extensions import NamedTuple

__all__ = [
    "ATTRIBUTE_GROUPS",
    "ATTRIBUTE_NAMES",
    "COLOUR_PALETTE",
    "DOMAIN_NAMES",
    "MAP_QUALITIES",
    "SEMANTIC_NAMES",
    "MAX_PRODUCTS",
    "TRIM_COLOUR_PALETTE",
    "ProductCatalogue",
    "ProductSample",
    "SyntheticProducts",
    "split_product_ids",
]

COLOUR_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.96, 0.86, 0.18),
    "green": (0.18, 0.62, 0.22),
    "teal": (0.06, 0.60, 0.62),
    "blue": (0.14, 0.28, 0.86),
    "purple": (0.52, 0.18, 0.70),
    "pink": (0.96, 0.52, 0.72),
}
"""Body colours (RGB in [0, 1]) before lighting and the small per-product shade jitter."""

TRIM_COLOUR_PALETTE: dict[str, tuple[float, float, float]] = {
    "white": (0.97, 0.97, 0.95),
    "black": (0.08, 0.08, 0.09),
    "gold": (0.85, 0.68, 0.18),
}
"""Trim colours (RGB in [0, 1])."""

ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOUR_PALETTE),
    "pattern": PATTERN_NAMES,
    "shape": SHAPE_NAMES,
    "trim": TRIM_NAMES,
    "trim_colour": tuple(TRIM_COLOUR_PALETTE),
}
"""Attribute groups in the order they appear in the multi-hot vector; each product has one value
per group. ``trim`` is where the contrasting band sits: ``collar`` = top edge (the waistband of
trousers and skirts), ``hem`` = bottom edge, ``belt`` = a band across the middle."""

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(
    f"{group}={value}" for group, values in ATTRIBUTE_GROUPS.items() for value in values
)
"""Names of the multi-hot attribute entries, e.g. ``"colour=red"`` (23 in all)."""

SEMANTIC_NAMES: tuple[str, ...] = ("background", "body", "trim")
"""Channels of the semantic map. ``background`` includes the distractors."""

DOMAIN_NAMES: tuple[str, ...] = ("studio", "street")
"""Domain tags; a sample's ``domain`` is an index into this tuple."""

MAP_QUALITIES: tuple[str, ...] = ("exact", "predicted")
"""Values of ``SyntheticProducts(map_quality=...)``: ``"exact"``, the rendered ground truth, or
``"predicted"``, that map with the errors of a parsing model (see :meth:`SyntheticProducts.predicted_maps`)."""

# Trim colours too close to the body colour would make the trim attribute invisible.
_MIN_TRIM_CONTRAST = 0.3
_COLOUR_JITTER = 0.04
_CATALOGUE_STREAM = 0x0CA7A106
_SCENE_STREAM = 0x5CE7E
_NOISE_STREAM = 0x7015E
_MAP_STREAM = 0x3A9E
_NOISE_BANK_SIZE = 8
_COLOURS = np.array(list(COLOUR_PALETTE.values()))
_TRIM_COLOURS = np.array(list(TRIM_COLOUR_PALETTE.values()))


@contextmanager
def _single_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run CPU rendering with one intra-op thread, restoring the setting afterwards.

    The renderer issues many ops on tensors of a few hundred KiB: splitting each over threads
    saves little, and on a machine whose cores are busy the threads' barriers made rendering
    15-60x slower in CPU time (measured on a shared 2-core machine). DataLoader workers already
    use one thread each, so this changes nothing there.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ProductSample's two type parameters: a single sample holds ints and a str where a batch holds
# (B,) tensors and B strings. Covariant: the fields are read-only.
_IdT = TypeVar("_IdT", bound=Union[int, torch.Tensor], covariant=True)
_TextT = TypeVar("_TextT", bound=Union[str, Sequence[str]], covariant=True)


class ProductSample(NamedTuple, Generic[_IdT, _TextT]):
    """One sample (or, from :meth:`SyntheticProducts.render_batch` / a ``DataLoader``, a batch of B).

    ``torch.utils.data.default_collate`` batches it field by field: tensors are stacked, ints become
    int64 tensors and descriptions a tuple of strings, so a plain ``DataLoader`` works.

    For type checkers it is generic in the types of the id fields (``product_id``, ``domain``,
    ``view``) and of ``description``: ``dataset[i]`` is a ``ProductSample[int, str]`` and
    :meth:`SyntheticProducts.render_batch` returns a ``ProductSample[torch.Tensor, list[str]]``.

    Attributes:
        image: ``(3, H, W)`` float32 in ``[0, 1]`` (batched: ``(B, 3, H, W)``); whatever the
            dataset's ``transform`` returns if one is set.
        product_id: product (class) id, global across splits (batched: ``(B,)`` int64).
        attributes: ``(A,)`` float32 multi-hot vector of the product's attributes, ``A = 23``, names in
            :data:`ATTRIBUTE_NAMES` (batched: ``(B, A)``). Distractors do not contribute.
        semantic_map: ``(K, H, W)`` float32 in ``[0, 1]``, ``K = 3`` channels (background, body, trim)
            of the product that sum to 1 per pixel (batched: ``(B, K, H, W)``). With
            ``map_quality="exact"`` the rendered ground truth, soft only on one-pixel edges; with
            ``"predicted"`` blurred, offset, with missed parts and false blobs, like a parser's output.
        description: short text such as ``"red striped shirt with white collar"`` (batched: a list of
            str from :meth:`SyntheticProducts.render_batch`, a tuple from ``default_collate``).
        domain: index into :data:`DOMAIN_NAMES`, 0 = studio, 1 = street (batched: ``(B,)`` int64).
        view: view number of this product in this domain, ``0 <= view < views_per_domain``.
    """

    image: torch.Tensor
    product_id: _IdT
    attributes: torch.Tensor
    semantic_map: torch.Tensor
    description: _TextT
    domain: _IdT
    view: _IdT


@functools.lru_cache(maxsize=1)
def _valid_combinations() -> list[tuple[int, int, int, int, int]]:
    """All (colour, pattern, shape, trim, trim_colour) index tuples whose trim is visible."""
    body = np.array(list(COLOUR_PALETTE.values()))
    trim = np.array(list(TRIM_COLOUR_PALETTE.values()))
    combos = []
    for c in range(len(body)):
        for p in range(len(PATTERN_NAMES)):
            for s in range(len(SHAPE_NAMES)):
                for t in range(len(TRIM_NAMES)):
                    for tc in range(len(trim)):
                        if np.linalg.norm(body[c] - trim[tc]) >= _MIN_TRIM_CONTRAST:
                            combos.append((c, p, s, t, tc))
    return combos


MAX_PRODUCTS = len(_valid_combinations())
"""Number of distinct valid attribute combinations, the largest possible ``num_products``."""


def split_product_ids(num_products: int, novel_fraction: float = 0.25) -> tuple[list[int], list[int]]:
    """Product ids of the ``train`` (base) and ``novel`` (held-out) classes.

    Products are generated in random order, so the split is simply ``train = [0, n_train)`` and
    ``novel = [n_train, num_products)`` with ``n_novel = round(num_products * novel_fraction)``:
    train ids are contiguous from 0, usable directly as classifier targets.

    Example:
        >>> split_product_ids(8, 0.25)
        ([0, 1, 2, 3, 4, 5], [6, 7])
    """
    num_products = _check_int(num_products, "num_products", minimum=1)
    if not isinstance(novel_fraction, numbers.Real) or isinstance(novel_fraction, bool):
        raise TypeError(f"novel_fraction must be a number, got {type(novel_fraction).__name__}")
    if not 0.0 <= novel_fraction <= 1.0:
        raise ValueError(f"novel_fraction must be in [0, 1], got {novel_fraction}")
    n_novel = int(round(num_products * novel_fraction))
    n_train = num_products - n_novel
    return list(range(n_train)), list(range(n_train, num_products))


@dataclass(frozen=True)
class ProductCatalogue:
    """The products of one seed: attribute indices and per-product appearance, P rows each.

    Attributes:
        colour, pattern, shape, trim, trim_colour: ``(P,)`` int64 indices into the value tuples of
            :data:`ATTRIBUTE_GROUPS`.
        body_rgb, trim_rgb: ``(P, 3)`` float32 colours before lighting.
        width, period, trim_thickness: ``(P,)`` float32 silhouette stretch, pattern period, trim band
            thickness (local units).
        phase: ``(P, 2)`` float32 pattern phase, fixed per product like a real print.
    """

    colour: torch.Tensor
    pattern: torch.Tensor
    shape: torch.Tensor
    trim: torch.Tensor
    trim_colour: torch.Tensor
    body_rgb: torch.Tensor
    trim_rgb: torch.Tensor
    width: torch.Tensor
    period: torch.Tensor
    phase: torch.Tensor
    trim_thickness: torch.Tensor

    @classmethod
    def generate(cls, num_products: int, seed: int) -> "ProductCatalogue":
        """``num_products`` distinct attribute combinations drawn at random for ``seed``."""
        num_products = _check_int(num_products, "num_products", minimum=1)
        seed = _check_int(seed, "seed", minimum=0)
        combos = _valid_combinations()
        if num_products > len(combos):
            raise ValueError(
                f"num_products must be <= {len(combos)} (distinct attribute combinations), got {num_products}"
            )
        rng = np.random.default_rng([seed, _CATALOGUE_STREAM])
        chosen = np.array(combos)[rng.choice(len(combos), size=num_products, replace=False)]  # (P, 5)
        body = np.array(list(COLOUR_PALETTE.values()))[chosen[:, 0]]
        body = np.clip(body + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=body.shape), 0.0, 1.0)
        trim_rgb = np.array(list(TRIM_COLOUR_PALETTE.values()))[chosen[:, 4]]
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        i64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
        return cls(
            colour=i64(chosen[:, 0]),
            pattern=i64(chosen[:, 1]),
            shape=i64(chosen[:, 2]),
            trim=i64(chosen[:, 3]),
            trim_colour=i64(chosen[:, 4]),
            body_rgb=f32(body),
            trim_rgb=f32(trim_rgb),
            width=f32(rng.uniform(0.9, 1.1, num_products)),
            period=f32(rng.uniform(0.30, 0.42, num_products)),
            phase=f32(rng.uniform(0.0, 1.0, (num_products, 2))),
            trim_thickness=f32(rng.uniform(0.18, 0.26, num_products)),
        )

    def __len__(self) -> int:
        return int(self.colour.shape[0])

    def attribute_indices(self) -> torch.Tensor:
        """``(P, 5)`` int64: per product, the value index in each group of :data:`ATTRIBUTE_GROUPS`."""
        return torch.stack((self.colour, self.pattern, self.shape, self.trim, self.trim_colour), dim=1)

    def attributes(self) -> torch.Tensor:
        """``(P, A)`` float32 multi-hot vectors, columns named by :data:`ATTRIBUTE_NAMES`."""
        sizes = [len(v) for v in ATTRIBUTE_GROUPS.values()]
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        multi_hot = torch.zeros(len(self), sum(sizes))
        multi_hot.scatter_(1, self.attribute_indices() + offsets, 1.0)
        return multi_hot

    def description(self, product_id: int) -> str:
        """Short text of one product, ``"<colour> <pattern> <shape> with <trim colour> <trim>"``.

        Raises:
            ValueError: ``product_id`` not in ``[0, len(self))``; a negative id is not an offset from
                the end, product ids are labels.
        """
        product_id = _check_int(product_id, "product_id", minimum=0)
        if product_id >= len(self):
            raise ValueError(f"product_id must be < {len(self)} (the number of products), got {product_id}")
        words = [ATTRIBUTE_GROUPS[g][int(i)] for g, i in zip(ATTRIBUTE_GROUPS, self.attribute_indices()[product_id])]
        colour, pattern, shape, trim, trim_colour = words
        return f"{colour} {pattern} {shape} with {trim_colour} {trim}"

    def descriptions(self) -> list[str]:
        """Descriptions of all P products, indexed by product id."""
        return [self.description(i) for i in range(len(self))]


class SyntheticProducts(Dataset[ProductSample[int, str]]):
    """Procedural fine-grained product images with attributes, semantic maps, text and domains.

    Sample ``i`` is view ``v`` of product ``p`` in domain ``d``, laid out product-major:
    ``i = (p_rank * len(domains) + d_rank) * views_per_domain + v`` where ``p_rank`` is the position of
    ``p`` in :attr:`product_ids`. See :class:`ProductSample` for the fields and shapes and the module
    docstring for what the domains look like.

    Args:
        split: ``"train"`` (base classes), ``"novel"`` (held-out classes) or ``"all"``; see
            :func:`split_product_ids`. Product ids are global: the same id is the same product in
            every split, and the same (product, domain, view) renders the same image in every split.
        num_products: products in the catalogue (all splits together), at most :data:`MAX_PRODUCTS`.
        novel_fraction: share of the products held out as novel classes.
        views_per_domain: images of each product in each domain.
        domains: which of :data:`DOMAIN_NAMES` to include.
        image_size: height = width of the images and semantic maps (>= 16).
        num_distractors: ``(min, max)`` distractor garments per street image.
        seed: catalogue and rendering seed (int >= 0).
        map_quality: ``"exact"`` (default): the semantic map is the rendered ground truth, exact to
            the pixel; ``"predicted"``: what a human-parsing / segmentation model would give instead
            (see :meth:`predicted_maps`), the realistic input of a semantic-guided classifier.
        transform: optional callable applied to the ``(3, H, W)`` image in :meth:`__getitem__` (not in
            :meth:`render_batch`), e.g. augmentations.

    Example:
        >>> ds = SyntheticProducts("train", num_products=20, views_per_domain=2, seed=0)
        >>> len(ds)  # 15 train products x 2 domains x 2 views
        60
        >>> s = ds[0]
        >>> s.image.shape, s.semantic_map.shape, s.attributes.shape
        (torch.Size([3, 64, 64]), torch.Size([3, 64, 64]), torch.Size([23]))
        >>> batch = ds.render_batch(range(8))  # fast batched rendering, same pixels as ds[i]
        >>> batch.image.shape
        torch.Size([8, 3, 64, 64])
    """

    attribute_names: tuple[str, ...] = ATTRIBUTE_NAMES
    attribute_groups: dict[str, tuple[str, ...]] = ATTRIBUTE_GROUPS
    semantic_names: tuple[str, ...] = SEMANTIC_NAMES
    domain_names: tuple[str, ...] = DOMAIN_NAMES

    def __init__(
        self,
        split: str = "train",
        *,
        num_products: int = 100,
        novel_fraction: float = 0.25,
        views_per_domain: int = 5,
        domains: Sequence[str] = DOMAIN_NAMES,
        image_size: int = 64,
        num_distractors: tuple[int, int] = (2, 4),
        seed: int = 0,
        map_quality: str = "exact",
        transform: Callable[[torch.Tensor], object] | None = None,
    ) -> None:
        self.split = check_choice(split, "split", ("train", "novel", "all"))
        self.map_quality = check_choice(map_quality, "map_quality", MAP_QUALITIES)
        self.seed = _check_int(seed, "seed", minimum=0)
        self.views_per_domain = _check_int(views_per_domain, "views_per_domain", minimum=1)
        self.image_size = _check_int(image_size, "image_size", minimum=16)
        if isinstance(domains, str) or not isinstance(domains, Sequence) or len(domains) == 0:
            raise TypeError(f"domains must be a non-empty sequence of names from {DOMAIN_NAMES}, got {domains!r}")
        for name in domains:
            check_choice(name, "domains", DOMAIN_NAMES)
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains must not repeat a name, got {tuple(domains)}")
        self.domains: tuple[str, ...] = tuple(domains)
        self._domain_ids = [DOMAIN_NAMES.index(d) for d in self.domains]
        if not isinstance(num_distractors, (tuple, list)) or len(num_distractors) != 2:
            raise TypeError(f"num_distractors must be a (min, max) pair of ints, got {num_distractors!r}")
        lo = _check_int(num_distractors[0], "num_distractors[0]", minimum=0)
        hi = _check_int(num_distractors[1], "num_distractors[1]", minimum=0)
        if lo > hi:
            raise ValueError(f"num_distractors must have min <= max, got {tuple(num_distractors)}")
        self.num_distractors = (lo, hi)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.transform = transform
        self._noise_bank_cache: torch.Tensor | None = None

        self.num_products = _check_int(num_products, "num_products", minimum=1)
        train_ids, novel_ids = split_product_ids(num_products, novel_fraction)
        ids = {"train": train_ids, "novel": novel_ids, "all": train_ids + novel_ids}[split]
        if not ids:
            raise ValueError(
                f"split={split!r} has no products with num_products={num_products} and novel_fraction={novel_fraction}"
            )
        self.novel_fraction = float(novel_fraction)
        self.catalogue = ProductCatalogue.generate(num_products, self.seed)
        self.product_ids = torch.tensor(ids, dtype=torch.int64)
        self._attributes = self.catalogue.attributes()
        self._descriptions = self.catalogue.descriptions()

        per_product = len(self.domains) * self.views_per_domain
        index = torch.arange(len(ids) * per_product)
        self.labels = self.product_ids[index // per_product]
        """``(len,)`` int64 product id of every sample, without rendering (for samplers)."""
        domain_rank = (index // self.views_per_domain) % len(self.domains)
        self.domain_labels = torch.tensor(self._domain_ids, dtype=torch.int64)[domain_rank]
        """``(len,)`` int64 domain index of every sample."""
        self.view_labels = index % self.views_per_domain
        """``(len,)`` int64 view number of every sample."""
        self._keys = list(zip(self.labels.tolist(), self.domain_labels.tolist(), self.view_labels.tolist()))

    # ------------------------------------------------------------------ metadata
    @property
    def num_classes(self) -> int:
        """Number of products in this split."""
        return int(self.product_ids.shape[0])

    @property
    def num_attributes(self) -> int:
        """Number of binary attributes per item (the length of ``ProductSample.attributes``)."""
        return len(ATTRIBUTE_NAMES)

    @property
    def descriptions(self) -> list[str]:
        """Descriptions of all catalogue products, indexed by global product id."""
        return list(self._descriptions)

    @property
    def attributes(self) -> torch.Tensor:
        """``(num_products, A)`` multi-hot attributes of all catalogue products, by product id."""
        return self._attributes.clone()

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(product_id, domain, view)`` of sample ``index`` (negative indices count from the end)."""
        n = len(self)
        if isinstance(index, bool):
            raise TypeError("index must be an int, got bool")
        try:
            position = operator.index(index)  # int, NumPy integer or 0-d integer tensor
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if not -n <= position < n:
            raise IndexError(f"index {position} out of range for a dataset of length {n}")
        return self._keys[position]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    # ------------------------------------------------------------------ samples
    def __getitem__(self, index: int) -> ProductSample[int, str]:
        batch = self.render_batch([index])
        rendered = batch.image[0]
        image: object = rendered if self.transform is None else self.transform(rendered)
        return ProductSample(
            image=image,  # type: ignore[arg-type]
            product_id=int(batch.product_id[0]),
            attributes=batch.attributes[0],
            semantic_map=batch.semantic_map[0],
            description=batch.description[0],
            domain=int(batch.domain[0]),
            view=int(batch.view[0]),
        )

    def render_batch(
        self,
        indices: Sequence[int] | torch.Tensor | None = None,
        *,
        include_product: bool = True,
        include_distractors: bool = True,
        chunk_size: int = 32,
        device: torch.device | str | None = None,
    ) -> ProductSample[torch.Tensor, list[str]]:
        """Render many samples at once (much faster than indexing one by one); no ``transform``.

        CPU rendering uses one intra-op thread (the previous ``torch.get_num_threads()`` is restored
        on return); parallelise with DataLoader workers instead.

        Args:
            indices: sample indices (default: the whole dataset).
            include_product, include_distractors: set False to leave the product or the street
                distractors out of the image; everything else (background, light, noise, semantic map)
                stays identical, which shows what each layer contributes.
            chunk_size: scenes rendered per vectorised pass (bounds peak memory).
            device: where to render; default CPU.

        Returns:
            a batched :class:`ProductSample`: images ``(B, 3, H, W)``, semantic maps ``(B, 3, H, W)``,
            attributes ``(B, A)``, product ids / domains / views ``(B,)`` int64, descriptions list of B.
        """
        if indices is None:
            indices = range(len(self))
        if not isinstance(indices, (torch.Tensor, Sequence, range)):
            raise TypeError(
                "indices must be a sequence of ints or a 1-D integer tensor (render_batch([i]) for one "
                f"sample), got {type(indices).__name__}"
            )
        if isinstance(indices, torch.Tensor):
            if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dim() != 1:
                raise TypeError(
                    "indices must be a 1-D integer tensor or a sequence of ints, "
                    f"got {indices.dtype} tensor of shape {tuple(indices.shape)}"
                )
            indices = indices.tolist()
        include_product = check_bool(include_product, "include_product")
        include_distractors = check_bool(include_distractors, "include_distractors")
        chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)
        keys = [self.locate(i) for i in indices]
        target = torch.device(device) if device is not None else torch.device("cpu")
        size = self.image_size
        images, semantics = [], []
        with _single_intra_op_thread(target):
            for start in range(0, len(keys), chunk_size):
                scene = self.scene_params(keys[start : start + chunk_size]).to(target)
                image, semantic = render_scenes(
                    scene, size, include_product=include_product, include_distractors=include_distractors
                )
                if self.map_quality == "predicted":
                    semantic = self._predict(semantic, keys[start : start + chunk_size], scene.product)
                images.append(image)
                semantics.append(semantic)
        product_ids = torch.tensor([k[0] for k in keys], dtype=torch.int64)
        empty = torch.zeros(0, 3, size, size, device=target)
        return ProductSample(
            image=torch.cat(images) if images else empty,
            product_id=product_ids,
            attributes=self._attributes[product_ids].to(target),
            semantic_map=torch.cat(semantics) if semantics else empty.clone(),
            description=[self._descriptions[k[0]] for k in keys],
            domain=torch.tensor([k[1] for k in keys], dtype=torch.int64),
            view=torch.tensor([k[2] for k in keys], dtype=torch.int64),
        )

    # ------------------------------------------------------------------ predicted maps
    def predicted_maps(
        self, exact: torch.Tensor, indices: Sequence[int] | torch.Tensor
    ) -> torch.Tensor:
        """What a parsing model would predict for these samples, from their exact maps.

        ``render_batch`` of a ``map_quality="predicted"`` dataset returns exactly this; calling it on
        exact maps already rendered gives both versions of a sample for the cost of one rendering.
        Four errors, each drawn per sample from a generator seeded by ``(seed, product, domain, view)``
        alone (the same sample always gets the same predicted map):

        * offset: the map is shifted by up to 4% of the image width along each axis;
        * blur: a Gaussian of 0.6 to 1.9 pixels at 64 x 64 (soft, uncertain edges);
        * missed parts: in each of two slots with probability 0.6, a disc on the product (radius a
          quarter to a half of the garment's half size) where 60-100% of the probability is lost;
        * false detections: in each of two slots with probability 0.4, a Gaussian blob of product
          probability anywhere in the image, on the background or on a distractor.

        Args:
            exact: ``(B, 3, S, S)`` exact maps of the samples (``S = image_size``).
            indices: the B sample indices of this dataset they belong to.

        Returns:
            ``(B, 3, S, S)`` maps (background, body, trim) in [0, 1], summing to 1 per pixel, on
            ``exact``'s device.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        keys = [self.locate(i) for i in indices]
        size = self.image_size
        if not isinstance(exact, torch.Tensor) or exact.shape != (len(keys), 3, size, size):
            shape = tuple(exact.shape) if isinstance(exact, torch.Tensor) else type(exact).__name__
            raise ValueError(f"exact must be a ({len(keys)}, 3, {size}, {size}) tensor (one map per index), got {shape}")
        if not keys:
            return exact.clone()
        poses = torch.from_numpy(np.stack([self._sample_scene(*key)["pose"] for key in keys]).astype(np.float32))
        with _single_intra_op_thread(exact.device):
            return self._predict_pose(exact.float(), keys, poses[:, :2], poses[:, 2])

    def _predict(self, exact: torch.Tensor, keys: Sequence[tuple[int, int, int]], product: ObjectParams) -> torch.Tensor:
        return self._predict_pose(exact, keys, product.centre.cpu(), product.scale.cpu())

    def _predict_pose(
        self, exact: torch.Tensor, keys: Sequence[tuple[int, int, int]], centre: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        rngs = [np.random.default_rng([self.seed, *key, _MAP_STREAM]) for key in keys]
        return predict_semantic_maps(exact, sample_map_errors(rngs, centre, scale))

    # ------------------------------------------------------------------ scene sampling
    def scene_params(self, keys: Sequence[tuple[int, int, int]]) -> SceneParams:
        """Random scene parameters of the given ``(product_id, domain, view)`` keys, on the CPU.

        Each key's parameters come from a NumPy generator seeded with ``(seed, product_id, domain,
        view)``, so they do not depend on which other keys are in the batch.
        """
        m = self.num_distractors[1]
        records = [self._sample_scene(*key) for key in keys]
        stack = lambda name: torch.from_numpy(np.stack([r[name] for r in records]).astype(np.float32))  # noqa: E731
        cat = self.catalogue
        pid = torch.tensor([k[0] for k in keys], dtype=torch.int64)
        pose = stack("pose")  # (B, 4): x, y, scale, angle
        product = ObjectParams(
            shape=cat.shape[pid],
            pattern=cat.pattern[pid],
            trim=cat.trim[pid],
            body_rgb=cat.body_rgb[pid],
            trim_rgb=cat.trim_rgb[pid],
            width=cat.width[pid],
            period=cat.period[pid],
            phase=cat.phase[pid],
            trim_thickness=cat.trim_thickness[pid],
            centre=pose[:, :2],
            scale=pose[:, 2],
            angle=pose[:, 3],
        )
        dist_ids = torch.from_numpy(np.stack([r["d_ids"] for r in records])).long().view(-1, 3)  # (B*M, 3)
        dist = stack("d_float").view(-1, 15)  # (B*M, 15)
        distractors = ObjectParams(
            shape=dist_ids[:, 0],
            pattern=dist_ids[:, 1],
            trim=dist_ids[:, 2],
            body_rgb=dist[:, 0:3],
            trim_rgb=dist[:, 3:6],
            width=dist[:, 6],
            period=dist[:, 7],
            phase=dist[:, 8:10],
            trim_thickness=dist[:, 10],
            centre=dist[:, 11:13],
            scale=dist[:, 13],
            angle=dist[:, 14],
        )
        noise = stack("noise")  # (B, 2): bank entry, standard deviation
        pixel_noise = self._noise_bank[noise[:, 0].long()] * noise[:, 1].view(-1, 1, 1, 1)
        return SceneParams(
            product=product,
            distractors=distractors,
            distractor_active=torch.from_numpy(np.stack([r["d_active"] for r in records])).view(len(records), m),
            wall_rgb=stack("wall"),
            floor_rgb=stack("floor"),
            horizon=stack("horizon"),
            coarse_texture=stack("coarse"),
            fine_texture=stack("fine"),
            gain=stack("gain"),
            gradient=stack("gradient"),
            pixel_noise=pixel_noise,
        )

    @property
    def _noise_bank(self) -> torch.Tensor:
        # Sensor noise is drawn from a small per-seed bank: a fresh 3 x H x W normal field per
        # image would cost more than rendering it, and noise need not be unique per image.
        if self._noise_bank_cache is None:
            rng = np.random.default_rng([self.seed, _NOISE_STREAM])
            bank = rng.standard_normal((_NOISE_BANK_SIZE, 3, self.image_size, self.image_size), dtype=np.float32)
            self._noise_bank_cache = torch.from_numpy(bank)
        return self._noise_bank_cache

    def _sample_scene(self, product_id: int, domain: int, view: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, product_id, domain, view, _SCENE_STREAM])
        fine = max(4, self.image_size // 4)
        m = self.num_distractors[1]
        # One uniform draw per scalar, mapped to its range below: a handful of generator calls
        # per scene keeps sampling cheaper than rendering.
        q = rng.random(20)
        lerp = lambda lo, hi, t: lo + (hi - lo) * t  # noqa: E731
        r: dict[str, np.ndarray] = {}
        if DOMAIN_NAMES[domain] == "studio":
            grey = lerp(0.80, 0.88, q[0]) + lerp(-0.02, 0.02, q[1:4])
            r["wall"] = r["floor"] = grey
            r["horizon"] = np.array(2.0)  # below the image: all wall
            r["coarse"] = np.zeros((3, 4, 4))
            r["fine"] = np.zeros((1, fine, fine))
            r["gain"] = lerp(0.97, 1.03, q[4:7]) * lerp(0.98, 1.02, q[7])
            r["gradient"] = np.zeros(2)
            r["noise"] = np.zeros(2)
            scale = lerp(0.78, 0.88, q[8])
            centre = lerp(-0.04, 0.04, q[9:11])
            angle = math.radians(lerp(-3.0, 3.0, q[11]))
            n_active = 0
        else:
            r["wall"] = 0.5 * lerp(0.1, 0.9, q[0:3]) + 0.5 * lerp(0.2, 0.8, q[3])
            r["floor"] = 0.5 * lerp(0.1, 0.9, q[4:7]) + 0.5 * lerp(0.2, 0.8, q[7])
            r["horizon"] = np.array(lerp(-0.3, 0.6, q[8]))
            r["coarse"] = rng.normal(0.0, 0.08, (3, 4, 4))
            r["fine"] = rng.normal(0.0, 0.05, (1, fine, fine))
            r["gain"] = lerp(0.82, 1.18, q[9:12]) * lerp(0.8, 1.1, q[12])
            r["gradient"] = lerp(-0.25, 0.25, q[13:15])
            r["noise"] = np.array([np.floor(q[15] * _NOISE_BANK_SIZE), lerp(0.01, 0.03, q[16])])
            scale = lerp(0.42, 0.62, q[17])
            margin = max(0.0, 1.0 - 1.1 * scale)
            centre = lerp(-margin, margin, rng.random(2))
            angle = math.radians(lerp(-12.0, 12.0, q[18]))
            lo, hi = self.num_distractors
            n_active = lo + min(int(q[19] * (hi - lo + 1)), hi - lo)
        r["pose"] = np.array([centre[0], centre[1], scale, angle])

        # Distractors: the same attribute vocabulary as products, placed around the product so
        # that most of each stays visible. All M slots are drawn so the stream length is fixed.
        d = rng.random((m, 16))
        n_colour, n_trim_colour = len(COLOUR_PALETTE), len(TRIM_COLOUR_PALETTE)
        pick = lambda t, k: np.minimum((t * k).astype(np.int64), k - 1)  # noqa: E731
        r["d_ids"] = np.stack(
            (pick(d[:, 0], len(SHAPE_NAMES)), pick(d[:, 1], len(PATTERN_NAMES)), pick(d[:, 2], len(TRIM_NAMES))), 1
        )
        body = _COLOURS[pick(d[:, 3], n_colour)] + lerp(-_COLOUR_JITTER, _COLOUR_JITTER, d[:, 4:7])
        trim = _TRIM_COLOURS[pick(d[:, 7], n_trim_colour)]
        direction = lerp(0.0, 2.0 * math.pi, d[:, 8])
        distance = lerp(0.55, 1.1, d[:, 9])
        offset = distance[:, None] * np.stack((np.cos(direction), np.sin(direction)), 1)
        r["d_float"] = np.concatenate(
            (
                np.clip(body, 0.0, 1.0),
                trim,
                lerp(0.9, 1.1, d[:, 10:11]),  # width
                lerp(0.30, 0.42, d[:, 11:12]),  # period
                d[:, 12:14],  # phase
                lerp(0.18, 0.26, d[:, 14:15]),  # trim thickness
                np.clip(centre[None, :] + offset, -0.9, 0.9),
                lerp(0.28, 0.45, d[:, 15:16]),  # scale
                np.radians(lerp(-30.0, 30.0, rng.random((m, 1)))),  # angle
            ),
            axis=1,
        )
        r["d_active"] = np.arange(m) < n_active
        return r

    def __repr__(self) -> str:
        return (
            f"SyntheticProducts(split={self.split!r}, products={self.num_classes}/{self.num_products}, "
            f"domains={self.domains}, views_per_domain={self.views_per_domain}, image_size={self.image_size}, "
            f"seed={self.seed}, map_quality={self.map_quality!r}, len={len(self)})"
        )
