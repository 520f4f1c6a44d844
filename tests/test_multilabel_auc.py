"""multilabel_auc against scikit-learn's roc_auc_score, and relative_improvement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from torchfg.metrics import multilabel_auc, relative_improvement


def _random_case(seed: int, n: int, num_labels: int, levels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores with ties (``levels`` distinct values per label) and targets with both classes."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, num_labels, generator=generator)
    if levels is not None:
        scores = torch.floor(scores * levels) / levels
    targets = (torch.rand(n, num_labels, generator=generator) < 0.4).long()
    targets[0], targets[1] = 0, 1  # both classes in every label
    return scores, targets


@pytest.mark.parametrize("n, num_labels, levels", [(37, 5, 3), (101, 7, 10), (2, 1, None), (53, 3, None), (64, 4, 1)])
def test_matches_sklearn_per_label_macro_and_micro(n, num_labels, levels):
    scores, targets = _random_case(n * 31 + num_labels, n, num_labels, levels)
    per_label = multilabel_auc(scores, targets, average=None)
    expected = roc_auc_score(targets.numpy(), scores.numpy(), average=None)
    assert per_label.dtype == torch.float64 and per_label.shape == (num_labels,)
    np.testing.assert_allclose(per_label.numpy(), np.atleast_1d(expected), rtol=0, atol=1e-12)
    macro = multilabel_auc(scores, targets)
    assert macro.shape == ()
    np.testing.assert_allclose(macro.item(), roc_auc_score(targets.numpy(), scores.numpy(), average="macro"), atol=1e-12)
    micro = multilabel_auc(scores, targets, average="micro")
    np.testing.assert_allclose(micro.item(), roc_auc_score(targets.numpy(), scores.numpy(), average="micro"), atol=1e-12)


@given(
    n=st.integers(2, 60),
    num_labels=st.integers(1, 6),
    levels=st.sampled_from([1, 2, 3, 7, None]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_sklearn_property(n, num_labels, levels, seed):
    scores, targets = _random_case(seed, n, num_labels, levels)
    per_label = multilabel_auc(scores, targets, average=None)
    expected = roc_auc_score(targets.numpy(), scores.numpy(), average=None)
    np.testing.assert_allclose(per_label.numpy(), np.atleast_1d(expected), rtol=0, atol=1e-12)


def test_all_tied_scores_give_one_half():
    targets = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0]])
    scores = torch.full((5, 2), 0.3)
    torch.testing.assert_close(multilabel_auc(scores, targets, average=None), torch.full((2,), 0.5, dtype=torch.float64))
    assert roc_auc_score(targets.numpy(), scores.numpy(), average=None).tolist() == [0.5, 0.5]


def test_perfect_reversed_and_order_only():
    targets = torch.tensor([0, 0, 1, 0, 1, 1])
    logits = torch.tensor([-3.0, -1.0, 2.0, 0.5, 1.0, 4.0])
    assert multilabel_auc(logits, targets).item() == pytest.approx(roc_auc_score(targets.numpy(), logits.numpy()))
    perfect = torch.tensor([0.0, 0.1, 0.8, 0.2, 0.9, 0.7])
    assert multilabel_auc(perfect, targets).item() == 1.0
    assert multilabel_auc(-perfect, targets).item() == 0.0
    # Only the order matters: a monotone map of the scores gives the same AUC.
    torch.testing.assert_close(multilabel_auc(torch.sigmoid(logits), targets), multilabel_auc(logits, targets))


def test_integer_scores_beyond_float64_precision_keep_their_order():
    """int64 scores were cast to float64, where 2^53 and 2^53 + 1 are one value: a tie (AUC 0.5)."""
    big = 2**53
    assert multilabel_auc(torch.tensor([big, big + 1]), torch.tensor([0, 1])).item() == 1.0
    scores = torch.tensor([[big + 3, 1], [big + 1, 2], [big + 2, 2], [big, 0]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    expected = roc_auc_score(targets.numpy(), (scores - big).numpy(), average=None).tolist()
    assert multilabel_auc(scores, targets, average=None).tolist() == expected
    assert multilabel_auc(torch.tensor([True, False, True]), torch.tensor([1, 0, 1])).item() == 1.0
    # uint64: the top half must not wrap negative.
    unsigned = torch.tensor([2**63 + 5, 3, 2**63 + 4, 2**64 - 1], dtype=torch.uint64)
    assert multilabel_auc(unsigned, torch.tensor([1, 0, 0, 1])).item() == 1.0


def test_target_dtypes_and_one_dimensional_input():
    scores, targets = _random_case(5, 41, 3, 4)
    reference = multilabel_auc(scores, targets, average=None)
    torch.testing.assert_close(multilabel_auc(scores, targets.bool(), average=None), reference)
    torch.testing.assert_close(multilabel_auc(scores.double(), targets.float(), average=None), reference)
    torch.testing.assert_close(multilabel_auc(scores.half(), targets, average=None),
                               torch.from_numpy(roc_auc_score(targets.numpy(), scores.half().float().numpy(), average=None)))
    hard = scores > 0.5
    assert multilabel_auc(hard, targets).item() == pytest.approx(roc_auc_score(targets.numpy(), hard.numpy()))
    one = multilabel_auc(scores[:, 1], targets[:, 1])
    assert one.shape == () and one.item() == pytest.approx(roc_auc_score(targets[:, 1].numpy(), scores[:, 1].numpy()))


def test_single_class_labels_are_nan_and_skipped_in_macro():
    scores, targets = _random_case(9, 30, 5, 5)
    targets[:, 1] = 0
    targets[:, 3] = 1
    with pytest.warns(UserWarning, match=r"2 label\(s\) have a single class in targets \(label 1, 3\)"):
        per_label = multilabel_auc(scores, targets, average=None)
    assert torch.isnan(per_label[[1, 3]]).all() and not torch.isnan(per_label[[0, 2, 4]]).any()
    keep = [0, 2, 4]
    expected = roc_auc_score(targets[:, keep].numpy(), scores[:, keep].numpy(), average=None)
    np.testing.assert_allclose(per_label[keep].numpy(), expected, atol=1e-12)
    with pytest.warns(UserWarning, match="left out of the macro average"):
        macro = multilabel_auc(scores, targets)
    assert macro.item() == pytest.approx(float(np.mean(expected)), abs=1e-12)
    with pytest.warns(UserWarning):
        assert math.isnan(multilabel_auc(scores[:, [1, 3]], targets[:, [1, 3]]).item())


def test_no_warning_when_every_label_is_defined():
    scores, targets = _random_case(10, 20, 3, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        multilabel_auc(scores, targets)


@pytest.mark.parametrize(
    "scores, targets, error, match",
    [
        (torch.rand(5, 3), torch.ones(5, 2), ValueError, r"scores and targets must have the same shape"),
        (torch.rand(5, 3), torch.ones(3, 5), ValueError, r"same shape"),
        (torch.rand(4, 2), torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]]), ValueError, "targets must be binary"),
        (torch.rand(4), torch.tensor([0.0, 0.5, 1.0, 1.0]), ValueError, "targets must be binary"),
        (torch.rand(4), torch.tensor([0, -1, 1, 1]), ValueError, "targets must be binary"),
        (torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]), ValueError, "scores contains NaN"),
        (torch.rand(2, 2, 2), torch.ones(2, 2, 2), ValueError, r"scores must have shape \(N, L\)"),
        (torch.rand(0, 3), torch.ones(0, 3), ValueError, "at least one sample"),
        (np.random.rand(4, 2), torch.ones(4, 2), TypeError, "scores must be a torch.Tensor"),
        (torch.rand(4, 2), [[0, 1]] * 4, TypeError, "targets must be a torch.Tensor"),
        (torch.rand(4, 2, dtype=torch.complex64), torch.ones(4, 2), TypeError, "scores must be a real tensor"),
    ],
)
def test_bad_input_raises_clear_errors(scores, targets, error, match):
    with pytest.raises(error, match=match):
        multilabel_auc(scores, targets)


def test_bad_average():
    with pytest.raises(ValueError, match="average must be one of"):
        multilabel_auc(torch.rand(4, 2), torch.ones(4, 2), average="weighted")


def test_relative_improvement():
    base = torch.tensor([0.60, 0.80, 0.50, float("nan")], dtype=torch.float64)
    new = torch.tensor([0.66, 0.76, 0.75, 0.9], dtype=torch.float64)
    expected = np.mean([0.06 / 0.60, -0.04 / 0.80, 0.25 / 0.50])  # the NaN label is skipped
    value = relative_improvement(new, base)
    assert value.shape == () and value.item() == pytest.approx(expected, abs=1e-12)
    assert relative_improvement([0.9, 0.6], [0.9, 0.6]).item() == 0.0
    assert relative_improvement(1.1527 * 0.7, 0.7).item() == pytest.approx(0.1527)
    with pytest.raises(ValueError, match="same shape"):
        relative_improvement(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="base must be non-zero"):
        relative_improvement([0.5, 0.6], [0.0, 0.6])
    with pytest.raises(TypeError, match="new must be"):
        relative_improvement("0.5", [0.5])
    # NumPy arrays and scalars, as scikit-learn returns AUCs (they were refused).
    assert relative_improvement(np.array([0.66, 0.76, 0.75, 0.9]), base.numpy()).item() == pytest.approx(expected, abs=1e-12)
    assert relative_improvement(np.float64(0.66), np.float32(0.6)).item() == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(TypeError, match="base must be"):
        relative_improvement([0.5], np.bool_(True))
    with pytest.warns(UserWarning, match="no label"):
        assert math.isnan(relative_improvement([float("nan")], [0.5]).item())


def test_relative_improvement_of_two_auc_vectors():
    scores_base, targets = _random_case(11, 80, 4, None)
    scores_new = scores_base + 0.3 * targets  # pushes positives up: every label improves
    base = multilabel_auc(scores_base, targets, average=None)
    new = multilabel_auc(scores_new, targets, average=None)
    assert (new > base).all()
    assert relative_improvement(new, base).item() == pytest.approx(((new - base) / base).mean().item())
