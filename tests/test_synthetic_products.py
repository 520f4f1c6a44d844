"""SyntheticProducts and the hashed bag-of-words text encoder: determinism, labels vs pixels, domains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from torchfg.datasets import (
    ATTRIBUTE_GROUPS,
    ATTRIBUTE_NAMES,
    DOMAIN_NAMES,
    SEMANTIC_NAMES,
    HashedBagOfWordsEncoder,
    ProductCatalogue,
    ProductSample,
    SyntheticProducts,
    split_product_ids,
)
from torchfg.datasets.synthetic_products import COLOUR_PALETTE, TRIM_COLOUR_PALETTE

GROUPS = list(ATTRIBUTE_GROUPS)


def small(split: str = "all", **kwargs) -> SyntheticProducts:
    options = dict(num_products=24, views_per_domain=2, seed=3)
    options.update(kwargs)
    return SyntheticProducts(split, **options)


@pytest.fixture(scope="module")
def studio() -> tuple[SyntheticProducts, ProductSample]:
    """One studio view of 60 products (covers every attribute value), rendered once."""
    ds = SyntheticProducts("all", num_products=60, views_per_domain=1, domains=("studio",), seed=1)
    return ds, ds.render_batch()


def attribute_value(ds: SyntheticProducts, product_id: int, group: str) -> str:
    index = int(ds.catalogue.attribute_indices()[product_id, GROUPS.index(group)])
    return ATTRIBUTE_GROUPS[group][index]


def nearest(palette: dict[str, tuple[float, float, float]], rgb: torch.Tensor) -> str:
    names = list(palette)
    distances = (torch.tensor(list(palette.values())) - rgb).norm(dim=1)
    return names[int(distances.argmin())]


# ---------------------------------------------------------------------------- API and determinism


def test_sample_fields_shapes_and_ranges() -> None:
    ds = small(image_size=40)
    assert len(ds) == 24 * 2 * 2
    sample = ds[5]
    assert isinstance(sample, ProductSample)
    assert sample.image.shape == (3, 40, 40) and sample.image.dtype == torch.float32
    assert sample.semantic_map.shape == (len(SEMANTIC_NAMES), 40, 40)
    assert sample.attributes.shape == (len(ATTRIBUTE_NAMES),)
    assert 0.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0
    assert 0.0 <= float(sample.semantic_map.min()) and float(sample.semantic_map.max()) <= 1.0
    torch.testing.assert_close(sample.semantic_map.sum(0), torch.ones(40, 40))
    # One value per attribute group.
    sizes = [len(v) for v in ATTRIBUTE_GROUPS.values()]
    assert [int(chunk.sum()) for chunk in sample.attributes.split(sizes)] == [1] * len(sizes)
    assert (sample.product_id, sample.domain, sample.view) == ds.locate(5)
    assert DOMAIN_NAMES[sample.domain] in ds.domains
    assert (ds.labels[5], ds.domain_labels[5], ds.view_labels[5]) == ds.locate(5)


def test_same_seed_same_samples_and_different_seed_differs() -> None:
    a, b = small(), small()
    indices = [0, 3, 17, 50, len(a) - 1]
    torch.manual_seed(123)  # the global RNG must not matter
    first = a.render_batch(indices)
    torch.manual_seed(999)
    second = b.render_batch(indices)
    assert torch.equal(first.image, second.image)
    assert torch.equal(first.semantic_map, second.semantic_map)
    assert first.description == second.description
    other = small(seed=4).render_batch(indices)
    assert not torch.equal(first.image, other.image)
    assert small(seed=4).descriptions != a.descriptions


def test_item_equals_batched_rendering_in_any_order() -> None:
    ds = small()
    order = [33, 2, 71, 8, 60, 2]
    batch = ds.render_batch(order, chunk_size=4)  # chunks mix domains and split the list
    for row, index in enumerate(order):
        item = ds[index]
        torch.testing.assert_close(item.image, batch.image[row], rtol=0, atol=1e-6)
        torch.testing.assert_close(item.semantic_map, batch.semantic_map[row], rtol=0, atol=1e-6)
        assert item.product_id == int(batch.product_id[row])
        assert item.description == batch.description[row]


def test_dataloader_workers_and_collate() -> None:
    ds = small(num_products=8, views_per_domain=1)
    indices = list(range(len(ds)))
    reference = ds.render_batch(indices)
    loader = DataLoader(ds, batch_size=len(ds), num_workers=2, shuffle=False)
    (batch,) = list(loader)
    assert isinstance(batch, ProductSample)
    assert list(batch.description) == reference.description
    assert torch.equal(batch.product_id, reference.product_id)
    assert torch.equal(batch.domain, reference.domain)
    torch.testing.assert_close(batch.image, reference.image, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch.attributes, reference.attributes)


def test_splits_are_disjoint_and_render_the_same_images() -> None:
    train_ids, novel_ids = split_product_ids(24, 0.25)
    assert train_ids == list(range(18)) and novel_ids == list(range(18, 24))
    train, novel, full = small("train"), small("novel"), small("all")
    assert set(train.product_ids.tolist()) == set(train_ids)
    assert set(novel.product_ids.tolist()) == set(novel_ids)
    assert len(train) + len(novel) == len(full)
    # The same (product, domain, view) is the same image in every split.
    key = novel.locate(3)
    position = [full.locate(i) for i in range(len(full))].index(key)
    torch.testing.assert_close(novel[3].image, full[position].image, rtol=0, atol=0)
    one_domain = small(domains=("street",))
    assert set(one_domain.domain_labels.tolist()) == {DOMAIN_NAMES.index("street")}


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="split"):
        SyntheticProducts("val")
    with pytest.raises(ValueError, match="num_products"):
        SyntheticProducts(num_products=10**6)
    with pytest.raises(TypeError, match="seed"):
        SyntheticProducts(seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        SyntheticProducts(seed=-1)
    with pytest.raises(ValueError, match="domains"):
        SyntheticProducts(domains=("beach",))
    with pytest.raises(ValueError, match="num_distractors"):
        SyntheticProducts(num_distractors=(3, 1))
    with pytest.raises(ValueError, match="novel_fraction"):
        SyntheticProducts(novel_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        SyntheticProducts("novel", num_products=4, novel_fraction=0.0)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticProducts(image_size=8)
    with pytest.raises(IndexError):
        small()[10_000]



def test_render_batch_refuses_non_bool_flags() -> None:
    # "no" is truthy: the product / distractors used to be drawn anyway.
    ds = small(num_products=4, views_per_domain=1)
    with pytest.raises(TypeError, match="include_product must be a bool"):
        ds.render_batch([0], include_product="no")
    with pytest.raises(TypeError, match="include_distractors must be a bool"):
        ds.render_batch([0], include_distractors=0)
    # One index, not a sequence of them: "'int' object is not iterable".
    with pytest.raises(TypeError, match=r"indices must be a sequence.*render_batch\(\[i\]\)"):
        ds.render_batch(3)


def test_description_requires_an_existing_product_id() -> None:
    catalogue = ProductCatalogue.generate(5, 0)
    assert catalogue.description(4) == catalogue.descriptions()[4]
    # -1 used to be the last product, 5 a raw tensor IndexError.
    for bad in (5, -1):
        with pytest.raises(ValueError, match="product_id"):
            catalogue.description(bad)
    with pytest.raises(TypeError, match="product_id"):
        catalogue.description(1.0)

# ---------------------------------------------------------------------------- labels match pixels


def test_known_colour_is_drawn_in_the_product_region() -> None:
    """A red, plain product in the studio: its body pixels are red, and nothing red is outside."""
    ds = SyntheticProducts("all", num_products=200, views_per_domain=1, domains=("studio",), seed=0)
    red_plain = [
        pid
        for pid in range(200)
        if attribute_value(ds, pid, "colour") == "red" and attribute_value(ds, pid, "pattern") == "plain"
    ]
    assert red_plain, "the catalogue should contain a red plain product"
    index = ds.product_ids.tolist().index(red_plain[0])
    sample = ds[index]
    assert sample.attributes[ATTRIBUTE_NAMES.index("colour=red")] == 1
    body = sample.semantic_map[1] > 0.99
    assert int(body.sum()) > 300
    body_rgb = sample.image[:, body]
    red = torch.tensor(COLOUR_PALETTE["red"]).view(3, 1)
    assert float((body_rgb - red).abs().max()) < 0.12
    background = sample.semantic_map[0] > 0.99
    assert float((sample.image[:, background] - red).norm(dim=0).min()) > 0.4


def test_colours_trim_and_pattern_labels_match_pixels(studio) -> None:
    ds, batch = studio
    for i in range(len(ds)):
        pid = int(batch.product_id[i])
        image, semantic = batch.image[i], batch.semantic_map[i]
        body = semantic[1] > 0.99
        body_rgb = image[:, body]
        # Pattern ink is darker than the body colour: the brightest body pixels show the colour.
        brightness = body_rgb.sum(0)
        light = body_rgb[:, brightness >= torch.quantile(brightness, 0.8)].mean(1)
        assert nearest(COLOUR_PALETTE, light) == attribute_value(ds, pid, "colour"), i
        trim_rgb = image[:, semantic[2] > 0.99].mean(1)
        assert nearest(TRIM_COLOUR_PALETTE, trim_rgb) == attribute_value(ds, pid, "trim_colour"), i

        pattern = attribute_value(ds, pid, "pattern")
        spread = float(body_rgb.std(1).mean())
        if pattern == "plain":
            assert spread < 0.01, i
            continue
        assert spread > 0.04, i
        dark = float((brightness < 0.75 * brightness.max()).float().mean())
        # Differences between neighbours that are both inside the body, across x and across y.
        inside_x = body[:, 1:] & body[:, :-1]
        inside_y = body[1:, :] & body[:-1, :]
        dx = (image[:, :, 1:] - image[:, :, :-1]).abs().sum(0)[inside_x].mean()
        dy = (image[:, 1:, :] - image[:, :-1, :]).abs().sum(0)[inside_y].mean()
        if pattern == "striped":  # horizontal stripes change along y only
            assert dx < 0.35 * dy, i
            assert 0.3 < dark < 0.7, i
        elif pattern == "checked":
            assert dx > 0.5 * dy and dy > 0.5 * dx, i
            assert 0.3 < dark < 0.7, i
        else:  # dotted: small round dots cover about pi * 0.27^2 of the area
            assert dx > 0.5 * dy and dy > 0.5 * dx, i
            assert 0.08 < dark < 0.35, i


def test_shape_and_trim_position_labels_match_the_semantic_map(studio) -> None:
    ds, batch = studio
    for i in range(len(ds)):
        pid = int(batch.product_id[i])
        foreground = batch.semantic_map[i, 1:].sum(0) > 0.5
        ys, xs = foreground.nonzero(as_tuple=True)
        top, bottom = int(ys.min()), int(ys.max())
        height, width = bottom - top + 1, int(xs.max() - xs.min()) + 1
        aspect, fill = height / width, float(foreground.sum()) / (height * width)
        shape = attribute_value(ds, pid, "shape")
        expected = {
            "skirt": aspect < 0.8,
            "trousers": aspect > 1.5,
            "dress": 1.1 < aspect < 1.5 and fill < 0.7,
            "shirt": 0.75 < aspect < 1.1 and fill < 0.68,
            "coat": 0.85 < aspect < 1.2 and fill > 0.68,
        }
        assert expected[shape], (i, shape, aspect, fill)
        if shape == "trousers":  # two legs: near the bottom, a row crosses two separate runs
            row = foreground[bottom - 3].int()
            runs = int((row[1:] - row[:-1]).clamp_min(0).sum()) + int(row[0])
            assert runs == 2, i

        trim_rows = (batch.semantic_map[i, 2] > 0.5).nonzero(as_tuple=True)[0].float()
        relative = (float(trim_rows.mean()) - top) / height
        trim = attribute_value(ds, pid, "trim")
        if trim == "collar":
            assert relative < 0.2, (i, relative)
        elif trim == "hem":
            assert relative > 0.8, (i, relative)
        else:
            assert 0.2 < relative < 0.8, (i, relative)


def test_semantic_map_covers_exactly_the_product() -> None:
    ds = small()
    indices = list(range(len(ds)))
    with_product = ds.render_batch(indices)
    without = ds.render_batch(indices, include_product=False)
    changed = (with_product.image - without.image).abs().amax(dim=1) > 1e-4
    foreground = 1.0 - with_product.semantic_map[:, 0]
    # Nothing changes outside the semantic map ...
    assert not bool((changed & (foreground == 0)).any())
    # ... and the product is visible where the map says it is.
    solid = foreground > 0.99
    assert float(changed[solid].float().mean()) > 0.97
    assert bool((foreground.flatten(1).sum(1) > 100).all())


# ---------------------------------------------------------------------------- domains


def test_studio_is_clean_and_street_is_cluttered_outside_the_product() -> None:
    ds = SyntheticProducts("all", num_products=12, views_per_domain=2, seed=5)
    batch = ds.render_batch()
    no_distractors = ds.render_batch(include_distractors=False)
    # Background well away from the product (a 3-pixel erosion of the map's background channel).
    background = (batch.semantic_map[:, 0:1] > 0.999).float()
    background = -torch.nn.functional.max_pool2d(-background, 7, stride=1, padding=3)
    background = background[:, 0] > 0.5
    studio = batch.domain == DOMAIN_NAMES.index("studio")
    for i in range(len(ds)):
        pixels = batch.image[i][:, background[i]]
        spread = float(pixels.std(1).mean())
        clutter = (batch.image[i] - no_distractors.image[i]).abs().amax(0)
        if studio[i]:
            assert spread < 0.02, i
            assert float(clutter.max()) == 0.0
        else:
            assert spread > 0.05, i
            # Distractor garments cover a real part of the background and none of the product.
            assert float((clutter[background[i]] > 0.05).float().mean()) > 0.05, i
            assert float(clutter[batch.semantic_map[i, 0] == 0].max()) == 0.0, i
    # Same product, other domain: the pixels differ well beyond noise.
    assert float((batch.image[studio] - batch.image[~studio]).abs().mean()) > 0.1


def test_zero_distractors_renders_street_without_clutter() -> None:
    """num_distractors=(0, 0) is valid; rendering failed reshaping 0 distractor flags to (-1, 0)."""
    ds = small(num_products=6, num_distractors=(0, 0))
    batch = ds.render_batch()
    assert torch.equal(ds[len(ds) - 1].image, batch.image[-1])
    torch.testing.assert_close(batch.image, ds.render_batch(include_distractors=False).image, rtol=0, atol=0)


# ---------------------------------------------------------------------------- text


def test_descriptions_match_attributes() -> None:
    ds = small()
    attributes = ds.attributes
    for pid, text in enumerate(ds.descriptions):
        colour, pattern, shape, with_word, trim_colour, trim = text.split()
        named = {ATTRIBUTE_NAMES[j] for j in attributes[pid].nonzero().flatten().tolist()}
        assert with_word == "with"
        assert named == {
            f"colour={colour}",
            f"pattern={pattern}",
            f"shape={shape}",
            f"trim={trim}",
            f"trim_colour={trim_colour}",
        }
    sample = ds[7]
    assert sample.description == ds.descriptions[sample.product_id]


def test_text_encoder_is_deterministic_across_processes() -> None:
    texts = ["red striped shirt with white collar", "blue dotted dress with gold belt"]
    here = HashedBagOfWordsEncoder(dim=64, seed=2)(texts)
    torch.testing.assert_close(here, HashedBagOfWordsEncoder(dim=64, seed=2)(texts), rtol=0, atol=0)
    assert not torch.equal(here, HashedBagOfWordsEncoder(dim=64, seed=3)(texts))
    code = (
        "import sys, torch; from torchfg.datasets.text import HashedBagOfWordsEncoder as E; "
        f"torch.save(E(dim=64, seed=2)({texts!r}), sys.argv[1])"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"torchfg_text_{os.getpid()}.pt")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, path], check=True, env=env, timeout=120)
    try:
        torch.testing.assert_close(torch.load(path), here, rtol=0, atol=0)
    finally:
        os.remove(path)


def test_text_encoder_similarity_follows_shared_words() -> None:
    encoder = HashedBagOfWordsEncoder(dim=256)
    anchor = "red striped shirt with white collar"
    others = [
        "red striped shirt with white hem",  # 4 of 5 content words shared
        "red striped coat with black hem",  # 2 shared
        "blue dotted dress with gold belt",  # none shared
    ]
    embeddings = encoder([anchor, *others])
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    similarity = embeddings[1:] @ embeddings[0]
    assert similarity[0] > similarity[1] > similarity[2]
    assert float(similarity[0]) == pytest.approx(0.8, abs=1e-6)
    # Case, punctuation and stopwords do not matter; a text without content words is all zeros.
    torch.testing.assert_close(encoder("Red, STRIPED shirt -- white collar!"), embeddings[0])
    assert torch.equal(encoder("with the"), torch.zeros(256))
    # On the dataset: products sharing more attributes have more similar descriptions (on average).
    ds = small(num_products=40)
    text = encoder(ds.descriptions)
    shared = ds.attributes @ ds.attributes.T
    cosine = text @ text.T
    off_diagonal = ~torch.eye(40, dtype=torch.bool)
    pairs = [(shared == k) & off_diagonal for k in range(5)]
    means = [float(cosine[mask].mean()) for mask in pairs if mask.any()]
    assert len(means) >= 3
    assert means == sorted(means)
    with pytest.raises(TypeError, match="texts"):
        encoder([1, 2])
    with pytest.raises(ValueError, match="dim"):
        HashedBagOfWordsEncoder(dim=0)



def test_text_encoder_zero_rows_are_the_documented_cases() -> None:
    # Pins the encode docstring: besides texts without content words, tokens whose signed counts
    # cancel in one bucket give the zero vector (the encoding itself is not changed).
    assert HashedBagOfWordsEncoder(dim=128).bucket("aa") == (49, -1.0)
    assert HashedBagOfWordsEncoder(dim=128).bucket("aj") == (49, 1.0)
    assert torch.equal(HashedBagOfWordsEncoder(dim=128)("aa aj"), torch.zeros(128))
    assert torch.equal(HashedBagOfWordsEncoder(dim=1)("red collar"), torch.zeros(1))
    assert torch.equal(HashedBagOfWordsEncoder(dim=1)("red red collar"), torch.ones(1))
    doc = HashedBagOfWordsEncoder.encode.__doc__
    assert doc is None or "cancel" in doc  # None under python -OO

# ---------------------------------------------------------------------------- predicted semantic maps


@pytest.fixture(scope="module")
def street_maps() -> tuple[SyntheticProducts, ProductSample, ProductSample]:
    """Street photos of 24 products, rendered with exact and with predicted maps."""
    options = dict(num_products=24, views_per_domain=2, domains=("street",), seed=5)
    exact = SyntheticProducts("all", **options)
    predicted = SyntheticProducts("all", map_quality="predicted", **options)
    return predicted, exact.render_batch(), predicted.render_batch()


def test_predicted_maps_change_only_the_map_and_stay_valid(street_maps) -> None:
    _, exact, predicted = street_maps
    assert torch.equal(predicted.image, exact.image)
    assert torch.equal(predicted.attributes, exact.attributes)
    maps = predicted.semantic_map
    assert maps.shape == exact.semantic_map.shape
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    torch.testing.assert_close(maps.sum(1), torch.ones_like(maps[:, 0]))
    assert not torch.allclose(maps, exact.semantic_map, atol=0.05)


def test_predicted_maps_have_a_parsers_errors(street_maps) -> None:
    _, exact, predicted = street_maps
    true_product = exact.semantic_map[:, 1:].sum(1)
    product = predicted.semantic_map[:, 1:].sum(1)
    inside = true_product > 0.99
    # Far from the product: beyond what the offset and blur can reach (8 px at 64 x 64).
    near = torch.nn.functional.max_pool2d((true_product > 0.01).float().unsqueeze(1), 17, stride=1, padding=8)
    outside = near.squeeze(1) < 0.5
    # Blurred edges: probabilities strictly between 0 and 1 on many more pixels than the exact map's
    # one-pixel anti-aliasing.
    soft = lambda m: ((m > 0.05) & (m < 0.95)).float().mean()  # noqa: E731
    assert float(soft(product)) > 2 * float(soft(true_product))
    # Missed parts: some images lose most of the probability somewhere on the product.
    missed = torch.stack([(product[i][inside[i]] < 0.3).float().mean() for i in range(len(product))])
    assert 0.2 < float((missed > 0.05).float().mean()) < 1.0
    # False detections: some images have confident product probability on the background.
    false_blobs = torch.stack([(product[i][outside[i]] > 0.3).float().sum() for i in range(len(product))])
    assert 0.1 < float((false_blobs > 4).float().mean()) < 0.9
    # Still mostly right: the thresholded maps overlap.
    iou = ((product > 0.5) & (true_product > 0.5)).flatten(1).sum(1) / ((product > 0.5) | (true_product > 0.5)).flatten(
        1
    ).sum(1)
    assert 0.5 < float(iou.mean()) < 0.95, iou


def test_predicted_maps_are_deterministic_per_sample(street_maps) -> None:
    dataset, exact, predicted = street_maps
    torch.manual_seed(0)  # the global RNG must not matter
    picked = [7, 0, 30, 7]
    torch.testing.assert_close(dataset.render_batch(picked).semantic_map, predicted.semantic_map[picked])
    torch.testing.assert_close(dataset[30].semantic_map, predicted.semantic_map[30])
    # From maps rendered exact, the same result without rendering again.
    torch.testing.assert_close(dataset.predicted_maps(exact.semantic_map[picked], picked), predicted.semantic_map[picked])
    again = SyntheticProducts("all", num_products=24, views_per_domain=2, domains=("street",), seed=5,
                              map_quality="predicted").render_batch([3, 4])
    torch.testing.assert_close(again.semantic_map, predicted.semantic_map[[3, 4]])
    other_seed = SyntheticProducts("all", num_products=24, views_per_domain=2, domains=("street",), seed=6)
    other_maps = other_seed.render_batch([3, 4]).semantic_map
    assert not torch.allclose(other_seed.predicted_maps(other_maps, [3, 4]), predicted.semantic_map[[3, 4]])


def test_map_quality_bad_arguments() -> None:
    with pytest.raises(ValueError, match="map_quality"):
        small(map_quality="perfect")
    dataset = small(map_quality="predicted")
    with pytest.raises(ValueError, match="exact must be"):
        dataset.predicted_maps(torch.zeros(2, 3, 64, 64), [0])
    assert "map_quality='predicted'" in repr(dataset)
