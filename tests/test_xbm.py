"""torchfg.losses.CrossBatchMemory against pytorch-metric-learning's and a brute-force ATL reference."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE, backends_to_test
from dist_utils import run_on_ranks
from torchfg.errors import BackendUnavailableError
from torchfg.losses import AdaptiveTripletLoss, CrossBatchMemory, TripletMarginLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.miners import BatchHardMiner  # noqa: E402
from pytorch_metric_learning.reducers import MeanReducer  # noqa: E402


def _pml_xbm(dim: int, memory_size: int, reduction: str):
    distance = LpDistance(normalize_embeddings=False)
    reducer = MeanReducer() if reduction == "mean" else None  # None: PML's AvgNonZeroReducer
    kwargs = {"reducer": reducer} if reducer is not None else {}
    loss = pml_losses.TripletMarginLoss(margin=0.2, distance=distance, **kwargs)
    return pml_losses.CrossBatchMemory(loss, dim, memory_size=memory_size, miner=BatchHardMiner(distance=distance))


def _batches(g, steps, batch, dim, classes, dtype=torch.float64):
    """Drawn on the CPU, on the test device: a GPU machine's triton backend takes CUDA tensors only."""
    return [(torch.randn(batch, dim, generator=g, dtype=dtype).to(TEST_DEVICE),
             torch.randint(0, classes, (batch,), generator=g).to(TEST_DEVICE))
            for _ in range(steps)]


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_matches_pml_over_steps_with_wrap_around(backend, reduction):
    # memory 20, batches of 7: the third step wraps around the ring (slots 14..19, 0), and
    # later steps overwrite the oldest rows; loss and gradient must match PML at every step.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    dim, memory_size = 5, 20
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2, reduction=reduction, backend=backend), dim, memory_size)
    theirs = _pml_xbm(dim, memory_size, reduction)
    for step, (emb, labels) in enumerate(_batches(g, 6, 7, dim, 3)):
        a = emb.clone().requires_grad_()
        b = emb.clone().requires_grad_()
        loss_ours, loss_theirs = ours(a, labels), theirs(b, labels)
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype), msg=f"step {step}")
        torch.testing.assert_close(a.grad, b.grad, msg=f"step {step}")
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)


@pytest.mark.parametrize("backend", backends_to_test())
def test_enqueue_mask_matches_pml(backend):
    g = torch.Generator().manual_seed(11)
    dim, memory_size = 4, 16
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2, backend=backend), dim, memory_size)
    theirs = _pml_xbm(dim, memory_size, "mean")
    for emb, labels in _batches(g, 4, 10, dim, 3):
        mask = (torch.rand(10, generator=g) < 0.5).to(TEST_DEVICE)
        mask[0], mask[1] = True, False
        a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        loss_ours, loss_theirs = ours(a, labels, enqueue_mask=mask), theirs(b, labels, enqueue_mask=mask)
        torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype))
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(a.grad, b.grad)


def _brute_force_atl(emb, labels, text, memory, memory_labels, memory_text, self_slots, m0, s):
    """Mean ATL of anchors against memory rows (own slot excluded from positives), from matrices."""
    d = torch.cdist(emb, memory)
    t = torch.nn.functional.normalize(text, dim=1) @ torch.nn.functional.normalize(memory_text, dim=1).T
    margins = m0 + s * (1 - t) / 2
    same = labels[:, None] == memory_labels[None, :]
    positive = same.clone()
    positive[torch.arange(len(emb), device=emb.device), self_slots] = False
    losses = []
    for i in range(len(emb)):
        if not positive[i].any() or same[i].all():
            continue
        p = torch.where(positive[i], d[i], torch.tensor(-float("inf"), dtype=d.dtype, device=d.device)).argmax()
        n = torch.where(~same[i], margins[i] - d[i], torch.tensor(-float("inf"), dtype=d.dtype, device=d.device)).argmax()
        losses.append(torch.relu(d[i, p] - d[i, n] + margins[i, n]))
    return torch.stack(losses).mean() if losses else emb.sum() * 0


@pytest.mark.parametrize("backend", backends_to_test())
def test_adaptive_triplet_loss_with_a_text_memory(backend):
    g = torch.Generator().manual_seed(12)
    dim, text_dim, memory_size, batch = 6, 5, 18, 8
    xbm = CrossBatchMemory(AdaptiveTripletLoss(base_margin=0.1, margin_scale=0.5, backend=backend), dim, memory_size,
                           text_size=text_dim)
    memory, memory_labels, memory_text = [], [], []
    for step in range(4):  # the third step wraps around
        emb = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(TEST_DEVICE)
        labels = torch.randint(0, 3, (batch,), generator=g).to(TEST_DEVICE)
        text = torch.randn(batch, text_dim, generator=g, dtype=torch.float64).to(TEST_DEVICE)
        start = xbm.queue_idx
        a = emb.clone().requires_grad_()
        loss = xbm(a, labels, text_embeddings=text)
        (grad,) = torch.autograd.grad(loss, a)
        # The ring after this step, rebuilt by hand.
        memory += list(emb)
        memory_labels += list(labels)
        memory_text += list(text)
        slots = [(start + i) % memory_size for i in range(batch)]
        ring = torch.zeros(memory_size, dim, dtype=torch.float64, device=TEST_DEVICE)
        ring_labels = torch.zeros(memory_size, dtype=torch.int64, device=TEST_DEVICE)
        ring_text = torch.zeros(memory_size, text_dim, dtype=torch.float64, device=TEST_DEVICE)
        for j, (e, lab, t) in enumerate(zip(memory, memory_labels, memory_text)):
            ring[j % memory_size], ring_labels[j % memory_size], ring_text[j % memory_size] = e, lab, t
        size = min(len(memory), memory_size)
        b = emb.clone().requires_grad_()
        expected = _brute_force_atl(b, labels, text, ring[:size], ring_labels[:size], ring_text[:size],
                                    torch.tensor(slots, device=TEST_DEVICE), 0.1, 0.5)
        torch.testing.assert_close(loss, expected, msg=f"step {step}")
        torch.testing.assert_close(grad, torch.autograd.grad(expected, b)[0], msg=f"step {step}")
        torch.testing.assert_close(xbm.text_memory[:size], ring_text[:size])


@pytest.mark.parametrize("backend", backends_to_test())
def test_adaptive_memory_sends_no_gradient_into_the_text_embeddings(backend):
    """Text embeddings are weak-label targets: through the memory too (mined triplets and an
    indices_tuple), the backward reaches the image embeddings only, never the text."""
    g = torch.Generator().manual_seed(17)
    xbm = CrossBatchMemory(AdaptiveTripletLoss(margin_scale=2.0, backend=backend), 4, 16, text_size=5)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=TEST_DEVICE)
    tuple_ = tuple(torch.tensor(i, device=TEST_DEVICE) for i in ([0, 2], [1, 3], [4, 5]))
    for indices in (None, tuple_):
        e = torch.randn(8, 4, generator=g).to(TEST_DEVICE).requires_grad_()
        t = torch.randn(8, 5, generator=g).to(TEST_DEVICE).requires_grad_()
        loss = xbm(e, labels, indices_tuple=indices, text_embeddings=t)
        assert loss.item() > 0
        loss.backward()
        assert t.grad is None
        assert e.grad is not None and e.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", backends_to_test())
def test_indices_tuple_triplets_use_the_adaptive_text_margin_of_the_memory_rows(backend):
    """With an AdaptiveTripletLoss, a given triplet's margin is m0 + s (1 - cos(t_a, t_n)) / 2 with
    t_n the negative's text in the memory (text distance: larger for dissimilar text). Its loss,
    the trailing entries of reduction="none", is checked against that formula by hand in fp64."""
    g = torch.Generator().manual_seed(18)
    m0, s, dim, text_dim = 0.1, 0.5, 4, 5
    xbm = CrossBatchMemory(AdaptiveTripletLoss(m0, s, reduction="none", backend=backend), dim, 16, text_size=text_dim)
    steps = [
        (torch.randn(6, dim, generator=g, dtype=torch.float64), torch.tensor(labels),
         torch.randn(6, text_dim, generator=g, dtype=torch.float64))
        for labels in ([0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2])
    ]
    steps = [tuple(x.to(TEST_DEVICE) for x in step) for step in steps]
    xbm(*steps[0][:2], text_embeddings=steps[0][2])
    emb, labels, text = steps[1]
    # Anchors index this batch; positives and negatives the memory after the write (rows 6..11: this batch).
    anchors, positives, negatives = ([0, 1, 2, 3], [0, 3, 5, 1], [2, 4, 7, 5])
    tuple_ = tuple(torch.tensor(i, device=TEST_DEVICE) for i in (anchors, positives, negatives))
    per = xbm(emb, labels, indices_tuple=tuple_, text_embeddings=text)
    assert per.shape == (6 + 4,)  # the mined per-anchor losses, then the given triplets'
    memory = torch.cat([steps[0][0], emb])
    memory_text = torch.cat([steps[0][2], text])
    torch.testing.assert_close(xbm.embedding_memory[:12], memory, rtol=0, atol=0)
    expected = []
    for a, p, n in zip(anchors, positives, negatives):
        d_ap = (emb[a] - memory[p]).square().sum().sqrt()
        d_an = (emb[a] - memory[n]).square().sum().sqrt()
        cos = (text[a] * memory_text[n]).sum() / (text[a].norm() * memory_text[n].norm())
        expected.append(torch.relu(d_ap - d_an + m0 + s * (1 - cos) / 2))
    expected = torch.stack(expected)
    assert (expected > 0).all()  # every hinge active: the margin shows in every value
    torch.testing.assert_close(per[6:], expected)


def _steps_with_given_triplets_match(ours, theirs, g, dim):
    """Three steps of 6 rows in 2 classes, each with the same three given triplets: equal losses
    and gradients."""
    for emb, labels in _batches(g, 3, 6, dim, 2):
        extra = tuple(torch.tensor(pair, device=TEST_DEVICE) for pair in ([0, 1], [2, 3], [4, 5]))
        a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        loss_ours, loss_theirs = ours(a, labels, indices_tuple=extra), theirs(b, labels, indices_tuple=extra)
        torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype))
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_indices_tuple_adds_triplets_like_pml():
    g = torch.Generator().manual_seed(13)
    dim, memory_size = 4, 12
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2), dim, memory_size)
    _steps_with_given_triplets_match(ours, _pml_xbm(dim, memory_size, "mean"), g, dim)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_all_triplets_memory_matches_pml_over_steps_with_wrap_around(reduction):
    """PML's CrossBatchMemory without a miner takes every (anchor, memory positive, memory
    negative) triplet: ``TripletMarginLoss(mining="all")`` does the same (it was refused). Memory
    20, batches of 7: the third step's batch wraps around the ring, so an anchor's own copy sits
    past the end for some rows and must still never be its positive."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    dim, memory_size = 5, 20
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2, mining="all", reduction=reduction), dim, memory_size)
    reducer = {"reducer": MeanReducer()} if reduction == "mean" else {}
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False), **reducer),
        dim, memory_size=memory_size,
    )
    for step, (emb, labels) in enumerate(_batches(g, 6, 7, dim, 3)):
        a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        loss_ours, loss_theirs = ours(a, labels), theirs(b, labels)
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype), msg=f"seed {seed}, step {step}")
        torch.testing.assert_close(a.grad, b.grad, msg=f"seed {seed}, step {step}")
        assert ours.queue_idx == theirs.queue_idx


def test_semi_hard_memory_matches_an_explicit_loop_across_the_ring_end():
    """Semi-hard mining against the memory (FaceNet: per (anchor, memory positive) pair, the
    closest memory negative farther than the positive, else the farthest), checked against loops
    over a batch that wraps around the end of the ring."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    dim, memory_size, margin = 3, 10, 0.3
    xbm = CrossBatchMemory(TripletMarginLoss(margin=margin, mining="semi_hard"), dim, memory_size)
    for step, (emb, labels) in enumerate(_batches(g, 4, 4, dim, 2)):
        start = xbm.queue_idx
        x = emb.clone().requires_grad_()
        loss = xbm(x, labels)
        memory, memory_labels = xbm.embedding_memory[: xbm.size], xbm.label_memory[: xbm.size]
        terms = []
        for i in range(x.shape[0]):
            own = (start + i) % memory_size
            d = torch.linalg.vector_norm(x[i] - memory, dim=1)
            negatives = [j for j in range(xbm.size) if memory_labels[j] != labels[i]]
            if not negatives:
                continue
            for j in range(xbm.size):
                if memory_labels[j] != labels[i] or j == own:
                    continue
                farther = [n for n in negatives if d[n] > d[j]]
                key = d.detach().tolist()
                n = min(farther, key=lambda k: (key[k], k)) if farther else max(negatives, key=lambda k: (key[k], -k))
                terms.append(torch.relu(d[j] - d[n] + margin))
        expected = torch.stack(terms).mean() if terms else x.sum() * 0.0
        torch.testing.assert_close(loss, expected.to(loss.dtype), msg=f"seed {seed}, step {step}")
        (grad,) = torch.autograd.grad(expected, x, allow_unused=True) if terms else (torch.zeros_like(x),)
        loss.backward()
        torch.testing.assert_close(x.grad, grad if grad is not None else torch.zeros_like(x), msg=f"seed {seed}, step {step}")


def test_all_triplets_memory_adds_an_indices_tuple_and_samples_per_anchor():
    """With ``mining="all"``, a given ``indices_tuple`` adds exactly its triplets to the mined
    ones, as PML's memory does with a miner that returns every triplet. (PML without a miner
    mines *pairs*, turns the given triplets into pairs too and re-combines every pair of an
    anchor: the given positive then meets every memory negative. The migration guide says so.)
    ``triplets_per_anchor=k`` draws k per anchor against the memory."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    g = torch.Generator().manual_seed(13)
    dim, memory_size = 4, 12
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2, mining="all", reduction="mean_nonzero"), dim, memory_size)
    theirs = pml_losses.CrossBatchMemory(
        pml_losses.TripletMarginLoss(margin=0.2, distance=LpDistance(normalize_embeddings=False)), dim,
        memory_size=memory_size, miner=lambda emb, labels, ref, ref_labels: lmu.get_all_triplets_indices(labels, ref_labels),
    )
    _steps_with_given_triplets_match(ours, theirs, g, dim)
    sampled = CrossBatchMemory(TripletMarginLoss(mining="all", triplets_per_anchor=3, reduction="none"), dim, memory_size)
    for emb, labels in _batches(g, 3, 6, dim, 2):
        losses = sampled(emb, labels)
        has_pair = [(labels[i] == sampled.label_memory[: sampled.size]).sum() > 1
                    and (labels[i] != sampled.label_memory[: sampled.size]).any() for i in range(6)]
        assert losses.shape == (3 * sum(bool(h) for h in has_pair),)


def test_state_dict_round_trip_and_device_dtype_follow():
    g = torch.Generator().manual_seed(14)
    xbm = CrossBatchMemory(TripletMarginLoss(), 4, 10)
    for emb, labels in _batches(g, 2, 6, 4, 3, dtype=torch.float32):
        xbm(emb, labels)
    assert xbm.embedding_memory.dtype == torch.float32 and (xbm.queue_idx, xbm.size) == (2, 10)
    state = xbm.state_dict()
    assert {"embedding_memory", "label_memory", "_extra_state"} <= set(state)
    clone = CrossBatchMemory(TripletMarginLoss(), 4, 10)
    clone.load_state_dict(state)
    assert (clone.queue_idx, clone.size) == (2, 10)
    emb, labels = _batches(g, 1, 6, 4, 3, dtype=torch.float32)[0]
    torch.testing.assert_close(clone(emb, labels), xbm(emb, labels))
    assert torch.equal(clone.embedding_memory, xbm.embedding_memory)
    xbm.reset_queue()
    assert xbm.size == 0 and xbm.queue_idx == 0


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="loss"):
        CrossBatchMemory(torch.nn.MSELoss(), 4)
    # pytorch-metric-learning's loss of the same name: the message tells the two apart.
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    with pytest.raises(TypeError, match=r"torchfg\.losses\.TripletMarginLoss .*got pytorch_metric_learning\..*TripletMarginLoss"):
        CrossBatchMemory(pml_losses.TripletMarginLoss(), 4)
    loss_all = TripletMarginLoss(mining="all")
    loss_all.backend = "triton"  # TripletMarginLoss refuses it when built; a later change is refused here
    with pytest.raises(BackendUnavailableError, match="mining='all'"):
        CrossBatchMemory(loss_all, 4)
    xbm_all = CrossBatchMemory(TripletMarginLoss(mining="all"), 4)
    xbm_all.loss.backend = "triton"  # a setting changed after construction: refused at the call
    with pytest.raises(BackendUnavailableError, match="mining='all'"):
        xbm_all(torch.randn(2, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="miner"):
        CrossBatchMemory(TripletMarginLoss(), 4, miner=object())
    with pytest.raises(ValueError, match="text_size"):
        CrossBatchMemory(AdaptiveTripletLoss(), 4)
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory(TripletMarginLoss(), 4, 0)
    xbm = CrossBatchMemory(TripletMarginLoss(), 4, 5)
    with pytest.raises(ValueError, match="embedding_size"):
        xbm(torch.randn(3, 6), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="memory_size"):
        xbm(torch.randn(6, 4), torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(torch.randn(3, 4), torch.tensor([0, 1, 0]), enqueue_mask=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="text_embeddings"):
        xbm(torch.randn(3, 4), torch.tensor([0, 1, 0]), text_embeddings=torch.randn(3, 2))
    assert xbm.size == 0  # nothing was enqueued by a rejected call
    with pytest.raises(ValueError, match="swap"):
        CrossBatchMemory(TripletMarginLoss(swap=True), 4)
    xbm.loss.swap = True  # after construction, as other settings may be changed: it was ignored
    with pytest.raises(ValueError, match="loss.swap must be False"):
        xbm(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    assert xbm.size == 0
    with pytest.raises(ValueError, match="text_size"):
        CrossBatchMemory(TripletMarginLoss(), 4, text_size=3)
    with pytest.raises(ValueError, match="backend"):
        AdaptiveTripletLoss(backend="gpu")


@pytest.mark.parametrize("backend", backends_to_test())
def test_an_empty_batch_gives_zero_before_and_after_the_memory_fills(backend):
    """An empty batch (a rank with no samples left) is a zero loss. On the Triton path it was
    refused while the memory was not full: its anchors' first slot is the first free one, which
    the kernel's anchor_offset check rejects."""
    g = torch.Generator().manual_seed(21)
    xbm = CrossBatchMemory(TripletMarginLoss(backend=backend), 4, 16)
    for step, (emb, labels) in enumerate(_batches(g, 5, 6, 4, 3, dtype=torch.float32)):
        size = xbm.size
        loss = xbm(emb[:0].requires_grad_(), labels[:0])
        assert loss.item() == 0.0 and xbm.size == size, step
        loss.backward()
        xbm(emb, labels)


def test_memory_triplet_loss_checks_its_own_arguments():
    """The PyTorch path took any unknown reduction for "mean_nonzero" and any truthy smooth."""
    from torchfg.functional.xbm import memory_triplet_loss

    g = torch.Generator().manual_seed(22)
    (emb, labels), (memory, memory_labels) = _batches(g, 2, 6, 4, 3, dtype=torch.float32)
    for kwargs, error, name in [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(reduction=None), ValueError, "reduction"),
        (dict(smooth="yes"), TypeError, "smooth"),
        (dict(metric="l2"), ValueError, "metric"),
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(margin_scale=-1.0), ValueError, "margin_scale"),
        (dict(mining="hard"), ValueError, "mining"),
        (dict(mining="all", text_embeddings=torch.randn(6, 2), memory_text=torch.randn(6, 2)), ValueError, "mining"),
        (dict(triplets_per_anchor=2), ValueError, "triplets_per_anchor"),
        (dict(mining="all", triplets_per_anchor=0), ValueError, "triplets_per_anchor"),
    ]:
        with pytest.raises(error, match=name):
            memory_triplet_loss(emb, labels, memory, memory_labels, None, backend="torch", **kwargs)
    # Semi-hard and all-triplets mining against a memory the anchors are not in: the plain loss
    # with the memory as its reference set.
    from torchfg.functional import triplet_margin_loss

    for mining in ("semi_hard", "all"):
        torch.testing.assert_close(
            memory_triplet_loss(emb, labels, memory, memory_labels, None, mining=mining, reduction="mean_nonzero"),
            triplet_margin_loss(emb, labels, ref_embeddings=memory, ref_labels=memory_labels, mining=mining,
                                reduction="mean_nonzero"),
        )


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
def test_memory_triplet_loss_checks_self_start_for_every_mining(mining):
    # The all-triplets selection took an offset outside [0, S) (or more anchors than memory rows)
    # as given: a mean over the wrong triplets. Every mining refuses it, naming self_start.
    from torchfg.functional.xbm import memory_triplet_loss

    memory, memory_labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    rows = torch.tensor([4, 0, 1])
    emb, labels = memory[rows].clone(), memory_labels[rows]
    for start, error in [(-1, ValueError), (5, ValueError), (True, TypeError), (1.5, TypeError)]:
        with pytest.raises(error, match="self_start"):
            memory_triplet_loss(emb, labels, memory, memory_labels, start, mining=mining, backend="torch")
    with pytest.raises(ValueError, match="self_start"):
        memory_triplet_loss(torch.randn(6, 4), torch.arange(6) % 3, memory, memory_labels, 0, mining=mining,
                            backend="torch")
    # In range: the anchors' own rows (4, 0, 1 from 4, wrapping) are never their positives.
    loss = memory_triplet_loss(emb, labels, memory, memory_labels, 4, mining=mining, reduction="none", backend="torch")
    assert torch.isfinite(loss).all()


def test_a_loss_setting_changed_after_construction_is_still_checked():
    """A training loop may set the loss's attributes (a margin schedule); CrossBatchMemory checks
    them at every call, and leaves the memory as it was when they are bad."""
    xbm = CrossBatchMemory(TripletMarginLoss(backend="torch"), 4, 16)
    emb, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    xbm(emb, labels)
    for name, value, error in [("reduction", "avg", ValueError), ("margin", float("inf"), ValueError),
                               ("smooth", "yes", TypeError)]:
        setattr(xbm.loss, name, value)
        with pytest.raises(error, match=name):
            xbm(emb, labels)
        assert xbm.size == 6 and xbm.queue_idx == 6
        xbm.loss = TripletMarginLoss(backend="torch")


def test_load_state_dict_refuses_a_state_of_another_memory_size():
    xbm = CrossBatchMemory(TripletMarginLoss(), 4, 16)
    state = xbm.state_dict()
    state["_extra_state"] = {"queue_idx": 3, "size": 99}
    with pytest.raises(ValueError, match="memory_size"):
        xbm.load_state_dict(state)


def test_rejected_indices_tuple_leaves_the_memory_unchanged():
    """indices_tuple is checked before the batch is enqueued, with the errors triplet_margin_loss
    gives (positives and negatives index the memory as it is after this step's write)."""
    xbm = CrossBatchMemory(TripletMarginLoss(), 4, 10)
    xbm(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    before = (xbm.size, xbm.queue_idx, xbm.embedding_memory.clone())
    emb, labels = torch.randn(4, 4), torch.tensor([0, 1, 0, 1])
    bad = {
        "negatives must be in \\[0, 8\\)": (ValueError, (torch.tensor([0]), torch.tensor([1]), torch.tensor([8]))),
        "anchors must be in \\[0, 4\\)": (ValueError, (torch.tensor([4]), torch.tensor([1]), torch.tensor([2]))),
        "anchors must be a 1-D integer": (TypeError, (torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2]))),
        "equal lengths": (ValueError, (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2]))),
    }
    for match, (error, indices) in bad.items():
        with pytest.raises(error, match=match):
            xbm(emb, labels, indices_tuple=indices)
        assert (xbm.size, xbm.queue_idx) == before[:2] and torch.equal(xbm.embedding_memory, before[2]), match
    # In range after the write (memory rows 4..7 are this batch): accepted.
    xbm(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([6]), torch.tensor([7])))
    assert xbm.size == 8


def test_indices_tuple_one_past_the_filled_memory_is_rejected_before_the_first_write():
    """On an empty memory the batch's 4 rows are all the memory there will be after the write, so a
    negative equal to 4 is one past the end: it must raise the indices_tuple ValueError (exclusive
    bound) and leave the memory empty, not be enqueued and then gathered out of range."""
    xbm = CrossBatchMemory(TripletMarginLoss(), 3, 8)
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(16))
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="indices_tuple negatives must be in \\[0, 4\\), got values in \\[4, 4\\]"):
        xbm(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([4])))
    assert (xbm.size, xbm.queue_idx) == (0, 0)
    assert torch.equal(xbm.embedding_memory, torch.zeros(8, 3))
    # The last row after the write (3) is in range.
    xbm(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([3])))
    assert xbm.size == 4


def _memory_for(kind, backend, cross_rank):
    if kind == "adaptive":
        return CrossBatchMemory(AdaptiveTripletLoss(cross_rank=cross_rank, backend=backend), 4, 20, text_size=3)
    loss = TripletMarginLoss(mining=kind, reduction="mean_nonzero", cross_rank=cross_rank, backend="auto")
    return CrossBatchMemory(loss, 4, 20)


def _cross_rank_steps(rank, world, batches, backend, kind):
    torch.manual_seed(0)
    xbm = _memory_for(kind, backend, cross_rank=True)
    results = []
    for emb, labels, text in batches:
        rows = slice(rank * len(emb) // world, (rank + 1) * len(emb) // world)
        a = emb[rows].clone().requires_grad_()
        loss = xbm(a, labels[rows], text_embeddings=text[rows] if kind == "adaptive" else None)
        loss.backward()
        results.append((loss.detach(), a.grad))
    return results, xbm.embedding_memory.clone()


@pytest.mark.parametrize(
    "backend, kind", [(b, "adaptive") for b in backends_to_test()] + [("torch", "all"), ("torch", "semi_hard")]
)
def test_cross_rank_matches_single_process_on_the_concatenated_batch(backend, kind):
    if backend == "triton" and TEST_DEVICE.type == "cuda":
        pytest.skip("the gloo ranks hold CPU tensors, which the triton backend takes under the interpreter only")
    g = torch.Generator().manual_seed(15)
    world, batch = 2, 8
    batches = [(torch.randn(batch, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (batch,), generator=g),
                torch.randn(batch, 3, generator=g, dtype=torch.float64)) for _ in range(4)]
    outcomes = run_on_ranks(_cross_rank_steps, world, batches, backend, kind)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    single = _memory_for(kind, backend, cross_rank=False)
    for step, (emb, labels, text) in enumerate(batches):
        a = emb.clone().requires_grad_()
        loss = single(a, labels, text_embeddings=text if kind == "adaptive" else None)
        loss.backward()
        per_rank = [o[1][0][step] for o in outcomes]
        # Mean of the ranks' values = the single-process loss; each rank's rows get world x grad.
        torch.testing.assert_close(sum(r[0] for r in per_rank) / world, loss.detach())
        torch.testing.assert_close(torch.cat([r[1] for r in per_rank]), world * a.grad)
    for outcome in outcomes:
        torch.testing.assert_close(outcome[1][1], single.embedding_memory)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_first_call_under_inference_mode_leaves_the_memory_trainable(dtype):
    """A first call under torch.inference_mode (a sanity-check validation pass) with embeddings of
    another dtype than the memory rebuilt the buffers as inference tensors: every later training
    step failed in the in-place enqueue."""
    xbm = CrossBatchMemory(TripletMarginLoss(backend="torch"), 16, 64)
    labels = torch.arange(8) // 2
    with torch.inference_mode():
        xbm(torch.randn(8, 16, dtype=dtype), labels)
    assert not xbm.embedding_memory.is_inference() and xbm.embedding_memory.dtype == dtype
    emb = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    xbm(emb, labels).backward()
    assert xbm.size == 16 and emb.grad is not None


def test_compiled_step_with_memory_does_not_recompile_per_step():
    """The ring's position and fill level change every step; traced, each value was a new graph
    (then the whole compiled step ran eagerly past the recompile limit). The memory step now runs
    eagerly behind a graph break, with the same losses as an uncompiled memory."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = torch.nn.Linear(12, 6)
    compiled_memory = CrossBatchMemory(TripletMarginLoss(margin=0.2), embedding_size=6, memory_size=40)
    eager_memory = CrossBatchMemory(TripletMarginLoss(margin=0.2), embedding_size=6, memory_size=40)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def step(x, labels):
        return compiled_memory(model(x), labels)

    labels = torch.arange(8) // 2
    counts = []
    for _ in range(12):  # 5 steps to fill the memory, then a full ring turn
        x = torch.randn(8, 12)
        torch.testing.assert_close(step(x, labels), eager_memory(model(x), labels))
        counts.append(counter.frame_count)
    assert counts[-1] == counts[1] <= 2, counts
    assert compiled_memory.queue_idx == eager_memory.queue_idx
    torch.testing.assert_close(compiled_memory.embedding_memory, eager_memory.embedding_memory)


@pytest.mark.parametrize("reentrant", [False, True])
def test_memory_inside_activation_checkpointing_is_refused_before_a_second_write(reentrant):
    """A checkpointed function that contains the memory re-runs it in backward: the batch was
    enqueued twice (use_reentrant=True: silently, size 16 after one batch of 8, every row stored
    twice; False: PyTorch's CheckpointError after the second write). The re-run raises now, before
    it writes; checkpointing the model alone, with the memory outside, works."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    inputs, labels = torch.randn(8, 6, requires_grad=reentrant), torch.arange(8) % 3
    xbm = CrossBatchMemory(TripletMarginLoss(), 4, 32)
    loss = checkpoint(lambda x: xbm(model(x), labels), inputs, use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="checkpoint the model only"):
        loss.backward()
    assert xbm.size == 8 and xbm.queue_idx == 8
    outside = CrossBatchMemory(TripletMarginLoss(), 4, 32)
    outside(checkpoint(model, inputs, use_reentrant=reentrant), labels).backward()
    assert outside.size == 8


def test_a_failed_load_leaves_the_ring_as_it_was():
    """A state of a 20-slot memory loaded into a 32-slot one: PyTorch raises the size mismatch
    but had already set the extra state, so a caller that caught the error went on with size 20
    over zero rows labelled 0 (a different loss from a fresh memory); a state of another
    embedding size overwrote the labels. Nothing of such a state loads now."""
    g = torch.Generator().manual_seed(3)
    small = CrossBatchMemory(TripletMarginLoss(), 4, 20)
    for emb, labels in _batches(g, 3, 8, 4, 3, dtype=torch.float32):
        small(emb, labels)
    target = CrossBatchMemory(TripletMarginLoss(), 4, 32)
    emb, labels = _batches(g, 1, 8, 4, 3, dtype=torch.float32)[0]
    target(emb, labels)
    state = (target.queue_idx, target.size)
    memory, labels_before = target.embedding_memory.clone(), target.label_memory.clone()
    with pytest.raises(RuntimeError, match="size mismatch"):
        target.load_state_dict(small.state_dict())
    assert (target.queue_idx, target.size) == state == (8, 8)
    assert torch.equal(target.embedding_memory, memory) and torch.equal(target.label_memory, labels_before)
    # Another embedding size, the same number of slots: the labels (same shape) were copied over
    # the rows they did not belong to.
    narrow = CrossBatchMemory(TripletMarginLoss(), 3, 32)
    narrow(torch.randn(5, 3, generator=g), torch.arange(5) + 100)
    with pytest.raises(RuntimeError, match="size mismatch for embedding_memory"):
        target.load_state_dict(narrow.state_dict())
    assert torch.equal(target.label_memory, labels_before) and (target.queue_idx, target.size) == (8, 8)


def _two_view_memory(kind):
    if kind == "adaptive":
        return CrossBatchMemory(AdaptiveTripletLoss(margin_scale=0.3, backend="torch"), 4, 20, text_size=3)
    return CrossBatchMemory(TripletMarginLoss(mining=kind, reduction="mean_nonzero", backend="torch"), 4, 20)


@pytest.mark.parametrize("kind", ["batch_hard", "semi_hard", "all", "adaptive"])
def test_two_calls_before_one_backward_equal_a_backward_per_call(kind):
    """Two views per step, ``xbm(v1) + xbm(v2)`` then one backward (as pytorch-metric-learning
    allows): the second call's write into the ring made the first loss's backward raise PyTorch's
    in-place error. Gradients, losses and the memory equal those of a backward after each call,
    over steps that wrap the ring; a backward per call, or a loss dropped unused, copies nothing.
    Mining and reductions run on the torch backend (the memory's own mining: batch-hard is the
    fused op there too)."""
    import copy

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    ours = _two_view_memory(kind).double()  # the first call converts no buffer
    per_call = copy.deepcopy(ours)
    for step in range(5):
        views = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        labels = torch.randint(0, 3, (6,), generator=g)
        texts = [torch.randn(6, 3, generator=g, dtype=torch.float64) if kind == "adaptive" else None for _ in range(2)]
        a = [v.clone().requires_grad_() for v in views]
        b = [v.clone().requires_grad_() for v in views]
        losses = [ours(a[i], labels, text_embeddings=texts[i]) for i in range(2)]
        sum(losses).backward()
        for i in range(2):
            before = per_call.embedding_memory
            expected = per_call(b[i], labels, text_embeddings=texts[i])
            expected.backward()
            assert per_call.embedding_memory is before, "a backward per call needs no copy"
            torch.testing.assert_close(losses[i], expected, rtol=0, atol=0, msg=f"step {step}, view {i}")
            torch.testing.assert_close(a[i].grad, b[i].grad, rtol=0, atol=0, msg=f"step {step}, view {i}")
        assert (ours.queue_idx, ours.size) == (per_call.queue_idx, per_call.size)
        assert torch.equal(ours.embedding_memory, per_call.embedding_memory)
        assert torch.equal(ours.label_memory, per_call.label_memory)
        if kind == "adaptive":
            assert torch.equal(ours.text_memory, per_call.text_memory)
    # A loss dropped without a backward awaits nothing: the next call writes in place.
    before = per_call.embedding_memory
    per_call(torch.randn(6, 4, dtype=torch.float64, requires_grad=True), labels, text_embeddings=texts[0])
    per_call(torch.randn(6, 4, dtype=torch.float64, requires_grad=True), labels, text_embeddings=texts[0])
    assert per_call.embedding_memory is before


def test_two_views_before_one_backward_match_pml():
    """The two-view step against pytorch-metric-learning's memory with its default distance, which
    normalises the memory rows into a new tensor at every call (with ``LpDistance(normalize_embeddings=False)``
    PML 2.9 raises the in-place error too): the same loss and gradients, with the memory wrapping.
    Ours gets the views normalised, so that both losses see unit rows and differentiate through
    the normalisation."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    dim, memory_size = 5, 20
    ours = CrossBatchMemory(TripletMarginLoss(margin=0.2, reduction="mean_nonzero", backend="torch"), dim, memory_size)
    theirs = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.2), dim, memory_size=memory_size,
                                         miner=BatchHardMiner())
    for step in range(4):
        (v1, labels), (v2, _) = _batches(g, 2, 7, dim, 3)
        v1, v2, labels = (torch.nn.functional.normalize(v1.cpu(), dim=1), torch.nn.functional.normalize(v2.cpu(), dim=1),
                          labels.cpu())
        a1, a2, b1, b2 = (v.clone().requires_grad_() for v in (v1, v2, v1, v2))
        unit = torch.nn.functional.normalize
        loss_ours = ours(unit(a1, dim=1), labels) + ours(unit(a2, dim=1), labels)
        loss_theirs = theirs(b1, labels) + theirs(b2, labels)
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(loss_ours, loss_theirs.to(loss_ours.dtype), msg=f"step {step}")
        torch.testing.assert_close(a1.grad, b1.grad, msg=f"step {step}")
        torch.testing.assert_close(a2.grad, b2.grad, msg=f"step {step}")
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory.to(ours.embedding_memory.dtype))


def test_a_memory_awaiting_a_backward_still_pickles():
    """The awaited graph is a weak reference, which pickle refuses: a copy starts with none."""
    import io
    import pickle

    xbm = _two_view_memory("batch_hard")
    emb = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss = xbm(emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    copied = pickle.loads(pickle.dumps(xbm))
    buffer = io.BytesIO()
    torch.save(xbm, buffer)
    assert torch.equal(copied.embedding_memory, xbm.embedding_memory) and copied._awaited is None
    before = copied.embedding_memory
    copied(emb.detach().clone().requires_grad_(), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert copied.embedding_memory is before
    loss.backward()


def test_an_evaluation_pass_while_a_loss_awaits_its_backward_leaves_the_memory_trainable():
    """A loss left without a backward (a skipped non-finite step), then an evaluation pass under
    inference_mode: that call copies the memory, and a copy made in inference mode was an inference
    tensor, so every later training step failed ("Inplace update to inference tensor")."""
    xbm = _two_view_memory("batch_hard")
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    skipped = xbm(torch.randn(6, 4, requires_grad=True), labels)
    with torch.inference_mode():
        xbm(torch.randn(6, 4), labels)
    assert not xbm.embedding_memory.is_inference() and not xbm.label_memory.is_inference()
    xbm(torch.randn(6, 4, requires_grad=True), labels).backward()
    skipped.backward()
    assert xbm.size == 18
