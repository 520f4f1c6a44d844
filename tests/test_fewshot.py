"""Prototypical logits / head, few-shot accuracy with CI, and the evaluate protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, backends_to_test
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import Dataset

from torchfg.data import EpisodicSampler, split_episode
from torchfg.fewshot import embed_dataset, evaluate
from torchfg.functional import class_prototypes, prototype_logits, prototypical_logits
from torchfg.heads import PrototypicalHead
from torchfg.metrics import few_shot_accuracy


def make_episode(
    n_classes: int, n_query: int, dim: int, *, seed: int, dtype: torch.dtype = torch.float32, uneven: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support with arbitrary (non-contiguous, negative, unsorted) labels and uneven shot counts."""
    g = torch.Generator().manual_seed(seed)
    class_ids = torch.randperm(1000, generator=g)[:n_classes] - 300
    shots = torch.randint(1, 5, (n_classes,), generator=g) if uneven else torch.full((n_classes,), 3)
    labels = class_ids.repeat_interleave(shots)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    support = torch.randn(labels.numel(), dim, generator=g, dtype=dtype)
    query = torch.randn(n_query, dim, generator=g, dtype=dtype)
    return support, labels, query


def loop_prototypes(support: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    classes = sorted(set(labels.tolist()))
    rows = [support[labels == c].mean(dim=0) for c in classes]
    return torch.stack(rows), classes


def loop_distance(a: torch.Tensor, b: torch.Tensor, metric: str) -> float:
    if metric == "sqeuclidean":
        return float(((a - b) ** 2).sum())
    if metric == "euclidean":
        return float(((a - b) ** 2).sum().sqrt())
    if metric == "cosine":
        return float(1 - (a @ b) / (a.norm() * b.norm()))
    if metric == "dot":
        return float(-(a @ b))
    raise AssertionError(metric)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("backend", backends_to_test())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_equal_negative_squared_cdist(backend: str, dtype: torch.dtype) -> None:
    # On the test device: on a GPU machine the triton backend takes CUDA tensors only.
    support, labels, query = (t.to(TEST_DEVICE) for t in make_episode(7, 13, 37, seed=1, dtype=dtype))
    logits = torch.full((13, 7), float("nan"), dtype=dtype, device=TEST_DEVICE)  # poison: every entry written
    logits.copy_(prototypical_logits(support, labels, query, backend=backend))
    prototypes, classes = loop_prototypes(support, labels)
    expected = -torch.cdist(query, prototypes) ** 2
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(logits, expected, rtol=tol, atol=tol)
    got_prototypes, got_classes = class_prototypes(support, labels)
    assert got_classes.tolist() == classes
    torch.testing.assert_close(got_prototypes, prototypes, rtol=tol, atol=tol)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine", "dot"])
@pytest.mark.parametrize("normalize", [False, True])
def test_logits_match_explicit_loop(metric: str, normalize: bool) -> None:
    support, labels, query = make_episode(5, 9, 11, seed=2, dtype=torch.float64)
    temperature = 0.37
    logits = prototypical_logits(
        support, labels, query, metric=metric, temperature=temperature, normalize=normalize
    )
    if normalize:
        support = support / support.norm(dim=1, keepdim=True)
        query = query / query.norm(dim=1, keepdim=True)
    classes = sorted(set(labels.tolist()))
    expected = torch.empty(9, 5, dtype=torch.float64)
    for i in range(9):
        for j, c in enumerate(classes):
            members = [support[s] for s in range(labels.numel()) if labels[s] == c]
            prototype = sum(members) / len(members)
            expected[i, j] = -loop_distance(query[i], prototype, metric) / temperature
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


@given(
    n_classes=st.integers(1, 9),
    n_query=st.integers(0, 12),
    dim=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_logits_random_sizes(n_classes: int, n_query: int, dim: int, seed: int) -> None:
    support, labels, query = make_episode(n_classes, n_query, dim, seed=seed, dtype=torch.float64)
    logits = prototypical_logits(support, labels, query)
    prototypes, _ = loop_prototypes(support, labels)
    assert logits.shape == (n_query, n_classes)
    torch.testing.assert_close(logits, -torch.cdist(query, prototypes) ** 2, rtol=1e-9, atol=1e-9)


def test_one_shot_prototypes_are_the_support() -> None:
    g = torch.Generator().manual_seed(3)
    support = torch.randn(5, 19, generator=g)
    labels = torch.tensor([40, -2, 7, 13, 0])
    query = torch.randn(8, 19, generator=g)
    prototypes, classes = class_prototypes(support, labels)
    order = torch.argsort(labels)
    assert torch.equal(classes, labels[order])
    assert torch.equal(prototypes, support[order])
    torch.testing.assert_close(
        prototypical_logits(support, labels, query), -torch.cdist(query, support[order]) ** 2, rtol=1e-4, atol=1e-4
    )


def test_invariant_to_support_order_and_relabelling() -> None:
    support, labels, query = make_episode(6, 21, 17, seed=4, dtype=torch.float64)
    head = PrototypicalHead()
    reference_logits = head(support, labels, query)
    reference_pred = head.predict(query)

    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(head(support[perm], labels[perm], query), reference_logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(head.predict(support[perm], labels[perm], query), reference_pred)

    # An arbitrary (non-monotone) relabelling: predictions follow the mapping.
    classes = sorted(set(labels.tolist()))
    new_ids = torch.randperm(100, generator=torch.Generator().manual_seed(6))[: len(classes)] * 7 - 50
    mapping = dict(zip(classes, new_ids.tolist()))
    relabelled = torch.tensor([mapping[v] for v in labels.tolist()])
    pred = head.predict(support, relabelled, query)
    assert pred.tolist() == [mapping[v] for v in reference_pred.tolist()]
    assert head.classes.tolist() == sorted(mapping.values())


def test_duplicate_queries_get_identical_rows() -> None:
    support, labels, query = make_episode(5, 6, 23, seed=7)
    query = torch.cat([query, query[2:3], query[2:3], query[0:1]])
    logits = prototypical_logits(support, labels, query, metric="euclidean")
    assert torch.equal(logits[6], logits[2]) and torch.equal(logits[7], logits[2])
    assert torch.equal(logits[8], logits[0])


def test_gradients_flow_to_support_and_query() -> None:
    support, labels, query = make_episode(4, 5, 6, seed=8, dtype=torch.float64)
    support.requires_grad_(True)
    query.requires_grad_(True)
    for metric in ("sqeuclidean", "euclidean", "cosine", "dot"):
        torch.autograd.gradcheck(
            lambda s, q: prototypical_logits(s, labels, q, metric=metric, temperature=0.5, normalize=True),
            (support, query),
        )
    targets = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(9))
    loss = torch.nn.functional.cross_entropy(PrototypicalHead()(support, labels, query), targets)
    loss.backward()
    assert support.grad is not None and support.grad.abs().sum() > 0
    assert query.grad is not None and query.grad.abs().sum() > 0


def test_half_precision_runs_close_to_fp32() -> None:
    support, labels, query = make_episode(5, 7, 16, seed=10)
    for dtype in (torch.float16, torch.bfloat16):
        logits = prototypical_logits(support.to(dtype), labels, query.to(dtype), metric="cosine")
        assert logits.dtype == torch.float32  # the accumulation dtype, as the losses return
        expected = prototypical_logits(support.to(dtype).float(), labels, query.to(dtype).float(), metric="cosine")
        # The prototypes are rounded to the 16-bit dtype (the class means, as the head keeps them).
        torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)


def test_empty_query_gives_empty_logits() -> None:
    support, labels, _ = make_episode(3, 1, 8, seed=11)
    logits = prototypical_logits(support, labels, torch.empty(0, 8))
    assert logits.shape == (0, 3)
    head = PrototypicalHead().fit(support, labels)
    assert head.predict(torch.empty(0, 8)).shape == (0,)


# --------------------------------------------------------------------------- head


def test_head_fit_then_forward_matches_episode_call() -> None:
    support, labels, query = make_episode(5, 12, 20, seed=12)
    head = PrototypicalHead("cosine", temperature=0.1, normalize=True)
    episode_logits = head(support, labels, query)
    fitted = PrototypicalHead("cosine", temperature=0.1, normalize=True).fit(support, labels)
    assert fitted.n_way == 5
    assert torch.equal(fitted.classes, torch.unique(labels))
    torch.testing.assert_close(fitted(query), episode_logits)
    torch.testing.assert_close(fitted(query[:3]), episode_logits[:3])
    assert torch.equal(fitted.predict(query), fitted.classes[episode_logits.argmax(1)])
    assert "prototypes" not in fitted.state_dict() and "classes" not in fitted.state_dict()


def test_head_fit_stores_detached_prototypes_but_query_gets_gradient() -> None:
    support, labels, query = make_episode(3, 4, 5, seed=13)
    support.requires_grad_(True)
    query.requires_grad_(True)
    head = PrototypicalHead().fit(support, labels)
    assert not head.prototypes.requires_grad
    head(query).sum().backward()
    assert query.grad is not None and support.grad is None


def test_head_classes_before_fit_raise_naming_fit_and_stay_buffers() -> None:
    """head.classes / head.prototypes were None before fit, so the documented
    torch.searchsorted(head.classes, labels) failed (a user's type checker refused it, and at run
    time it raised far from the cause). They are Tensor properties now, raising an error that
    names fit before it, over the same non-persistent buffers."""
    import copy
    import pickle

    from torch.func import functional_call

    from torchfg.errors import NotFittedError

    support, labels, query = make_episode(4, 5, 8, seed=15)
    head = PrototypicalHead()
    for name in ("classes", "prototypes"):
        with pytest.raises(NotFittedError, match=rf"PrototypicalHead\.{name} .*head\.fit\(support, support_labels\)"):
            getattr(head, name)
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    # Also an AttributeError: hasattr / getattr with a default tell whether the head is fitted.
    assert not hasattr(head, "classes") and getattr(head, "prototypes", None) is None and head.n_way == 0
    assert "n_way=0" in repr(head)
    with pytest.raises(AttributeError, match="has no attribute 'other'"):
        head.other  # noqa: B018 (nn.Module's own error for any other name)
    for unfitted in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert unfitted.n_way == 0 and not hasattr(unfitted, "classes")
    # An unfitted head still takes its state as buffers: functional_call, load_state_dict, setattr.
    prototypes, classes = class_prototypes(support, labels)
    logits = functional_call(head, {"prototypes": prototypes, "classes": classes}, (query,))
    torch.testing.assert_close(logits, prototype_logits(query, prototypes))
    assert head.n_way == 0
    head.load_state_dict(PrototypicalHead().fit(support, labels).state_dict())
    assert head.n_way == 0 and head.state_dict() == {}

    assert head.fit(support, labels) is head
    assert torch.equal(head.classes, torch.unique(labels)) and head.prototypes.shape == (4, 8)
    assert dict(head.named_buffers()).keys() == {"prototypes", "classes"} and head.state_dict() == {}
    assert torch.equal(head.to(torch.float64).prototypes, prototypes.double())
    for fitted in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert torch.equal(fitted.classes, head.classes) and torch.equal(fitted.prototypes, head.prototypes)
    predictions = head.predict(query.double())
    head.classes = head.classes + 1000  # assigned into the buffer, as before
    assert head._buffers["classes"] is head.classes
    assert torch.equal(head.predict(query.double()), predictions + 1000)


# --------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_the_argument() -> None:
    support, labels, query = make_episode(4, 5, 8, seed=14)
    with pytest.raises(ValueError, match="query.*D=7.*support D=8"):
        prototypical_logits(support, labels, query[:, :7])
    with pytest.raises(ValueError, match="support.*empty"):
        prototypical_logits(torch.empty(0, 8), torch.empty(0, dtype=torch.long), query)
    with pytest.raises(ValueError, match="prototypes.*0 classes"):
        prototype_logits(query, torch.empty(0, 8))
    with pytest.raises(ValueError, match="0 classes.*fit"):
        PrototypicalHead()(query)
    with pytest.raises(ValueError, match="query is missing"):
        PrototypicalHead()(support, labels)
    with pytest.raises(TypeError, match="support_labels.*integer"):
        prototypical_logits(support, labels.float(), query)
    with pytest.raises(ValueError, match="support_labels.*1-D"):
        prototypical_logits(support, labels.view(-1, 1), query)
    with pytest.raises(ValueError, match="support_labels.*length"):
        prototypical_logits(support, labels[:-1], query)
    with pytest.raises(TypeError, match="support_labels.*torch.Tensor"):
        prototypical_logits(support, labels.tolist(), query)
    with pytest.raises(ValueError, match="support.*2 dims"):
        prototypical_logits(support[0], labels[:1], query)
    with pytest.raises(ValueError, match="query.*2 dims"):
        prototypical_logits(support, labels, query[0])
    with pytest.raises(TypeError, match="query.*support.*dtype"):
        prototypical_logits(support, labels, query.double())
    with pytest.raises(ValueError, match="metric"):
        prototypical_logits(support, labels, query, metric="manhattan")
    with pytest.raises(ValueError, match="temperature"):
        PrototypicalHead(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        prototypical_logits(support, labels, query, temperature=-1.0)


def test_non_bool_normalize_is_refused() -> None:
    # A string such as "false" is truthy: it used to normalise silently.
    support, labels, query = make_episode(3, 4, 8, seed=16)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        PrototypicalHead(normalize="false")
    with pytest.raises(TypeError, match="normalize must be a bool"):
        class_prototypes(support, labels, normalize="false")
    prototypes, _ = class_prototypes(support, labels)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        prototype_logits(query, prototypes, normalize=1)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        prototypical_logits(support, labels, query, normalize="no")


def test_temperature_whose_reciprocal_overflows_is_refused() -> None:
    # Logits divided by 1e-320 are -inf, and the softmax over them NaN.
    support, labels, query = make_episode(3, 4, 8, seed=17)
    with pytest.raises(ValueError, match="temperature"):
        PrototypicalHead(temperature=1e-320)
    with pytest.raises(ValueError, match="temperature"):
        prototypical_logits(support, labels, query, temperature=1e-40)


def test_evaluate_refuses_a_non_bool_normalize() -> None:
    embeddings, labels = clustered_embeddings(6, 20, 8, noise=1.0, seed=22)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        evaluate(None, (embeddings, labels), normalize="false", progress=False)


def test_head_refuses_an_unknown_backend_at_construction() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        PrototypicalHead(backend="gpu")
    assert PrototypicalHead(backend="torch").backend == "torch"


# --------------------------------------------------------------------------- accuracy + CI


def test_few_shot_accuracy_forms_agree_with_formula() -> None:
    g = torch.Generator().manual_seed(15)
    n_query, n_way, n_episodes = 11, 5, 37
    episodes = []
    for _ in range(n_episodes):
        logits = torch.randn(n_query, n_way, generator=g)
        labels = torch.randint(0, n_way, (n_query,), generator=g)
        episodes.append((logits, labels))
    correct = torch.tensor([int((lg.argmax(1) == lb).sum()) for lg, lb in episodes])
    accuracies = correct.double() / n_query

    for ddof in (0, 1):
        expected_mean = float(accuracies.mean())
        expected_ci = 1.96 * float(np.std(accuracies.numpy(), ddof=ddof)) / math.sqrt(n_episodes)
        for result in (
            few_shot_accuracy(episodes, ddof=ddof),
            few_shot_accuracy(accuracies, ddof=ddof),
            few_shot_accuracy(accuracies.tolist(), ddof=ddof),
            few_shot_accuracy(correct, n_per_episode=n_query, ddof=ddof),
            few_shot_accuracy(correct.numpy(), n_per_episode=[n_query] * n_episodes, ddof=ddof),
        ):
            assert result[0] == pytest.approx(expected_mean, rel=1e-12)
            assert result[1] == pytest.approx(expected_ci, rel=1e-12)
    assert few_shot_accuracy(torch.tensor([0.5, 0.75, 1.0, 0.75])) == pytest.approx((0.75, 1.96 * 0.125 / 2 * math.sqrt(8 / 3)))


def test_few_shot_accuracy_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 episodes"):
        few_shot_accuracy([0.5])
    with pytest.raises(ValueError, match="at least 2 episodes"):
        few_shot_accuracy([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        few_shot_accuracy([55.0, 60.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        few_shot_accuracy([0.5, float("nan")])
    with pytest.raises(ValueError, match="n_per_episode is required"):
        few_shot_accuracy([3, 4])
    with pytest.raises(ValueError, match="correct counts"):
        few_shot_accuracy([3, 16], n_per_episode=15)
    with pytest.raises(ValueError, match="n_per_episode"):
        few_shot_accuracy([0.3, 0.4], n_per_episode=15)
    with pytest.raises(ValueError, match="results.*1-D"):
        few_shot_accuracy(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"results\[1\].*labels"):
        few_shot_accuracy([(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])), (torch.randn(4, 3), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match=r"results\[0\].*column"):
        few_shot_accuracy([(torch.randn(2, 3), torch.tensor([0, 3])), (torch.randn(2, 3), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="ddof"):
        few_shot_accuracy([0.3, 0.4], ddof=2)
    with pytest.raises(TypeError, match="results"):
        few_shot_accuracy("0.5")


# --------------------------------------------------------------------------- evaluate


def clustered_embeddings(n_classes: int, per_class: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n_classes) * 3 + 5).repeat_interleave(per_class)  # non-contiguous labels
    centres = torch.randn(n_classes, dim, generator=g)
    embeddings = centres.repeat_interleave(per_class, 0) + noise * torch.randn(n_classes * per_class, dim, generator=g)
    order = torch.randperm(labels.numel(), generator=g)
    return embeddings[order], labels[order]


def manual_protocol(
    embeddings: torch.Tensor, labels: torch.Tensor, n_way: int, n_shot: int, n_query: int, n_episodes: int,
    seed: int, metric: str, normalize: bool,
) -> tuple[float, float]:
    """The protocol written out episode by episode with the public building blocks."""
    results = []
    for index in EpisodicSampler(labels, n_way, n_shot, n_query, n_episodes, seed=seed):
        support, support_labels, query, query_labels = split_episode(
            embeddings[index], labels[index], n_way, n_shot, n_query
        )
        head = PrototypicalHead(metric, normalize=normalize)
        logits = head(support, support_labels, query)
        results.append((logits, torch.searchsorted(head.classes, query_labels)))
    return few_shot_accuracy(results)


@pytest.mark.parametrize("metric,normalize", [("sqeuclidean", False), ("cosine", True), ("euclidean", True)])
def test_evaluate_matches_episode_by_episode_protocol(metric: str, normalize: bool) -> None:
    embeddings, labels = clustered_embeddings(12, 23, 16, noise=1.6, seed=16)
    results = evaluate(
        None, (embeddings, labels), n_way=5, n_shot=(1, 3), n_query=7, n_episodes=40,
        seed=3, progress=False, metric=metric, normalize=normalize,
    )
    assert set(results) == {1, 3}
    for shot in (1, 3):
        expected = manual_protocol(embeddings, labels, 5, shot, 7, 40, 3, metric, normalize)
        assert results[shot][0] == pytest.approx(expected[0], abs=1e-12)
        assert results[shot][1] == pytest.approx(expected[1], abs=1e-12)
        assert 0.2 < results[shot][0] < 1.0 and results[shot][1] > 0  # a non-trivial task
    assert results[3][0] > results[1][0]


def test_evaluate_passes_ddof_to_the_confidence_interval() -> None:
    """``ddof`` picks the std of the CI (population with 0, sample with 1): the same episodes give
    the same mean, and CIs in the ratio sqrt((n - 1) / n) of the two standard deviations."""
    embeddings, labels = clustered_embeddings(10, 15, 12, noise=1.6, seed=19)
    n_episodes = 40
    kwargs = dict(n_way=5, n_shot=(1, 2), n_query=6, n_episodes=n_episodes, seed=4, progress=False)
    population = evaluate(None, (embeddings, labels), ddof=0, **kwargs)
    sample = evaluate(None, (embeddings, labels), ddof=1, **kwargs)
    assert sample == evaluate(None, (embeddings, labels), **kwargs)  # ddof=1 is the default
    for shot in (1, 2):
        (mean0, ci0), (mean1, ci1) = population[shot], sample[shot]
        assert mean0 == mean1
        assert ci1 > 0  # a non-trivial task: the episodes differ
        assert ci0 / ci1 == pytest.approx(math.sqrt((n_episodes - 1) / n_episodes), rel=1e-12)


def test_evaluate_extremes() -> None:
    separable, labels = clustered_embeddings(8, 20, 12, noise=1e-3, seed=17)
    assert evaluate(None, (separable, labels), n_episodes=30, progress=False, n_shot=1) == {1: (1.0, 0.0)}
    g = torch.Generator().manual_seed(18)
    noise = torch.randn(8 * 20, 12, generator=g)
    chance = evaluate(None, (noise, labels), n_way=4, n_shot=1, n_query=10, n_episodes=300, progress=False)
    mean, ci95 = chance[1]
    assert abs(mean - 0.25) < 3 * ci95 + 0.01


class ImageDataset(Dataset):
    """Fake images (3, 4, 4) with int labels and an extra field, as torchvision-style datasets give."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.images[i], int(self.labels[i]), f"item{i}"


def test_evaluate_dataset_and_model(capsys: pytest.CaptureFixture) -> None:
    centres, labels = clustered_embeddings(9, 21, 48, noise=2.0, seed=20)
    images = centres.view(-1, 3, 4, 4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(48, 24))
    model.train()
    results = evaluate(model, ImageDataset(images, labels), n_shot=2, n_query=5, n_episodes=25, batch_size=17, progress=False)
    assert model.training  # restored
    with torch.no_grad():
        embeddings = model.eval()(images)  # eval: dropout off, as evaluate does
    expected = evaluate(None, (embeddings, labels), n_shot=2, n_query=5, n_episodes=25, progress=False)
    assert results[2] == pytest.approx(expected[2], abs=1e-9)
    # Tensors of raw inputs go through the model too.
    assert evaluate(model, (images, labels), n_shot=2, n_query=5, n_episodes=25, progress=False)[2] == pytest.approx(
        expected[2], abs=1e-9
    )
    captured = capsys.readouterr()
    assert "episode" not in captured.err and "embedding" not in captured.err
    evaluate(None, (embeddings, labels), n_shot=2, n_query=5, n_episodes=25, progress=True)
    assert "2-shot" in capsys.readouterr().err


def test_evaluate_bad_input() -> None:
    embeddings, labels = clustered_embeddings(6, 20, 8, noise=1.0, seed=21)
    with pytest.raises(TypeError, match="dataset_or_tensors"):
        evaluate(None, embeddings, progress=False)
    with pytest.raises(ValueError, match="dataset_or_tensors.*same length"):
        evaluate(None, (embeddings, labels[:-1]), progress=False)
    with pytest.raises(TypeError, match="labels.*integer"):
        evaluate(None, (embeddings, labels.float()), progress=False)
    with pytest.raises(ValueError, match="embed_fn's output.*shape"):
        evaluate(lambda x: x.sum(1), (embeddings, labels), progress=False)
    with pytest.raises(ValueError, match="inputs.*embed_fn=None"):
        evaluate(None, (embeddings.view(-1, 2, 4), labels), progress=False)
    with pytest.raises(TypeError, match="embed_fn must be callable"):
        evaluate("model", (embeddings, labels), progress=False)
    with pytest.raises(ValueError, match="n_episodes"):
        evaluate(None, (embeddings, labels), n_episodes=1, progress=False)
    with pytest.raises(ValueError, match="n_shot"):
        evaluate(None, (embeddings, labels), n_shot=(1, 1), progress=False)
    with pytest.raises(ValueError, match="n_way=7"):
        evaluate(None, (embeddings, labels), n_way=7, n_shot=1, n_query=5, progress=False)
    with pytest.warns(UserWarning, match="skipping 6 of 6"), pytest.raises(ValueError, match="n_way"):
        evaluate(None, (embeddings, labels), n_shot=5, n_query=16, progress=False)


@pytest.mark.parametrize("kwargs,error,name", [(dict(ddof=2), ValueError, "ddof"), (dict(backend="nope"), ValueError, "backend"),
                                               (dict(seed=-1), ValueError, "seed"), (dict(seed=1.5), TypeError, "seed")])
def test_evaluate_checks_its_settings_before_embedding_the_dataset(kwargs, error, name) -> None:
    # ddof was checked after every episode, backend and seed after the whole dataset was embedded.
    embeddings, labels = clustered_embeddings(6, 20, 8, noise=1.0, seed=21)
    calls = []

    def embed(x):
        calls.append(1)
        return x

    with pytest.raises(error, match=name):
        evaluate(embed, (embeddings, labels), n_way=2, n_shot=1, n_query=2, n_episodes=4, progress=False, **kwargs)
    assert not calls


def test_few_shot_accuracy_names_a_single_pair() -> None:
    # One (logits, labels) pair instead of a sequence of them read as two accuracies (a NumPy error).
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"one \(logits, labels\) pair"):
        few_shot_accuracy((logits, labels))
    assert few_shot_accuracy([(logits, labels), (logits, labels)])[1] == 0.0


def test_embedding_restores_every_submodule_mode() -> None:
    """A model in training mode with a frozen BatchNorm inside (fine-tuning): embedding puts the
    whole model in eval() and gives each submodule back its own mode, not model.train()'s."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.1))
    model.train()
    model[1].eval()
    before = {name: module.training for name, module in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append([m.training for m in module.modules()]))
    embed_dataset(model, (torch.randn(12, 6), torch.arange(12)), batch_size=5)
    assert seen and all(not any(flags) for flags in seen)  # every batch in eval mode
    assert {name: module.training for name, module in model.named_modules()} == before
    # An exception mid-way restores them too.
    model.register_forward_hook(lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        embed_dataset(model, (torch.randn(12, 6), torch.arange(12)))
    assert {name: module.training for name, module in model.named_modules()} == before


def test_overlapping_embeddings_share_the_mode_switch() -> None:
    """Two threads embedding one model (say two evaluation jobs): thread A starts, B starts, A
    ends while B is still embedding. Each call used to save the modes it found: B saved A's eval
    modes, A's exit put the model back in training mode under B's running batches, and B's exit
    left the model in eval mode for the training loop after it. The first call saves and the last
    restores now."""
    import threading

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model.train()
    before = {name: module.training for name, module in model.named_modules()}
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[bool]] = {"A": [], "B": []}

    def hook(module, args):
        name = threading.current_thread().name
        seen[name].append(any(m.training for m in module.modules()))
        if name == "A" and not a_inside.is_set():
            a_inside.set()
            assert b_inside.wait(10)
        if name == "B" and not b_inside.is_set():
            b_inside.set()
            assert a_done.wait(10)

    model.register_forward_pre_hook(hook)
    data = (torch.randn(9, 4), torch.arange(9))

    def run_a():
        embed_dataset(model, data, batch_size=3)
        a_done.set()

    def run_b():
        assert a_inside.wait(10)
        embed_dataset(model, data, batch_size=3)

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen["A"]) == len(seen["B"]) == 3
    assert not any(seen["A"]) and not any(seen["B"]), seen  # every batch in eval mode
    assert {name: module.training for name, module in model.named_modules()} == before


@pytest.mark.parametrize("first", ["model", "submodule"])
def test_overlapping_embeddings_of_a_model_and_its_submodule(first: str) -> None:
    """One thread embeds the model, another its backbone (a submodule), overlapping: the first
    starts, the second starts, the first ends while the second still runs. Keyed on the module
    they were called with, the two calls saved each other's flags: the backbone went back to
    training mode under the other call's batches, or was left in eval mode after both."""
    import threading

    backbone = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    model = torch.nn.Sequential(backbone, torch.nn.Dropout(0.5), torch.nn.Linear(4, 4))
    model.train()
    model[2].eval()  # a flag of the caller's own, outside the backbone
    before = {name: module.training for name, module in model.named_modules()}
    targets = {"model": model, "submodule": backbone}
    second = "submodule" if first == "model" else "model"
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[bool]] = {first: [], second: []}

    def hook(module, args):
        name = threading.current_thread().name
        if targets[name] is not module:  # the backbone's hook also runs inside the model's call
            return
        seen[name].append(any(m.training for m in module.modules()))
        if name == first and not first_inside.is_set():
            first_inside.set()
            assert second_inside.wait(10)
        if name == second and not second_inside.is_set():
            second_inside.set()
            assert first_done.wait(10)

    model.register_forward_pre_hook(hook)
    backbone.register_forward_pre_hook(hook)
    data = (torch.randn(9, 4), torch.arange(9))

    def run_first():
        embed_dataset(targets[first], data, batch_size=3)
        first_done.set()

    def run_second():
        assert first_inside.wait(10)
        embed_dataset(targets[second], data, batch_size=3)

    threads = [threading.Thread(target=run_first, name=first), threading.Thread(target=run_second, name=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(seen[first]) == len(seen[second]) == 3
    assert not any(seen[first]) and not any(seen[second]), seen  # every batch in eval mode
    assert {name: module.training for name, module in model.named_modules()} == before


@pytest.mark.parametrize("form", ["episode", "fitted"])
def test_head_predict_uses_its_own_episodes_classes_while_another_thread_fits(form: str, monkeypatch) -> None:
    """One head shared by two threads: A predicts while B fits another episode (other labels, other
    way count) between A's logits and A's reading of the classes. predict used to map A's argmax
    through B's classes (wrong labels, or an IndexError); it uses the classes of the prototypes
    its logits came from now."""
    import threading

    import torchfg.heads.prototypical as prototypical

    gen = torch.Generator().manual_seed(3)
    support_a, labels_a = torch.randn(10, 8, generator=gen), torch.arange(5).repeat_interleave(2) + 100
    support_b, labels_b = torch.randn(6, 8, generator=gen), torch.arange(3).repeat_interleave(2) + 200
    query = torch.randn(7, 8, generator=gen)
    expected = PrototypicalHead().predict(support_a, labels_a, query)
    head = PrototypicalHead()
    if form == "fitted":
        head.fit(support_a, labels_a)
    b_fitted, a_in_logits = threading.Event(), threading.Event()
    logits_fn = prototypical.prototype_logits

    def slow_logits(*args, **kwargs):
        if threading.current_thread().name == "A":
            a_in_logits.set()
            assert b_fitted.wait(10)
        return logits_fn(*args, **kwargs)

    monkeypatch.setattr(prototypical, "prototype_logits", slow_logits)
    result = {}

    def run_a():
        try:
            result["a"] = head.predict(query) if form == "fitted" else head.predict(support_a, labels_a, query)
        except Exception as error:  # B's 3 classes indexed by A's 5-way argmax
            result["a"] = error

    def run_b():
        assert a_in_logits.wait(10)
        head.fit(support_b, labels_b)
        b_fitted.set()

    threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(result["a"], torch.Tensor) and torch.equal(result["a"], expected), result["a"]
    assert head.classes.tolist() == [200, 201, 202]  # B's fit is what the head holds after


def test_embedding_keeps_no_batch_output_alive_through_a_view() -> None:
    """embed_fn returning a view (the class token of a (B, T, C) output) must not keep each
    batch's whole output alive until the end: that held T times the embeddings' memory."""
    import weakref

    outputs, alive = [], []

    def class_token(x: torch.Tensor) -> torch.Tensor:
        alive.append(sum(ref() is not None for ref in outputs))  # earlier batches' outputs
        tokens = torch.randn(x.shape[0], 9, 4)
        outputs.append(weakref.ref(tokens))
        return tokens[:, 0]

    embeddings, labels = embed_dataset(class_token, (torch.randn(20, 3), torch.arange(20)), batch_size=6)
    assert alive == [0, 0, 0, 0]
    assert embeddings.shape == (20, 4) and embeddings.untyped_storage().nbytes() == 20 * 4 * 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_evaluate_refuses_non_finite_embeddings(bad: float) -> None:
    """argmin over NaN distances picks way 0 for every query: chance accuracy reported as a result."""
    embeddings, labels = clustered_embeddings(8, 10, 6, noise=1.0, seed=3)
    embeddings[17, 2] = bad
    with pytest.raises(ValueError, match="non-finite embeddings.*1 of 80.*index 17"):
        evaluate(None, (embeddings, labels), n_shot=1, n_query=3, n_episodes=10, progress=False)
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(torch.nn.Identity(), (torch.full((80, 6), float("nan")), labels), n_shot=1, n_query=3,
                 n_episodes=10, progress=False)


def test_nan_logits_are_refused_instead_of_scored() -> None:
    """argmax takes a NaN as the maximum: a diverged embedder scored chance level (or 1.0 where the
    labels were column 0) through the manual episode loop, and predict named a class."""
    good = (torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 0]))
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"results\[1\]: logits hold NaN in 1 of 3 rows"):
        few_shot_accuracy([good, (logits, torch.tensor([1, 0, 0]))])
    # -inf logits are an ordinary mask.
    masked = torch.tensor([[float("-inf"), 1.0], [2.0, float("-inf")]])
    assert few_shot_accuracy([good, (masked, torch.tensor([1, 0]))]) == (1.0, 0.0)

    support, support_labels = torch.randn(6, 4), torch.tensor([3, 3, 5, 5, 8, 8])
    head = PrototypicalHead().fit(support, support_labels)
    query = torch.randn(5, 4)
    assert head.predict(query).shape == (5,)
    for bad in (float("nan"), float("inf")):
        query[2, 1] = bad
        with pytest.raises(ValueError, match="logits of 1 of 5 queries are not finite"):
            head.predict(query)
    # The three-argument form: a NaN in a support row makes its prototype, and so every logit, NaN.
    support[4, 0] = float("nan")
    with pytest.raises(ValueError, match="logits of 3 of 3 queries are not finite"):
        head.predict(support, support_labels, torch.randn(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine", "dot"])
def test_16_bit_embeddings_give_fp32_logits_that_do_not_overflow(dtype, metric) -> None:
    """Embeddings as an fp16 autocast region emits them: squared distances near 2e5 were returned
    as fp16 (-inf logits, a NaN cross-entropy) where autocast's cdist gives fp32."""
    g = torch.Generator().manual_seed(5)
    embeddings = (torch.randn(16, 32, generator=g) * 60).to(dtype)
    support, query = embeddings[::2].clone().requires_grad_(), embeddings[1::2].clone().requires_grad_()
    labels = torch.arange(8)
    head = PrototypicalHead(metric)
    with torch.autocast("cpu", dtype=dtype):
        logits = head(support, labels, query)
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    expected = PrototypicalHead(metric)(support.detach().double(), labels, query.detach().double())
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-5 * scale)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert loss.isfinite() and support.grad.dtype == dtype and query.grad.isfinite().all()
