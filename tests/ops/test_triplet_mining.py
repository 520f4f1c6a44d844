"""The fused Triton mining kernel against a brute-force model of the contract and the reference.

The brute force below builds the full N x M matrices in fp64 with explicit masks (fine at test
sizes). Integer-valued inputs make every distance exact, so indices (tie-breaking included) must
match exactly; on generic random inputs the kernel's choice must be valid and its exact key
(d for positives, m - d for negatives) within rounding of the best one.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_DEVICE, requires_gpu_nan_semantics, requires_triton
from torchfg.ops.triplet import mine_hardest

pytestmark = requires_triton

kernel = pytest.importorskip("torchfg.ops.triplet.triton")
TileConfig = kernel.TileConfig
mine_hardest_triton = kernel.mine_hardest_triton
mine_hardest_triton_tiled = kernel.mine_hardest_triton_tiled

try:
    from torchfg.ops.triplet.reference import mine_hardest_reference
except ImportError:  # pragma: no cover - the reference lands in the same issue
    mine_hardest_reference = None

METRICS = ("euclidean", "sqeuclidean", "cosine", "dot")
POISON = -7

# Every block >= 16 so that the same tests also compile on a GPU (tl.dot's minimum). Split sizes
# that are not a multiple of BLOCK_N exercise the split boundary masks.
TILES = (
    TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1, candidates_per_split=10**9),
    TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1, candidates_per_split=16),
    TileConfig(block_m=32, block_n=16, block_d=32, block_t=16, num_warps=2, num_stages=2, candidates_per_split=40),
    TileConfig(block_m=16, block_n=32, block_d=16, block_t=32, num_warps=2, num_stages=2, candidates_per_split=None),
    TileConfig(block_m=16, block_n=16, block_d=32, block_t=16, num_warps=2, num_stages=2, candidates_per_split=48,
               flatten=True),
    # The symmetric kernel (used where the anchors are the candidates, self_offset 0): 2-tile
    # splits that cut pairs of row blocks into segments, and one split per pair.
    TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1, candidates_per_split=32,
               symmetric=True),
    TileConfig(block_m=32, block_n=32, block_d=16, block_t=16, num_warps=2, num_stages=2, candidates_per_split=None,
               symmetric=True),
)


# ----------------------------------------------------------------------------- brute force


def _cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    norms = x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :]
    return torch.where(norms > 0, (x @ y.T) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def brute_force_keys(
    anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, *,
    metric, base_margin, margin_scale, text_positive_threshold, self_offset,
):
    """(positive key, positive valid, negative key, negative valid), each (N, M), in fp64."""
    a, c = anchors.double(), candidates.double()
    n, m = a.shape[0], c.shape[0]
    if metric in ("euclidean", "sqeuclidean"):
        dist = (a[:, None, :] - c[None, :, :]).square().sum(-1)
        if metric == "euclidean":
            dist = dist.sqrt()
    elif metric == "cosine":
        dist = 1.0 - _cosine_matrix(a, c)
    else:
        dist = -(a @ c.T)
    same = anchor_labels[:, None] == candidate_labels[None, :]
    positive_valid = same.clone()
    if self_offset >= 0:
        rows = torch.arange(n, device=a.device)
        positive_valid[rows, (rows + self_offset) % m] = False
    negative_valid = ~same
    margin = torch.full((n, m), float(base_margin), dtype=torch.float64, device=a.device)
    if anchor_text is not None:
        text_cos = _cosine_matrix(anchor_text, candidate_text)
        margin = base_margin + margin_scale * (1.0 - text_cos) / 2.0
        if text_positive_threshold is not None:
            # The kernel and the reference compare in fp32 (fp64 for fp64 text).
            threshold = torch.tensor(text_positive_threshold, dtype=anchor_text.dtype).double().item()
            negative_valid &= text_cos < threshold
    return dist, positive_valid, margin - dist, negative_valid


def first_argmax(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """argmax over valid entries, lowest index on ties, -1 for rows without a valid entry."""
    masked = key.masked_fill(~valid, float("-inf"))
    best = masked.argmax(1)  # torch returns the first maximum
    return torch.where(valid.any(1), best, -1)


def assert_valid_best(name: str, idx: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, tol: float) -> None:
    """idx is -1 exactly where no candidate is valid, else a valid candidate whose key is within tol of the best."""
    assert idx.dtype == torch.int64 and idx.shape == (key.shape[0],), (name, idx.dtype, idx.shape)
    idx, key, valid = idx.cpu(), key.cpu(), valid.cpu()
    has = valid.any(1)
    assert torch.equal(idx == -1, ~has), f"{name}: -1 where {(~has).nonzero().flatten().tolist()}, got {idx.tolist()}"
    rows = has.nonzero().flatten()
    if rows.numel() == 0:
        return
    chosen = idx[rows]
    assert ((chosen >= 0) & (chosen < key.shape[1])).all(), f"{name}: index out of range {chosen.tolist()}"
    assert valid[rows, chosen].all(), f"{name}: invalid candidate chosen for rows {rows[~valid[rows, chosen]].tolist()}"
    best = key.masked_fill(~valid, float("-inf")).max(1).values[rows]
    gap = best - key[rows, chosen]
    assert (gap <= tol).all(), f"{name}: selection worse than the best by {gap.max().item()} (tol {tol})"


def _tolerance(dtype: torch.dtype, *tensors: torch.Tensor | None) -> float:
    scale = 1.0 + sum(float(t.double().square().sum(1).max()) for t in tensors if t is not None and t.numel())
    return (1e-10 if dtype == torch.float64 else 2e-5) * scale + (1e-12 if dtype == torch.float64 else 1e-5)


def run_kernel(anchors, candidates, al, cl, at, ct, tiles, **kw):
    """The kernel with poisoned outputs, so an element it does not write is caught."""
    n = anchors.shape[0]
    out = (
        torch.full((n,), POISON, dtype=torch.int64, device=anchors.device),
        torch.full((n,), POISON, dtype=torch.int64, device=anchors.device),
    )
    pos, neg = mine_hardest_triton_tiled(anchors, candidates, al, cl, at, ct, tiles=tiles, out=out, **kw)
    assert pos.data_ptr() == out[0].data_ptr() and neg.data_ptr() == out[1].data_ptr()
    assert (pos != POISON).all() and (neg != POISON).all()
    return pos, neg


@pytest.fixture(autouse=True)
def _poisoned_workspace(monkeypatch):
    """Split workspaces start as +inf values with index POISON: an unwritten slot would win the merge."""
    original = kernel._new_workspace

    def poisoned(splits, n, dtype, device):
        pos_val, pos_idx, neg_val, neg_idx = original(splits, n, dtype, device)
        for val, idx in ((pos_val, pos_idx), (neg_val, neg_idx)):
            val.fill_(float("inf"))
            idx.fill_(POISON)
        return pos_val, pos_idx, neg_val, neg_idx

    monkeypatch.setattr(kernel, "_new_workspace", poisoned)


# ----------------------------------------------------------------------------- input builders


def _labels(kind: str, count: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "singletons":
        return torch.randperm(count, generator=gen) + 100
    if kind == "single":
        return torch.full((count,), 3, dtype=torch.int64)
    return torch.randint(0, classes, (count,), generator=gen)


def _axis_text(count: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Rows that are +-unit axis vectors or zero: text cosines are exactly -1, 0 or 1."""
    rows = torch.zeros(count, width)
    axis = torch.randint(0, min(width, 3), (count,), generator=gen)
    sign = torch.randint(0, 3, (count,), generator=gen) - 1  # -1, 0 (zero row), 1
    rows[torch.arange(count), axis] = sign.float()
    return rows


def _strided(x: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (column-major)."""
    return x.T.contiguous().T


@st.composite
def mining_cases(draw, integer_data: bool):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n = draw(st.integers(1, 70))
    self_mode = draw(st.sampled_from(["none", "same", "slice", "slice_copy", "wrapped"]))
    if self_mode == "none":  # anchors are not among the candidates (a cross-batch memory)
        m, offset = draw(st.integers(1, 70)), -1
    elif self_mode == "same":
        m, offset = n, 0
    elif self_mode == "wrapped":  # anchor i is candidate (offset + i) % m, past the last row
        extra = draw(st.integers(0, 30))
        m = n + extra
        offset = draw(st.integers(extra + 1, m - 1)) if n > 1 else extra
    else:  # anchors are rows offset .. offset + n of the candidates
        extra = draw(st.integers(0, 30))
        m, offset = n + extra, draw(st.integers(0, extra))
    d = draw(st.integers(1, 100))
    text_width = draw(st.integers(1, 40))
    metric = draw(st.sampled_from(METRICS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    use_text = draw(st.booleans())
    margin_scale = draw(st.sampled_from([0.0, 0.5, 2.0])) if use_text else 0.0
    threshold = draw(st.sampled_from([None, 0.0, 0.5, 0.95])) if use_text else None
    label_kind = draw(st.sampled_from(["few", "few", "few", "singletons", "single"]))
    classes = draw(st.integers(2, 6))
    tiles = draw(st.sampled_from(TILES))
    strided = draw(st.booleans())

    if integer_data:
        # Small integers: every squared distance and inner product is exact, so ties are exact too.
        candidates = torch.randint(-2, 3, (m, d), generator=gen).to(torch.float32)
        candidate_text = _axis_text(m, text_width, gen)
    else:
        candidates = torch.randn(m, d, generator=gen) * draw(st.sampled_from([0.1, 1.0, 10.0]))
        candidate_text = torch.randn(m, text_width, generator=gen)
    candidate_labels = _labels(label_kind, m, classes, gen)
    candidates = candidates.to(dtype).to(TEST_DEVICE)
    candidate_text = candidate_text.to(dtype).to(TEST_DEVICE)
    candidate_labels = candidate_labels.to(TEST_DEVICE)
    if self_mode == "none":
        if integer_data:
            anchors = torch.randint(-2, 3, (n, d), generator=gen).to(torch.float32)
            anchor_text = _axis_text(n, text_width, gen)
        else:
            anchors = torch.randn(n, d, generator=gen)
            anchor_text = torch.randn(n, text_width, generator=gen)
        anchors, anchor_text = anchors.to(dtype).to(TEST_DEVICE), anchor_text.to(dtype).to(TEST_DEVICE)
        anchor_labels = _labels(label_kind, n, classes, gen).to(TEST_DEVICE)
    elif self_mode == "wrapped":  # a batch across the end of a ring memory: copies, not a slice
        rows = (offset + torch.arange(n)) % m
        anchors, anchor_text, anchor_labels = candidates[rows], candidate_text[rows], candidate_labels[rows]
    else:
        anchors = candidates[offset:offset + n]
        anchor_text = candidate_text[offset:offset + n]
        anchor_labels = candidate_labels[offset:offset + n]
        if self_mode == "slice_copy":  # same values, separate storage (no shared row statistics)
            anchors, anchor_text = anchors.clone(), anchor_text.clone()
    if strided:
        anchors, candidates = _strided(anchors), _strided(candidates)
        anchor_text, candidate_text = _strided(anchor_text), _strided(candidate_text)
    if not use_text:
        anchor_text = candidate_text = None
    inputs = (anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text)
    options = dict(
        # Exact data needs margins that are exact in binary, or rounding breaks its exact ties.
        metric=metric, base_margin=draw(st.sampled_from([0.0, 0.25, 1.0] if integer_data else [0.0, 0.2, 1.0])),
        margin_scale=margin_scale,
        text_positive_threshold=threshold, self_offset=offset,
    )
    return inputs, options, tiles


# ----------------------------------------------------------------------------- property tests


@given(case=mining_cases(integer_data=False))
def test_random_inputs_select_the_hardest_pairs(case):
    inputs, options, tiles = case
    pos, neg = run_kernel(*inputs, tiles, **options)
    pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(*inputs, **options)
    tol = _tolerance(inputs[0].dtype, inputs[0], inputs[1])
    if options["metric"] == "cosine":
        tol = _tolerance(inputs[0].dtype)  # cosines are normalised
    elif options["metric"] == "euclidean":
        tol += tol**0.5  # an error e in d^2 moves d = sqrt(d^2) by up to sqrt(e) near d = 0
    if inputs[4] is not None:
        tol += options["margin_scale"] * _tolerance(inputs[4].dtype)
    assert_valid_best("positive", pos, pos_key, pos_valid, tol)
    assert_valid_best("negative", neg, neg_key, neg_valid, tol)


@given(case=mining_cases(integer_data=True))
def test_exact_inputs_give_exact_indices(case):
    inputs, options, tiles = case
    if options["metric"] == "cosine" or (options["metric"] == "euclidean" and options["margin_scale"] != 0.0):
        # 1 - cos and m - sqrt(k) are rounded differently by every implementation: compare keys.
        options = {**options, "metric": "sqeuclidean"}
    pos, neg = run_kernel(*inputs, tiles, **options)
    pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(*inputs, **options)
    if options["margin_scale"] == 0.0:
        # Constant margins: the closest negative, like the kernel and the reference select it.
        neg_key = -pos_key
    expected_pos, expected_neg = first_argmax(pos_key, pos_valid), first_argmax(neg_key, neg_valid)
    assert torch.equal(pos.cpu(), expected_pos.cpu()), (pos.tolist(), expected_pos.tolist())
    assert torch.equal(neg.cpu(), expected_neg.cpu()), (neg.tolist(), expected_neg.tolist())


@pytest.mark.skipif(mine_hardest_reference is None, reason="torchfg.ops.triplet.reference is not available")
@given(case=mining_cases(integer_data=True))
def test_matches_reference(case):
    inputs, options, tiles = case
    pos, neg = run_kernel(*inputs, tiles, **options)
    ref_pos, ref_neg = mine_hardest_reference(*inputs, **options)
    exact = options["metric"] != "cosine" and not (options["metric"] == "euclidean" and options["margin_scale"] != 0.0)
    if exact:
        assert torch.equal(pos, ref_pos), (pos.tolist(), ref_pos.tolist())
        assert torch.equal(neg, ref_neg), (neg.tolist(), ref_neg.tolist())
    else:
        pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(*inputs, **options)
        tol = _tolerance(torch.float32)
        for name, ours, theirs, key, valid in (
            ("positive", pos, ref_pos, pos_key, pos_valid), ("negative", neg, ref_neg, neg_key, neg_valid)
        ):
            assert_valid_best(name, ours, key, valid, tol)
            assert_valid_best(name + " (reference)", theirs, key, valid, tol)


@st.composite
def symmetric_cases(draw):
    """One batch mined against itself (the symmetric kernel's calls), exact integer data."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(1, 90))
    d = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    x = torch.randint(-2, 3, (n, d), generator=gen).to(dtype)
    if draw(st.booleans()):
        x = _strided(x)
    label_kind = draw(st.sampled_from(["few", "few", "singletons", "single", "int32", "wide"]))
    labels = _labels("few" if label_kind in ("int32", "wide") else label_kind, n, draw(st.integers(2, 6)), gen)
    if label_kind == "int32":
        labels = labels.int()
    elif label_kind == "wide":  # low words collide across high words: the wide pass
        labels = labels + torch.randint(0, 2, (n,), generator=gen) * 2**32
    text = None
    use_text = draw(st.booleans())
    if use_text:
        text = _axis_text(n, draw(st.integers(1, 20)), gen).to(dtype).to(TEST_DEVICE)
    block = draw(st.sampled_from([16, 32]))
    tiles = TileConfig(block_m=block, block_n=block, block_d=16, block_t=16, num_warps=1, num_stages=1,
                       candidates_per_split=draw(st.sampled_from([None, 16, 32, 48, 64])), symmetric=True,
                       flatten=draw(st.booleans()))
    options = dict(
        metric=draw(st.sampled_from(["sqeuclidean", "dot", "euclidean"])),
        base_margin=draw(st.sampled_from([0.0, 0.25, 1.0])),
        margin_scale=draw(st.sampled_from([0.0, 0.5])) if use_text else 0.0,
        text_positive_threshold=draw(st.sampled_from([None, 0.0, 0.5])) if use_text else None,
        self_offset=0,
    )
    if options["metric"] == "euclidean" and options["margin_scale"] != 0.0:
        options["metric"] = "sqeuclidean"  # m - sqrt(k) rounds differently everywhere: no exact ties
    return x.to(TEST_DEVICE), labels.to(TEST_DEVICE), text, options, tiles


@given(case=symmetric_cases())
def test_symmetric_kernel_gives_exact_indices(case):
    x, labels, text, options, tiles = case
    bests = kernel.mine_hardest_splits_triton(x, x, labels, labels, text, text, tiles=tiles, **options)
    assert bests.packed
    pos, neg = run_kernel(x, x, labels, labels, text, text, tiles, **options)
    pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(x, x, labels, labels, text, text, **options)
    if options["margin_scale"] == 0.0:
        neg_key = -pos_key
    expected_pos, expected_neg = first_argmax(pos_key, pos_valid), first_argmax(neg_key, neg_valid)
    assert torch.equal(pos.cpu(), expected_pos.cpu()), (pos.tolist(), expected_pos.tolist())
    assert torch.equal(neg.cpu(), expected_neg.cpu()), (neg.tolist(), expected_neg.tolist())


def test_symmetric_kernel_runs_only_on_a_batch_against_itself(monkeypatch):
    x, y = _cluster_batch(n=40)
    square = TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1)

    def packed(anchors, candidates, al, cl, tiles=square, offset=0, text=(None, None), **changes):
        return kernel.mine_hardest_splits_triton(anchors, candidates, al, cl, *text, tiles=tiles,
                                                 **{**_BASIC, "self_offset": offset, **changes}).packed

    on = dataclasses.replace(square, symmetric=True)
    assert packed(x, x, y, y, tiles=on)
    assert packed(x, x, y, y, tiles=on, metric="cosine")
    text = torch.randn(40, 6, device=TEST_DEVICE)
    assert packed(x, x, y, y, tiles=on, text=(text, text), margin_scale=0.5)
    assert packed(x, x, y, y, tiles=on, text=(text, text.clone()))  # text that is never read
    assert not packed(x, x, y, y, tiles=on, text=(text, text.clone()), margin_scale=0.5)
    assert not packed(x, x.clone(), y, y, tiles=on)
    assert not packed(x, x, y, y.clone(), tiles=on)
    assert not packed(x[:30], x, y[:30], y, tiles=on)
    assert not packed(x[5:], x, y[5:], y, tiles=on, offset=5)
    assert not packed(x.double(), x.double(), y, y, tiles=on)  # fp64 keeps its own tiles
    assert not packed(x, x, y, y, tiles=dataclasses.replace(square, symmetric=False))
    # Unset: the environment decides, for square tiles only.
    monkeypatch.delenv("TORCHFG_SYMMETRIC_MINING", raising=False)
    assert not packed(x, x, y, y)
    monkeypatch.setenv("TORCHFG_SYMMETRIC_MINING", "1")
    assert packed(x, x, y, y) and packed(x, x, y, y, tiles=None)
    assert not packed(x, x, y, y, tiles=dataclasses.replace(square, block_m=32))
    with pytest.raises(ValueError, match="square"):
        packed(x, x, y, y, tiles=dataclasses.replace(on, block_m=32))
    # Autotuned on a GPU, IEEE fp32 (FMA) dots keep the default kernel (no spill-free symmetric tiles).
    monkeypatch.setattr(kernel, "triton_interpreter_enabled", lambda: False)
    bf16 = x.bfloat16()
    assert kernel._takes_symmetric_kernel(None, bf16, bf16, y, y, None, None, 0)
    assert not kernel._takes_symmetric_kernel(None, x, x, y, y, None, None, 0)
    assert not kernel._takes_symmetric_kernel(None, bf16, bf16, y, y, text, text, 0)  # fp32 text
    bf16_text = text.bfloat16()
    assert kernel._takes_symmetric_kernel(None, bf16, bf16, y, y, bf16_text, bf16_text, 0)
    assert kernel._takes_symmetric_kernel(square, x, x, y, y, None, None, 0)  # explicit tiles may


# ----------------------------------------------------------------------------- fixed cases

_BASIC = dict(metric="euclidean", base_margin=0.2, margin_scale=0.0, text_positive_threshold=None, self_offset=0)


def _cluster_batch(n: int = 37, d: int = 19, classes: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, d), generator=gen).float().to(TEST_DEVICE)
    y = torch.randint(0, classes, (n,), generator=gen).to(TEST_DEVICE)
    return x, y


@pytest.mark.parametrize("metric", METRICS)
def test_singletons_have_no_positive_and_one_class_has_no_negative(metric):
    x, _ = _cluster_batch()
    n = x.shape[0]
    distinct = torch.arange(n, device=TEST_DEVICE)
    pos, neg = run_kernel(x, x, distinct, distinct, None, None, TILES[1], **{**_BASIC, "metric": metric})
    assert (pos == -1).all() and (neg >= 0).all()
    same = torch.zeros(n, dtype=torch.int64, device=TEST_DEVICE)
    pos, neg = run_kernel(x, x, same, same, None, None, TILES[2], **{**_BASIC, "metric": metric})
    assert (pos >= 0).all() and (neg == -1).all()


def test_folded_argmax_is_the_combine_functions_left_fold():
    """The ``compiled_argmax`` fixture's vectorised fold equals folding Triton's argmax combine
    (``value1 > value2 or (value1 == value2 and index1 < index2)``) element after element, on rows
    of NaN, infinities and ties."""
    import numpy as np

    from conftest import folded_argmax

    def fold(row):
        value, index = row[0], 0
        for j in range(1, len(row)):
            if not (value > row[j] or (value == row[j] and index < j)):
                value, index = row[j], j
        return value, index

    rng = np.random.default_rng(0)
    rows = rng.choice([np.nan, -np.inf, 0.0, 1.0, 2.0, np.inf], size=(4000, 7)).astype(np.float32)
    values, indices = folded_argmax(rows, 1)
    for row, value, index in zip(rows, values, indices):
        expected_value, expected_index = fold(row)
        assert index == expected_index and (value == expected_value or (np.isnan(value) and np.isnan(expected_value)))


@requires_gpu_nan_semantics
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("row, reduction", [(11, "interpreter"), (15, "compiled"), (31, "compiled")])
def test_a_nan_row_is_never_chosen(metric, row, reduction, request):
    """docs/concepts/numerics.md: the kernel never picks a NaN key, so every other anchor chooses
    as if the NaN row were not there (every tiling, the symmetric kernel included). Before the
    (sq)euclidean clamp propagated NaN, maxnum made the NaN row everyone's nearest negative.

    ``compiled``: the tile argmax folded as a GPU folds it (see the ``compiled_argmax`` fixture).
    There a NaN in a tile's last column won the tile and dropped the tile's other candidates; the
    interpreter's nanargmax hid it. Rows 15 and 31 end a 16- and a 32-wide tile."""
    if reduction == "compiled":
        request.getfixturevalue("compiled_argmax")
    x, y = _cluster_batch()
    x_nan = x.clone()
    x_nan[row, 3] = float("nan")
    keep = torch.arange(x.shape[0], device=TEST_DEVICE) != row
    # Indices into the batch without the row, mapped back to the full batch's numbering.
    back = torch.nonzero(keep).flatten()
    for tiles in TILES:
        pos, neg = run_kernel(x_nan, x_nan, y, y, None, None, tiles, **{**_BASIC, "metric": metric})
        pos_clean, neg_clean = run_kernel(x[keep], x[keep], y[keep], y[keep], None, None, tiles,
                                          **{**_BASIC, "metric": metric})
        expected_pos = torch.where(pos_clean >= 0, back[pos_clean.clamp_min(0)], pos_clean)
        expected_neg = torch.where(neg_clean >= 0, back[neg_clean.clamp_min(0)], neg_clean)
        assert pos[keep].tolist() == expected_pos.tolist(), tiles
        assert neg[keep].tolist() == expected_neg.tolist(), tiles


def test_single_anchor_and_single_candidate():
    x = torch.tensor([[1.0, 2.0, 3.0]], device=TEST_DEVICE)
    y = torch.tensor([4], device=TEST_DEVICE)
    pos, neg = run_kernel(x, x, y, y, None, None, TILES[0], **_BASIC)
    assert pos.tolist() == [-1] and neg.tolist() == [-1]
    pos, neg = run_kernel(x, x, y, y + 1, None, None, TILES[0], **{**_BASIC, "self_offset": -1})
    assert pos.tolist() == [-1] and neg.tolist() == [0]
    pos, neg = run_kernel(x, x, y, y, None, None, TILES[0], **{**_BASIC, "self_offset": -1})
    assert pos.tolist() == [0] and neg.tolist() == [-1]  # without self exclusion the anchor is its own positive


def test_empty_inputs():
    x = torch.zeros(0, 5, device=TEST_DEVICE)
    c = torch.zeros(4, 5, device=TEST_DEVICE)
    labels = torch.zeros(4, dtype=torch.int64, device=TEST_DEVICE)
    pos, neg = mine_hardest_triton(x, c, labels[:0], labels, None, None, **{**_BASIC, "self_offset": -1})
    assert pos.shape == (0,) and neg.shape == (0,)
    pos, neg = run_kernel(c, x, labels, labels[:0], None, None, TILES[0], **{**_BASIC, "self_offset": -1})
    assert pos.tolist() == [-1] * 4 and neg.tolist() == [-1] * 4


def test_ties_go_to_the_lowest_index_across_tiles_and_splits():
    # Candidates 0..39 repeat one point per class: every positive and every negative is a tie
    # spread over several tiles and splits; the lowest index must win.
    base = torch.tensor([[0.0, 0.0], [3.0, 4.0]], device=TEST_DEVICE)
    labels = torch.arange(40, device=TEST_DEVICE) % 2
    candidates = base[labels]
    anchors = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], device=TEST_DEVICE)
    anchor_labels = torch.tensor([0, 1, 0], device=TEST_DEVICE)
    for tiles in TILES:
        pos, neg = run_kernel(anchors, candidates, anchor_labels, labels, None, None, tiles,
                              **{**_BASIC, "self_offset": -1})
        assert pos.tolist() == [0, 1, 0] and neg.tolist() == [1, 0, 1], tiles


def test_ties_with_self_excluded():
    # All points identical: the hardest positive of anchor i is the first same-label candidate that is not i.
    x = torch.ones(33, 4, device=TEST_DEVICE)
    y = torch.arange(33, device=TEST_DEVICE) % 3
    pos, neg = run_kernel(x, x, y, y, None, None, TILES[1], **{**_BASIC, "metric": "sqeuclidean"})
    first = {c: int((y == c).nonzero()[0]) for c in range(3)}
    second = {c: int((y == c).nonzero()[1]) for c in range(3)}
    expected = [second[int(c)] if i == first[int(c)] else first[int(c)] for i, c in enumerate(y.tolist())]
    assert pos.tolist() == expected
    assert neg.tolist() == [1 if c == 0 else 0 for c in y.tolist()]


@pytest.mark.parametrize("offset", [14, 32])
def test_ties_with_self_excluded_across_the_last_candidate(offset):
    # Anchor i is candidate (offset + i) % 33: 20 anchors from slot 14 end at slot 0, from slot
    # 32 they wrap after the first. All points identical: the hardest positive is the first
    # same-label candidate other than the anchor's own slot. The kernel (every tiling, splits
    # included) and the reference agree.
    x = torch.ones(33, 4, device=TEST_DEVICE)
    y = torch.arange(33, device=TEST_DEVICE) % 3
    slots = (offset + torch.arange(20, device=TEST_DEVICE)) % 33
    options = {**_BASIC, "metric": "sqeuclidean", "self_offset": offset}
    expected = []
    for slot in slots.tolist():
        same = [j for j in range(33) if y[j] == y[slot] and j != slot]
        expected.append(same[0])
    for tiles in TILES:
        pos, _ = run_kernel(x[slots], x, y[slots], y, None, None, tiles, **options)
        assert pos.tolist() == expected, tiles
    if mine_hardest_reference is not None:
        pos, _ = mine_hardest_reference(x[slots], x, y[slots], y, None, None, **options)
        assert pos.tolist() == expected
    public, _ = mine_hardest(x[slots], x, y[slots], y, exclude_self=True, anchor_offset=offset, backend="torch")
    assert public.tolist() == expected


def test_zero_rows_have_cosine_zero():
    # A zero embedding is at cosine distance 1 from everything; a zero text row has similarity 0.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], device=TEST_DEVICE)
    y = torch.tensor([0, 0, 1, 1], device=TEST_DEVICE)
    pos, neg = run_kernel(x, x, y, y, None, None, TILES[0], **{**_BASIC, "metric": "cosine"})
    # anchor 0 (zero row) is at d = 1 from everything: its negatives tie and the lowest index wins
    assert pos.tolist() == [1, 0, 3, 2] and neg.tolist() == [2, 3, 0, 0]
    text = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], device=TEST_DEVICE)
    options = {**_BASIC, "metric": "sqeuclidean", "base_margin": 0.0, "margin_scale": 100.0}
    pos, neg = run_kernel(x, x, y, y, text, text, TILES[0], **options)
    # m - d^2: anchor 1 (text e0) takes the negative with orthogonal text (3: 50 - 2) over the one
    # with the same text (2: 0 - 4); anchor 0 (zero text, m = 50 for all) ties 2 and 3 at 49.
    assert neg.tolist() == [2, 3, 0, 0]


def test_threshold_excludes_near_duplicates():
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0]], device=TEST_DEVICE)
    y = torch.tensor([0, 1, 1, 1], device=TEST_DEVICE)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], device=TEST_DEVICE)
    options = dict(metric="euclidean", base_margin=0.2, margin_scale=0.0, self_offset=0)
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], text_positive_threshold=None, **options)
    assert neg[0].item() == 1
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], text_positive_threshold=0.99, **options)
    assert neg[0].item() == 2  # cos = 1 >= 0.99: candidate 1 is a near-duplicate
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], text_positive_threshold=0.7, **options)
    assert neg[0].item() == 3  # cos(e0, (1,1)) = 0.707 >= 0.7 as well
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], text_positive_threshold=0.0, **options)
    assert neg[0].item() == -1  # cos = 0 is not < 0: no negative is left


@pytest.fixture
def compiled_float_arguments(monkeypatch):
    """Float arguments reach the interpreted kernel as fp32, as a compiled kernel takes a Python
    float (the interpreter alone keeps fp64, which hides an fp32 rounding of a margin)."""
    if TEST_DEVICE.type != "cpu":
        return  # compiled: the real conversion
    import struct

    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def as_compiled(arg):
        if isinstance(arg, float):
            arg = struct.unpack("f", struct.pack("f", arg))[0]
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", as_compiled)


@pytest.mark.parametrize("tiles", [TILES[0], TILES[5]], ids=["rows", "symmetric"])
@pytest.mark.parametrize("case", ["margin_scale", "threshold"])
def test_fp64_text_margins_and_threshold_keep_fp64(compiled_float_arguments, tiles, case):
    # fp32(0.1) = 0.1 + 1.5e-9. Margin: negative 2 beats negative 1 by 1e-12 with s = 0.1 exactly
    # (m - d: 0.05 - 1 against 0 - (0.95 - 1e-12)); with s rounded to fp32, 1 would win by 7e-10.
    # Threshold: the closest negative, 2, has a text cosine of 0.1 + 1e-12 with anchor 0: not
    # below 0.1, so 1 is its hardest negative (2 is below fp32(0.1)).
    x = torch.tensor([[0.0], [1.0], [0.95 - 1e-12], [3.0]], dtype=torch.float64, device=TEST_DEVICE)
    y = torch.tensor([0, 1, 1, 1], device=TEST_DEVICE)
    if case == "margin_scale":
        text = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
        margins = dict(base_margin=0.0, margin_scale=0.1, text_positive_threshold=None)
        expected = 2
    else:
        cos = 0.1 + 1e-12
        text = [[1.0, 0.0], [0.0, 1.0], [cos, (1 - cos**2) ** 0.5], [0.0, 1.0]]
        margins = dict(base_margin=0.2, margin_scale=0.0, text_positive_threshold=0.1)
        expected = 1
    text = torch.tensor(text, dtype=torch.float64, device=TEST_DEVICE)
    options = dict(metric="euclidean", self_offset=0, **margins)
    assert mine_hardest_reference(x, x, y, y, text, text, **options)[1][0].item() == expected
    _, neg = run_kernel(x, x, y, y, text, text, tiles, **options)
    assert neg[0].item() == expected


def test_margin_aware_negative_differs_from_the_closest():
    x = torch.tensor([[0.0], [1.0], [1.5], [9.0]], device=TEST_DEVICE)
    y = torch.tensor([0, 1, 1, 0], device=TEST_DEVICE)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], device=TEST_DEVICE)
    options = dict(metric="euclidean", base_margin=0.1, text_positive_threshold=None, self_offset=0)
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], margin_scale=0.0, **options)
    assert neg[0].item() == 1
    _, neg = run_kernel(x, x, y, y, text, text, TILES[0], margin_scale=2.0, **options)
    assert neg[0].item() == 2  # m(0, 2) - d = 2.1 - 1.5 beats m(0, 1) - d = 0.1 - 1


def test_text_without_margin_or_threshold_is_ignored():
    x, y = _cluster_batch(seed=3)
    text = torch.randn(x.shape[0], 7, device=TEST_DEVICE)
    with_text = run_kernel(x, x, y, y, text, text, TILES[2], **_BASIC)
    without = run_kernel(x, x, y, y, None, None, TILES[2], **_BASIC)
    assert torch.equal(with_text[0], without[0]) and torch.equal(with_text[1], without[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_upcast_inputs(dtype):
    x, y = _cluster_batch(n=41, d=35, seed=5)
    text = _axis_text(41, 9, torch.Generator().manual_seed(1)).to(TEST_DEVICE)
    options = {**_BASIC, "metric": "sqeuclidean", "margin_scale": 0.5, "text_positive_threshold": 0.5}
    half = run_kernel(x.to(dtype), x.to(dtype), y, y, text.to(dtype), text.to(dtype), TILES[1], **options)
    full = run_kernel(x, x, y, y, text, text, TILES[1], **options)
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


def test_default_tiles_and_split_heuristic():
    # tiles=None: the interpreter's fixed config (or the autotuned GPU configs) and the default split.
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(-3, 4, (70, 40), generator=gen).float().to(TEST_DEVICE)
    y = torch.randint(0, 4, (70,), generator=gen).to(TEST_DEVICE)
    text = _axis_text(70, 5, gen).to(TEST_DEVICE)
    options = {**_BASIC, "metric": "sqeuclidean", "margin_scale": 1.0}
    pos, neg = mine_hardest_triton(x, x, y, y, text, text, **options)
    pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(x, x, y, y, text, text, **options)
    assert torch.equal(pos.cpu(), first_argmax(pos_key, pos_valid).cpu())
    assert torch.equal(neg.cpu(), first_argmax(neg_key, neg_valid).cpu())


def test_gpu_sized_tiles():
    # The GPU's largest tiles on a batch smaller than one tile (masks on every axis).
    x, y = _cluster_batch(n=70, d=100, seed=7)
    options = {**_BASIC, "metric": "dot"}
    tiles = TileConfig(block_m=128, block_n=128, block_d=64, block_t=64, num_warps=8, num_stages=3)
    pos, neg = run_kernel(x, x, y, y, None, None, tiles, **options)
    pos_key, pos_valid, neg_key, neg_valid = brute_force_keys(x, x, y, y, None, None, **options)
    assert torch.equal(pos.cpu(), first_argmax(pos_key, pos_valid).cpu())
    assert torch.equal(neg.cpu(), first_argmax(-pos_key, neg_valid).cpu())


@pytest.mark.parametrize("m", [64, 67])
@pytest.mark.parametrize("per_split", [32, 40, None])
def test_interior_tiles_without_masks_and_partial_last_tiles(m, per_split):
    # m = 64 with splits of 32: every tile is whole (EVEN_N, no column mask anywhere); m = 67 or
    # splits of 40: the last tile of a split is partial and is the only one that masks.
    gen = torch.Generator().manual_seed(m + (per_split or 0))
    x = torch.randint(-2, 3, (m, 9), generator=gen).float().to(TEST_DEVICE)
    y = torch.randint(0, 4, (m,), generator=gen).to(TEST_DEVICE)
    n = 37
    tiles = TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1,
                       candidates_per_split=per_split, flatten=True, maxnreg=128)
    for offset in (-1, m - n):
        anchors = x[offset:offset + n] if offset >= 0 else x[:n].flip(0).contiguous()
        labels = y[offset:offset + n] if offset >= 0 else y[:n].flip(0).contiguous()
        options = {**_BASIC, "metric": "sqeuclidean", "self_offset": offset}
        pos, neg = run_kernel(anchors, x, labels, y, None, None, tiles, **options)
        pos_key, pos_valid, _, neg_valid = brute_force_keys(anchors, x, labels, y, None, None, **options)
        assert torch.equal(pos.cpu(), first_argmax(pos_key, pos_valid).cpu())
        assert torch.equal(neg.cpu(), first_argmax(-pos_key, neg_valid).cpu())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("high_words", ["differ", "same_nonzero", "negative", "differ_in_one_split"])
def test_64_bit_labels_compare_both_words(high_words, symmetric):
    # Labels whose low 32 bits collide must still differ: a program that sees one high word
    # compares low words only, one that sees several compares both words.
    gen = torch.Generator().manual_seed(3)
    m = 48
    x = torch.randint(-2, 3, (m, 5), generator=gen).float().to(TEST_DEVICE)
    low = torch.randint(0, 3, (m,), generator=gen)
    if high_words == "differ":
        high = torch.randint(0, 3, (m,), generator=gen)
    elif high_words == "same_nonzero":
        high = torch.full((m,), 5)
    elif high_words == "negative":
        high = torch.full((m,), -1)
    else:
        high = (torch.arange(m) >= 32).long() * torch.randint(0, 3, (m,), generator=gen)
    y = (high * 2**32 + low).to(TEST_DEVICE)
    options = {**_BASIC, "metric": "sqeuclidean"}
    tiles = TileConfig(block_m=16, block_n=16, block_d=16, block_t=16, num_warps=1, num_stages=1,
                       candidates_per_split=16, symmetric=symmetric)
    pos, neg = run_kernel(x, x, y, y, None, None, tiles, **options)
    pos_key, pos_valid, _, neg_valid = brute_force_keys(x, x, y, y, None, None, **options)
    assert torch.equal(pos.cpu(), first_argmax(pos_key, pos_valid).cpu())
    assert torch.equal(neg.cpu(), first_argmax(-pos_key, neg_valid).cpu())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_label_types_match_int64(dtype):
    x, y = _cluster_batch(seed=9)
    expected = run_kernel(x, x, y, y, None, None, TILES[2], **_BASIC)
    got = run_kernel(x, x, y.to(dtype), y.to(dtype), None, None, TILES[2], **_BASIC)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    mixed = run_kernel(x, x, y.to(dtype), y, None, None, TILES[2], **_BASIC)
    assert torch.equal(mixed[0], expected[0]) and torch.equal(mixed[1], expected[1])


def test_gpu_config_table_is_complete():
    # Every (kind, operand width) the launcher asks for has configs, each tl.dot-sized, and at
    # least one for any layout, so that the autotuner's pruning never leaves it empty.
    for kind in ("batch_hard", "atl"):
        for width in ("16bit", "tf32", "fp32"):
            entries = kernel.GPU_CONFIGS[kind, width]
            assert any(scope == kernel.ANY_LAYOUT for scope, _ in entries), (kind, width)
            for scope, c in entries:
                assert scope in (kernel.ANY_LAYOUT, kernel.ROW_MAJOR, kernel.DENSE, kernel.ALIGNED_OR_STRIDED)
                assert min(c.block_m, c.block_n, c.block_d, c.block_t) >= 16
                assert c.maxnreg is None or c.maxnreg * 32 * c.num_warps <= 65536
            # The autotuned launcher: its configs set only constexprs of the kernel.
            tuned = kernel._tuned_kernel(kind, width).tuned
            names = set(kernel._mine_hardest_kernel.arg_names)
            assert len(tuned.configs) == len(entries)
            assert all(set(cfg.kwargs) <= names for cfg in tuned.configs)
            # The symmetric kernel's: square tiles, one for any layout, constexprs of its kernel
            # (none for FMA dots, which never take it).
            if width == "fp32":
                assert (kind, width) not in kernel.SYMMETRIC_GPU_CONFIGS
                continue
            entries = kernel.SYMMETRIC_GPU_CONFIGS[kind, width]
            assert any(scope == kernel.ANY_LAYOUT for scope, _ in entries), (kind, width)
            assert all(c.block_m == c.block_n >= 16 and min(c.block_d, c.block_t) >= 16 for _, c in entries)
            tuned = kernel._symmetric_tuned_kernel(kind, width).tuned
            names = set(kernel._mine_symmetric_kernel.arg_names)
            assert len(tuned.configs) == len(entries)
            assert all(set(cfg.kwargs) <= names for cfg in tuned.configs)


@pytest.mark.parametrize("layout_class, d, expected", [
    (True, 512, {"any", "row_major", "dense", "aligned_or_strided"}),
    (True, 100, {"any", "row_major", "aligned_or_strided"}),  # 100 is not a multiple of BLOCK_D = 64
    (False, 512, {"any", "aligned_or_strided"}),
    (kernel.UNALIGNED, 512, {"any", "row_major"}),  # unit stride, rows not 16-byte aligned
    (kernel.MIXED, 512, {"any"}),  # some operands strided, others unaligned
])
def test_autotune_pruning_follows_config_scopes(layout_class, d, expected):
    # The pruning the autotuner applies keeps exactly the configs whose scope covers the call
    # (the layout_class key; True / False read as ALIGNED / STRIDED).
    entries = (("any", TileConfig(64, 64, 64, 64)), ("row_major", TileConfig(64, 64, 64, 64)),
               ("dense", TileConfig(64, 64, 64, 64)), ("aligned_or_strided", TileConfig(64, 64, 64, 64)))
    tuned = kernel._autotuned(entries)
    kept = tuned.early_config_prune(tuned.configs, {"layout_class": int(layout_class), "D": d})
    assert {scope for (scope, _), cfg in zip(entries, tuned.configs) if any(cfg is k for k in kept)} == expected
    assert kernel.config_fits("dense", 32, 96, True) and not kernel.config_fits("dense", 64, 96, True)
    assert not kernel.config_fits("dense", 32, 512, kernel.UNALIGNED)


def test_layout_class_follows_16_byte_alignment():
    # What Triton specialises on: base pointers divisible by 16 bytes, row strides by 16 elements.
    # Row-major operands that are not (a column slice, a row pitch, D = 100) are UNALIGNED, and
    # prune the tiles that spill there on sm_90 (compile_sm90's "slice" layouts).
    big = torch.randn(40, 80)
    dense, other = big[:, :64].contiguous(), torch.randn(40, 64)
    column_slice, pitch, d100 = big[:, 1:65], big[:, :64], torch.randn(40, 100)
    column_major = torch.randn(64, 40).t()
    assert kernel._layout_class(dense, other) == kernel.ALIGNED
    assert pitch.stride(0) % 16 == 0 and pitch.data_ptr() % 16 == 0  # 80 columns: still aligned
    assert kernel._layout_class(dense, pitch) == kernel.ALIGNED
    assert kernel._layout_class(dense, column_slice) == kernel.UNALIGNED  # base pointer 4 bytes in
    assert kernel._layout_class(torch.randn(40, 72)[:, :64], dense) == kernel.UNALIGNED  # row stride 72
    assert kernel._layout_class(d100, d100) == kernel.UNALIGNED
    assert kernel._layout_class(column_major, dense) == kernel.STRIDED
    assert kernel._layout_class(column_major, column_slice) == kernel.MIXED
    # The wide-label pass narrows its chunks, on 8 warps, on anything but aligned rows.
    aligned = kernel._wide_pass_config(64, False, kernel.ALIGNED)
    assert (aligned.block_d, aligned.num_warps) == (32, 4)
    for layout in (kernel.STRIDED, kernel.UNALIGNED, kernel.MIXED):
        wide = kernel._wide_pass_config(64, False, layout)
        assert (wide.block_n, wide.block_d, wide.num_warps) == (32, 16, 8), layout


def test_reference_text_operands_share_a_row_slice():
    from torchfg.ops.triplet.reference import text_similarity_operands

    text = torch.randn(10, 4, device=TEST_DEVICE)
    text[3] = 0.0
    expected = text / text.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for anchors, offset, shared in ((text[2:7], 2, True), (text[2:7].clone(), 2, False), (text[2:7], 1, False),
                                    (text[2:7], -1, False)):
        a, c = text_similarity_operands(anchors, text, offset)
        assert torch.allclose(a, expected[2:7], atol=1e-6) and torch.allclose(c, expected, atol=1e-6)
        assert (a.data_ptr() == c[2:].data_ptr()) == shared, (offset, shared)


# ----------------------------------------------------------------------------- bad input


def _bad_call(**changes):
    x = torch.randn(5, 3, device=TEST_DEVICE)
    y = torch.zeros(5, dtype=torch.int64, device=TEST_DEVICE)
    args = dict(anchors=x, candidates=x, anchor_labels=y, candidate_labels=y, anchor_text=None, candidate_text=None)
    options = {**_BASIC, "exclude_self": True}
    del options["self_offset"]  # the launchers' internal name; the public op takes exclude_self
    for key, value in changes.items():
        (args if key in args else options)[key] = value
    # Inputs are checked once, by the public op; the launcher keeps torch._check preconditions only.
    return mine_hardest(*args.values(), **options, backend="triton")


@pytest.mark.parametrize(
    "changes, error, name",
    [
        (dict(anchors=torch.randn(5, 3, 1)), ValueError, "anchors"),
        (dict(candidates=torch.randn(5, 4)), ValueError, "feature size D"),
        (dict(candidates=torch.randn(5, 3, dtype=torch.float64)), TypeError, "dtype"),
        (dict(anchors=torch.ones(5, 3, dtype=torch.int64)), TypeError, "anchors"),
        (dict(anchor_labels=torch.zeros(4, dtype=torch.int64)), ValueError, "anchor_labels"),
        (dict(candidate_labels=torch.zeros(5)), TypeError, "candidate_labels"),
        (dict(metric="manhattan"), ValueError, "metric"),
        (dict(anchor_text=torch.randn(5, 2)), ValueError, "candidate_text"),
        (dict(anchor_text=torch.randn(5, 2), candidate_text=torch.randn(5, 3)), ValueError, "feature size T"),
        (dict(anchor_text=torch.randn(4, 2), candidate_text=torch.randn(5, 2)), ValueError, "anchor_text"),
        (dict(anchor_offset=5), ValueError, "anchor_offset"),
        (dict(anchor_offset=1), ValueError, "anchor_offset"),  # candidates is anchors: row i is candidate i
        (dict(candidates=torch.randn(4, 3), candidate_labels=torch.zeros(4, dtype=torch.int64)), ValueError, "anchor_offset"),
        (dict(anchor_offset=-1), ValueError, "anchor_offset"),
        (dict(anchor_offset=0.0), TypeError, "anchor_offset"),
        (dict(exclude_self=1), TypeError, "exclude_self"),
        (dict(base_margin=float("nan")), ValueError, "base_margin"),
        (dict(margin_scale=None), TypeError, "margin_scale"),
    ],
)
def test_bad_input_names_the_argument(changes, error, name):
    changes = {k: v.to(TEST_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(error, match=name):
        _bad_call(**changes)


@requires_triton
@pytest.mark.parametrize("tiles", [TILES[1], TILES[5]], ids=["splits", "symmetric"])
def test_explicit_small_splits_keep_the_grid_within_cudas_y_cap(tiles, monkeypatch):
    """Splits are the grid's y extent, which CUDA caps at 65535 (the interpreter has none): an
    explicit 16-candidate split of a 1M-row bank asked for 65536. The cap is 2 here, for 37 rows in
    16-row tiles (3 splits, or 4 symmetric ones, uncapped): every launch stays within it, and the
    choices equal those of uncapped splits."""
    import torchfg.ops.triplet.triton as mining

    x, y = _cluster_batch()
    tiles = dataclasses.replace(tiles, candidates_per_split=16)
    expected = run_kernel(x, x, y, y, None, None, tiles, **_BASIC)
    monkeypatch.setattr(mining, "MAX_GRID_YZ", 2)
    grids = []
    kernel_type = type(mining._mine_hardest_kernel)
    real_getitem = kernel_type.__getitem__

    def recording_getitem(kernel, grid):
        grids.append(grid)
        return real_getitem(kernel, grid)

    monkeypatch.setattr(kernel_type, "__getitem__", recording_getitem)
    got = run_kernel(x, x, y, y, None, None, tiles, **_BASIC)
    monkeypatch.undo()
    mined = [g for g in grids if isinstance(g, tuple) and len(g) == 2]
    assert mined and max(g[1] for g in mined) <= 2, grids
    assert [t.tolist() for t in got] == [t.tolist() for t in expected]


@pytest.mark.parametrize("sparse", [True, False, None])
def test_reference_wrapping_anchors_never_get_themselves_as_positive(sparse):
    """A batch that wraps past the end of a ring memory (anchor_offset 62 of 64): with unique
    labels no anchor has a positive. The sparse positive path took the anchor's own copy past the
    wrap (its self column was not taken modulo M). Also a P x K batch (32 classes of 2), whose
    default is the sparse path: positives and negatives equal the brute force."""
    from torchfg.ops.triplet.reference import mine_hardest_reference

    gen = torch.Generator().manual_seed(9)
    memory = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    anchors = memory[[62, 63, 0, 1]]
    kw = dict(metric="euclidean", base_margin=0.2, margin_scale=0.0, text_positive_threshold=None)
    pos, _ = mine_hardest_reference(anchors, memory, torch.tensor([62, 63, 0, 1]), torch.arange(64), None, None,
                                    self_offset=62, sparse_positives=sparse, **kw)
    assert pos.tolist() == [-1, -1, -1, -1]
    labels = torch.arange(64) // 2
    pos, neg = mine_hardest_reference(memory, memory, labels, labels, None, None, self_offset=0,
                                      sparse_positives=sparse, **kw)
    dist = torch.cdist(memory, memory)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(64, dtype=torch.bool)
    assert pos.tolist() == dist.masked_fill(~same | eye, -1.0).argmax(1).tolist()
    assert neg.tolist() == dist.masked_fill(same, float("inf")).argmin(1).tolist()


def test_semi_hard_and_all_triplets_take_a_batch_across_the_ring_end():
    """mine_semi_hard and mine_all_triplets accept any anchor_offset in [0, M): anchor i is
    candidate (anchor_offset + i) % M, as for the hardest miners (they refused an offset past
    M - N, so a cross-batch memory could not mine a batch that wraps with them). Checked against
    loops, with duplicate labels so that every anchor has positives besides its own copy."""
    from torchfg.ops.triplet import mine_all_triplets, mine_semi_hard

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    gen = torch.Generator().manual_seed(seed)
    m, n, offset = 11, 4, 9
    memory = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    memory_labels = torch.randint(0, 3, (m,), generator=gen)
    slots = [(offset + i) % m for i in range(n)]
    anchors, anchor_labels = memory[slots], memory_labels[slots]
    expected_all = [
        (i, p, q) for i in range(n) for p in range(m) for q in range(m)
        if memory_labels[p] == anchor_labels[i] and p != slots[i] and memory_labels[q] != anchor_labels[i]
    ]
    got = mine_all_triplets(anchor_labels, memory_labels, exclude_self=True, anchor_offset=offset)
    assert list(zip(*(t.tolist() for t in got))) == expected_all, seed
    d = torch.cdist(anchors, memory).tolist()
    expected_semi = []
    for i in range(n):
        negatives = [q for q in range(m) if memory_labels[q] != anchor_labels[i]]
        if not negatives:
            continue
        for p in range(m):
            if memory_labels[p] != anchor_labels[i] or p == slots[i]:
                continue
            farther = [q for q in negatives if d[i][q] > d[i][p]]
            q = min(farther, key=lambda k: (d[i][k], k)) if farther else max(negatives, key=lambda k: (d[i][k], -k))
            expected_semi.append((i, p, q))
    got = mine_semi_hard(anchors, memory, anchor_labels, memory_labels, exclude_self=True, anchor_offset=offset)
    assert list(zip(*(t.tolist() for t in got))) == expected_semi, seed
    with pytest.raises(ValueError, match="anchor_offset"):
        mine_all_triplets(anchor_labels, memory_labels, exclude_self=True, anchor_offset=m)


def test_sparse_positives_up_to_the_block_buffers_bytes(monkeypatch):
    """Positives are listed as pairs while their index lists fit in the block buffer's bytes, not
    only below the absolute MAX_SPARSE_PAIRS: the cap alone sent 4M pairs (N = 64k in classes of
    64) to the masked path, 2.8x slower. Scaled down: with the cap at 1, 1792 pairs against a
    (256, 256) block stay sparse, and the result is the brute force's."""
    from torchfg.ops.triplet import reference

    segments = []
    original = reference._segment_argmax
    monkeypatch.setattr(reference, "_segment_argmax", lambda *a: segments.append(1) or original(*a))
    monkeypatch.setattr(reference, "MAX_SPARSE_PAIRS", 1)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(256, 5, generator=gen, dtype=torch.float64)
    labels = torch.arange(256) // 8
    kw = dict(metric="euclidean", base_margin=0.2, margin_scale=0.0, text_positive_threshold=None)
    pos, neg = reference.mine_hardest_reference(x, x, labels, labels, None, None, self_offset=0, **kw)
    assert segments
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    assert pos.tolist() == dist.masked_fill(~same | torch.eye(256, dtype=torch.bool), -1.0).argmax(1).tolist()
    assert neg.tolist() == dist.masked_fill(same, float("inf")).argmin(1).tolist()
