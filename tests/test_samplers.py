"""EpisodicSampler, split_episode and PKSampler."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchfg.data import EpisodicSampler, PKSampler, split_episode


def uneven_labels(seed: int = 0) -> torch.Tensor:
    """23 classes with 2 ... 30 items, arbitrary ids, shuffled."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 31, (23,), generator=g)
    ids = torch.randperm(500, generator=g)[:23] - 100
    labels = ids.repeat_interleave(sizes)
    return labels[torch.randperm(labels.numel(), generator=g)]


# --------------------------------------------------------------------------- EpisodicSampler


def test_episodes_have_distinct_classes_and_items_in_layout() -> None:
    labels = uneven_labels()
    n_way, n_shot, n_query = 5, 3, 4
    with pytest.warns(UserWarning, match="skipping"):
        sampler = EpisodicSampler(labels, n_way, n_shot, n_query, n_episodes=50, seed=1)
    sizes = Counter(labels.tolist())
    eligible = {c for c, n in sizes.items() if n >= n_shot + n_query}
    assert set(sampler.classes.tolist()) == eligible
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 50
    for index in episodes:
        assert len(index) == n_way * (n_shot + n_query)
        assert len(set(index)) == len(index)  # n_shot + n_query distinct items per class, no overlap
        episode_labels = labels[index]
        support = episode_labels[: n_way * n_shot].view(n_way, n_shot)
        query = episode_labels[n_way * n_shot :].view(n_way, n_query)
        way = support[:, 0]
        assert (support == way[:, None]).all() and (query == way[:, None]).all()
        assert len(set(way.tolist())) == n_way
        assert set(way.tolist()) <= eligible
    # All eligible classes get used over 50 episodes.
    used = {int(labels[i]) for index in episodes for i in index}
    assert used == eligible


def test_episodic_sampler_is_seeded_and_changes_per_epoch() -> None:
    labels = torch.arange(12).repeat_interleave(9)
    a = EpisodicSampler(labels, 4, 2, 3, 20, seed=7)
    b = EpisodicSampler(labels.numpy(), 4, 2, 3, 20, seed=7)
    first = list(a)
    assert first == list(b)
    second = list(a)  # the internal counter moved to epoch 1
    assert second != first
    a.set_epoch(0)
    assert list(a) == first
    a.set_epoch(1)
    assert list(a) == second
    assert list(EpisodicSampler(labels, 4, 2, 3, 20, seed=8)) != first
    torch.manual_seed(123)
    unseeded = list(EpisodicSampler(labels, 4, 2, 3, 20))
    torch.manual_seed(123)
    assert list(EpisodicSampler(labels.tolist(), 4, 2, 3, 20)) == unseeded


def test_episodic_sampler_with_dataloader_and_split_episode() -> None:
    labels = torch.arange(10).repeat_interleave(7) * 11
    features = torch.randn(labels.numel(), 6)
    sampler = EpisodicSampler(labels, 3, 2, 4, n_episodes=6, seed=0)
    loader = DataLoader(TensorDataset(features, labels), batch_sampler=sampler)
    assert len(loader) == 6
    for (x, y), index in zip(loader, EpisodicSampler(labels, 3, 2, 4, n_episodes=6, seed=0)):
        support, support_labels, query, query_labels = split_episode(x, y, 3, 2, 4)
        assert support.shape == (6, 6) and query.shape == (12, 6)
        assert torch.equal(support, features[index[:6]]) and torch.equal(query, features[index[6:]])
        assert torch.equal(support_labels, labels[index[:6]]) and torch.equal(query_labels, labels[index[6:]])


def test_split_episode_rejects_wrong_layout_and_sizes() -> None:
    labels = torch.tensor([4, 4, 9, 9, 4, 9])  # 2-way 2-shot 1-query
    x = torch.randn(6, 3)
    split_episode(x, labels, 2, 2, 1)
    with pytest.raises(ValueError, match="layout"):
        split_episode(x, labels[[0, 2, 1, 3, 4, 5]], 2, 2, 1)
    with pytest.raises(ValueError, match="layout"):
        split_episode(x, labels[[0, 1, 2, 3, 5, 4]], 2, 2, 1)
    with pytest.raises(ValueError, match="layout"):
        split_episode(x, torch.tensor([4, 4, 4, 4, 4, 4]), 2, 2, 1)
    with pytest.raises(ValueError, match="embeddings.*6 rows"):
        split_episode(x[:5], labels, 2, 2, 1)
    with pytest.raises(ValueError, match="labels.*6 entries"):
        split_episode(x, labels[:5], 2, 2, 1)
    with pytest.raises(TypeError, match="labels.*integer"):
        split_episode(x, labels.float(), 2, 2, 1)


def test_episodic_sampler_keeps_classes_with_exactly_n_shot_plus_n_query_items() -> None:
    """A class with exactly ``n_shot + n_query`` items is eligible (the bound is ``>=``, not ``>``).

    Every class has 4 = 1 + 3 items, so none may be skipped: no warning, no error, and each
    5-way episode must hold all 4 items of every class.
    """
    labels = torch.arange(5).repeat_interleave(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = EpisodicSampler(labels, n_way=5, n_shot=1, n_query=3, n_episodes=2, seed=0)
    assert sampler.classes.tolist() == [0, 1, 2, 3, 4]
    episodes = list(sampler)
    assert len(episodes) == 2
    for index in episodes:
        assert sorted(index) == list(range(20))  # all 4 items of each of the 5 classes
        split_episode(torch.zeros(20, 1), labels[index], 5, 1, 3)  # and in the class-major layout


def test_episodic_sampler_sharded_ranks_split_one_stream_of_episodes() -> None:
    labels = torch.arange(12).repeat_interleave(6)[torch.randperm(72, generator=torch.Generator().manual_seed(6))]
    one = EpisodicSampler(labels, 4, 2, 3, n_episodes=6, seed=11, num_replicas=1, rank=0)
    assert list(one) == list(EpisodicSampler(labels, 4, 2, 3, n_episodes=6, seed=11))
    ranks = [EpisodicSampler(labels, 4, 2, 3, n_episodes=5, seed=11, num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 1):
        stream = EpisodicSampler(labels, 4, 2, 3, n_episodes=15, seed=11)
        for sampler in [stream, *ranks]:
            sampler.set_epoch(epoch)
        got = [list(sampler) for sampler in ranks]
        assert all(len(episodes) == 5 for episodes in got)
        # Rank r holds episodes r, r + 3, ... of the one stream: no episode twice, none missing.
        assert [episode for step in zip(*got) for episode in step] == list(stream)
    with pytest.raises(ValueError, match="seed must be given"):
        EpisodicSampler(labels, 4, 2, 3, n_episodes=5, num_replicas=2, rank=1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\)"):
        EpisodicSampler(labels, 4, 2, 3, n_episodes=5, seed=0, num_replicas=2, rank=2)


def test_episodic_sampler_bad_input() -> None:
    labels = torch.arange(6).repeat_interleave(4)
    with pytest.raises(ValueError, match="n_way=7"):
        EpisodicSampler(labels, 7, 1, 1, 10)
    with pytest.warns(UserWarning, match="skipping 6 of 6"), pytest.raises(ValueError, match="only 0 classes"):
        EpisodicSampler(labels, 2, 2, 3, 10)
    with pytest.raises(TypeError, match="labels.*integer"):
        EpisodicSampler(labels.float(), 2, 1, 1, 10)
    with pytest.raises(ValueError, match="labels.*1-D"):
        EpisodicSampler(labels.view(4, 6), 2, 1, 1, 10)
    with pytest.raises(TypeError, match="labels"):
        EpisodicSampler("abc", 2, 1, 1, 10)
    with pytest.raises(ValueError, match="n_shot"):
        EpisodicSampler(labels, 2, 0, 1, 10)
    with pytest.raises(TypeError, match="n_way"):
        EpisodicSampler(labels, 2.0, 1, 1, 10)
    with pytest.raises(TypeError, match="seed"):
        EpisodicSampler(labels, 2, 1, 1, 10, seed="x")


# --------------------------------------------------------------------------- PKSampler


def test_pk_batches_have_p_classes_times_k_items() -> None:
    labels = uneven_labels(1)
    p, k = 6, 4
    sampler = PKSampler(labels, p, k, seed=3)
    assert len(sampler) == labels.numel() // (p * k)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    sizes = Counter(labels.tolist())
    for batch in batches:
        assert len(batch) == p * k
        assert all(0 <= i < labels.numel() for i in batch)
        batch_labels = labels[batch].view(p, k)
        assert (batch_labels == batch_labels[:, :1]).all()  # class-major
        assert len(set(batch_labels[:, 0].tolist())) == p
        for row, indices in zip(batch_labels[:, 0].tolist(), np.array(batch).reshape(p, k)):
            if sizes[row] >= k:
                assert len(set(indices.tolist())) == k
            else:  # every item of a small class, then some again
                assert set(indices.tolist()) == set(torch.nonzero(labels == row).flatten().tolist())


def test_pk_sampler_balances_classes_and_items() -> None:
    labels = torch.arange(30).repeat_interleave(torch.arange(30) % 7 + 4)  # 4 ... 10 items per class
    sampler = PKSampler(labels, 5, 3, seed=0, num_batches=97)
    assert len(sampler) == 97
    batches = list(sampler)
    class_counts = Counter(int(labels[b[j]]) for b in batches for j in range(0, 15, 3))
    assert len(class_counts) == 30
    assert max(class_counts.values()) - min(class_counts.values()) <= 1
    # Items of one class are used evenly too (streams of permutations, not independent draws).
    for c in range(30):
        item_counts = Counter(i for b in batches for i in b if int(labels[i]) == c)
        members = torch.nonzero(labels == c).flatten().tolist()
        counts = [item_counts.get(i, 0) for i in members]
        assert max(counts) - min(counts) <= 1


def test_pk_sampler_small_classes_with_replacement() -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    for batch in PKSampler(labels, 4, 5, seed=1, num_batches=3):
        batch_labels = labels[batch].view(4, 5)
        assert sorted(batch_labels[:, 0].tolist()) == [0, 1, 2, 3]
        assert (batch_labels == batch_labels[:, :1]).all()


def test_pk_sampler_seeded_epochs_and_dataloader() -> None:
    labels = uneven_labels(2)
    a, b = PKSampler(labels, 4, 3, seed=5), PKSampler(labels.tolist(), 4, 3, seed=5)
    first = list(a)
    assert first == list(b)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    features = torch.randn(labels.numel(), 2)
    loader = DataLoader(TensorDataset(features, labels), batch_sampler=PKSampler(labels, 4, 3, seed=5))
    assert len(loader) == len(a)
    for (x, y), batch in zip(loader, first):
        assert torch.equal(y, labels[batch]) and x.shape == (12, 2)


def test_pk_sampler_bad_input() -> None:
    labels = torch.arange(4).repeat_interleave(3)
    with pytest.raises(ValueError, match="p=5.*4 classes"):
        PKSampler(labels, 5, 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        PKSampler(labels, 2, 0)
    with pytest.raises(TypeError, match="p must be an int"):
        PKSampler(labels, 2.5, 2)
    with pytest.raises(TypeError, match="labels.*integer"):
        PKSampler(labels.double(), 2, 2)
    # Class names: torch's own message named no argument.
    with pytest.raises(TypeError, match=r"labels must be 1-D integer labels, got an array of <U1.*return_inverse"):
        PKSampler(["a", "b", "a", "b"], 2, 2)
    with pytest.raises(ValueError, match="labels must not be empty"):
        PKSampler(torch.empty(0, dtype=torch.long), 1, 2)
    with pytest.raises(ValueError, match="num_batches"):
        PKSampler(labels, 2, 2, num_batches=0)
    with pytest.raises(ValueError, match="epoch"):
        PKSampler(labels, 2, 2).set_epoch(-1)


@pytest.mark.parametrize("replicas", [2, 3])
def test_pk_sampler_sharded_ranks_draw_disjoint_classes_of_one_global_batch(replicas: int) -> None:
    labels = uneven_labels(4)
    p, k = 3, 4
    ranks = [PKSampler(labels, p, k, seed=7, num_replicas=replicas, rank=r) for r in range(replicas)]
    assert len({len(s) for s in ranks}) == 1
    assert len(ranks[0]) == max(1, labels.numel() // (p * k * replicas))
    # Epochs move together on every rank (as DistributedSampler's set_epoch).
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        steps = list(zip(*(list(s) for s in ranks)))
        assert len(steps) == len(ranks[0])
        for step in steps:
            step_classes = []
            for batch in step:
                assert len(batch) == p * k
                batch_labels = labels[batch].view(p, k)
                assert (batch_labels == batch_labels[:, :1]).all()
                step_classes += batch_labels[:, 0].tolist()
            # One P x K batch of p * replicas distinct classes, split by rank.
            assert len(set(step_classes)) == p * replicas
        if epoch == 0:
            first_epoch = steps
    assert steps != first_epoch


def test_pk_sampler_sharding_balances_classes_over_all_ranks() -> None:
    labels = torch.arange(30).repeat_interleave(torch.arange(30) % 7 + 4)
    ranks = [PKSampler(labels, 4, 3, seed=2, num_batches=40, num_replicas=3, rank=r) for r in range(3)]
    counts = Counter(int(labels[b[j]]) for s in ranks for b in s for j in range(0, 12, 3))
    assert len(counts) == 30 and max(counts.values()) - min(counts.values()) <= 1


def test_pk_sampler_one_replica_is_the_unsharded_sampler() -> None:
    labels = uneven_labels(5)
    assert list(PKSampler(labels, 4, 3, seed=9, num_replicas=1, rank=0)) == list(PKSampler(labels, 4, 3, seed=9))


def test_pk_sampler_sharding_bad_input() -> None:
    labels = torch.arange(10).repeat_interleave(3)
    with pytest.raises(ValueError, match="seed must be given"):
        PKSampler(labels, 2, 2, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\)"):
        PKSampler(labels, 2, 2, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        PKSampler(labels, 2, 2, seed=0, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        PKSampler(labels, 2, 2, seed=0, num_replicas=0)
    with pytest.raises(ValueError, match=r"p \* num_replicas = 12 .*10 classes"):
        PKSampler(labels, 4, 2, seed=0, num_replicas=3, rank=1)


def test_empty_label_list_reaches_the_empty_check() -> None:
    # np.asarray([]) is float64: the error used to be "labels must be an integer tensor".
    for empty in ([], (), range(0)):
        with pytest.raises(ValueError, match="labels must not be empty"):
            PKSampler(empty, 1, 1)
    with pytest.raises(ValueError, match="only 0 classes"):
        EpisodicSampler([], 1, 1, 1, 1)


def test_seeds_do_not_alias() -> None:
    # The seed was masked to 63 bits: -1 gave the batches of 2**63 - 1, and 2**63 those of 0.
    labels = torch.arange(6).repeat_interleave(4)
    samplers = (
        lambda seed: PKSampler(labels, 2, 2, seed=seed),
        lambda seed: EpisodicSampler(labels, 2, 1, 1, 4, seed=seed),
    )
    for make in samplers:
        with pytest.raises(ValueError, match="seed must be >= 0"):
            make(-1)
        with pytest.raises(ValueError, match="seed must be >= 0"):
            make(np.int64(-5))
        assert list(make(2**63)) != list(make(0))
        assert list(make(2**63 - 1)) != list(make(2**64 - 1))
        assert list(make(np.uint64(2**63))) == list(make(2**63))
    with pytest.raises(TypeError, match="seed"):
        PKSampler(labels, 2, 2, seed=1.0)
