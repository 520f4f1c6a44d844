"""Host-side shortcuts of the Triton launchers (a fused training step is host-bound at N = 8192):
each must answer exactly what the general path answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton

mining = pytest.importorskip("torchfg.ops.triplet.triton")
utils = pytest.importorskip("torchfg.ops._triton_utils")


def test_one_tensor_is_a_row_slice_of_itself_as_the_general_check_says():
    x = torch.randn(6, 4)
    expanded = torch.randn(1, 4).expand(6, 4)  # row stride 0
    for rows in (x, x[:0], expanded):
        for offset in (-1, 0, 1, 5):
            general = mining._is_row_slice(rows, rows[:], offset)  # another tensor object: every check
            assert mining._is_row_slice(rows, rows, offset) is general, (rows.shape, rows.stride(), offset)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_one_labels_tensor_is_converted_once(dtype):
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=dtype)
    anchor_words, candidate_words, words = mining._label_words(labels, labels)
    assert candidate_words is anchor_words
    separate = mining._label_words(labels, labels.clone())
    assert words == separate[2] and torch.equal(anchor_words, separate[0]) and torch.equal(candidate_words, separate[1])
    assert anchor_words.dtype == separate[1].dtype == torch.int32
    other = torch.tensor([2, 7, 1, 8, 2, 8], dtype=torch.int64)  # mixed widths: both as 64-bit words
    a, c, w = mining._label_words(labels, other)
    assert w == 2 and torch.equal(c, other.view(torch.int32)) and torch.equal(a, labels.long().view(torch.int32))


def test_sm_counts_are_kept_per_device_and_properties_function(monkeypatch):
    asked = []

    def h100(device):
        asked.append(device.index)
        return SimpleNamespace(multi_processor_count=132)

    monkeypatch.setattr(utils, "_SM_COUNTS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", h100)
    cuda0, cuda1 = SimpleNamespace(type="cuda", index=0), SimpleNamespace(type="cuda", index=1)
    assert [utils.sm_count(d) for d in (cuda0, cuda0, cuda1, cuda1)] == [132] * 4
    assert asked == [0, 1]
    # Another properties function (an emulator entered or left, a test's patch) is asked anew.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=78))
    assert utils.sm_count(cuda0) == 78
    # The current device (no index) is never kept: it can change.
    monkeypatch.setattr(torch.cuda, "get_device_properties", h100)
    current = SimpleNamespace(type="cuda", index=None)
    assert [utils.sm_count(current) for _ in range(2)] == [132, 132] and asked == [0, 1, None, None]


def test_the_wide_pass_config_is_built_once_per_argument():
    first = mining._wide_pass_config(64, False, mining.ALIGNED)
    assert mining._wide_pass_config(64, False, mining.ALIGNED) is first
    assert mining._wide_pass_config(64, True, mining.ALIGNED) != first


def test_the_anchors_statistics_of_a_batch_mined_against_itself_are_the_candidates():
    """A batch mined against itself used the view [0 : N] of the candidates' statistics, which is
    all of them: the same tensor now, and the slice for a batch inside a larger candidate set."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=gen)
    labels = torch.arange(40) // 4
    kwargs = dict(metric="euclidean", base_margin=0.2, margin_scale=0.0, text_positive_threshold=None)
    bests = mining.mine_hardest_splits_triton(x, x, labels, labels, None, None, self_offset=0, **kwargs)
    assert bests.anchor_stat is bests.candidate_stat and bests.candidate_stat.shape == (40,)
    inner = mining.mine_hardest_splits_triton(x[8:20], x, labels[8:20], labels, None, None, self_offset=8, **kwargs)
    assert inner.anchor_stat.data_ptr() == inner.candidate_stat[8:].data_ptr() and inner.anchor_stat.shape == (12,)
    torch.testing.assert_close(bests.candidate_stat, x.pow(2).sum(1))
    torch.testing.assert_close(inner.anchor_stat, x[8:20].pow(2).sum(1))
