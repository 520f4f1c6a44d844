"""Fused Triton kernels of :func:`torchfg.ops.hardest_triplet_loss.hardest_triplet_loss`.

The O(N D) half of a batch-hard / ATL training step, after the mining kernel
(:func:`torchfg.ops.triplet.triton.mine_hardest_splits_triton`), in one launch forward and one
backward (two when the candidates are a separate tensor that needs a gradient):

* forward: each program owns ``BLOCK_R`` anchors. It merges the mining kernel's per-split bests
  (no merge launch), computes the exact distances to the chosen positive and negative from
  ``a - b`` (fp32 accumulation, fp64 for fp64), the text margin of ATL (the cosine of the two
  descriptions, over the text columns), the hinge (or softplus) and its slope, and reduces:
  per-program partial sums go to a small workspace, and the last program to finish (a ticket
  taken with an atomic add) adds them in program order, so the reduced loss is deterministic
  and no reduction launch follows. Pairs whose slope is not 0 are pushed onto per-partner lists
  (an atomic exchange on the list head), which the backward walks.
* backward: each program owns ``BLOCK_R`` gradient rows by ``BLOCK_D`` columns and writes each
  element exactly once, in the input dtype, from an fp32 (fp64) sum in registers: the row's own
  terms as an anchor, plus the terms of every pair on its partner list. No gradient-sized fp32
  buffer, no zero fill, no sort.

The scratch (list heads and the ticket, int32, set to -1) is filled by the mining's
row-statistics pre-pass in the same launch, so a step launches: row statistics, mining (a
second pass for 64-bit labels that differ in their high words), this forward, this backward.

Determinism: the loss and the anchors' own terms are deterministic. A partner row's terms are
summed in list order, which is the order in which the forward's programs reached the atomic, so
on a GPU the last bits of a partner's fp32 sum can differ between runs (as with an index_add);
under ``torch.use_deterministic_algorithms(True)`` the forward builds no partner lists and the
backward is the pair-distance kernel's, whose partner rows come from a stable sort of the pairs.
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import LAUNCH_OPTIONS, cdiv, check_precondition, next_power_of_2, split_scalar
from torchfg.ops.hardest_triplet_loss import LINK_STRIPES, links_size
from torchfg.ops.metric import metric_code
from torchfg.ops.pair_distances.triton import (
    _acc_dtype, finish_pair_distance, ieee_div, ieee_sqrt, pair_distance_gradient,
)
from torchfg.ops.triplet.triton import fit_block, merge_split_bests, rows_aligned, unpack_best_index

__all__ = ["REDUCTION_CODES", "hardest_triplet_loss_triton", "hardest_triplet_loss_backward_triton"]

REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "mean_nonzero": 3}


def _blocks(d: int, dtype: torch.dtype, aligned: bool = True) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_D columns, num_warps) per program; ``aligned``: every row operand is
    16-byte aligned (base pointer and row stride, what Triton specialises on)."""
    if triton_interpreter_enabled():
        # Small tiles so that test sizes still cover several programs and D chunks.
        return 8, 16, 1
    # sm_90, ptxas -v (triton 3.6 / 3.9; compile_sm90's quick level): 16 x 128 keeps the 16-bit
    # forward at ~56 registers and the backward at ~90, no spills. Narrower where they spilled:
    # fp64 16 columns (cosine with text spilled ~1.3 KB at 128 columns, 200 bytes in the backward
    # at 64 and 12 at 32); 64 columns where D is not a multiple of 128 (a masked last chunk of 128
    # spilled 32-44 bytes in the backward at D = 100), for fp32, and for rows that are not 16-byte
    # aligned (4-48 bytes in the forward with 128: element-wise loads).
    if dtype == torch.float64:
        return 16, 16, 4
    if d % 128 or dtype == torch.float32 or not aligned:
        return 16, 64 if d > 32 else 32, 4
    return 16, min(128, max(32, next_power_of_2(d))), 4


@triton.jit
def _log1p(z):
    """log(1 + z) for z >= 0, accurate for small z: log(u) * z / (u - 1) with u = 1 + z rounded."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _inverse_norm(squared):
    return tl.where(squared > 0, ieee_div(1.0, ieee_sqrt(tl.where(squared > 0, squared, 1.0))), 0.0)


@triton.jit
def _hardest_triplet_fwd_kernel(
    x_ptr, y_ptr, anchor_text_ptr, cand_text_ptr,
    pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr,
    pairs_ptr, terms_ptr, loss_ptr, partial_ptr, count_ptr, links_ptr,
    N, M, D, T, SPLITS,
    stride_xn, stride_xd, stride_yn, stride_yd, stride_atn, stride_atd, stride_ctn, stride_ctd,
    base_margin_hi, base_margin_lo, margin_scale_hi, margin_scale_lo,
    METRIC: tl.constexpr, MARGIN_AWARE: tl.constexpr, SMOOTH: tl.constexpr, REDUCTION: tl.constexpr,
    MERGE: tl.constexpr, PACKED: tl.constexpr, LINK: tl.constexpr, STRIPES: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TEXT_ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    if MERGE:
        pos, neg = merge_split_bests(pos_val_ptr, pos_idx_ptr, neg_val_ptr, neg_idx_ptr, rows, row_ok, N, SPLITS,
                                     ACC_DTYPE, BLOCK_R)
    elif PACKED:
        pos = unpack_best_index(tl.load(pos_idx_ptr + rows64, mask=row_ok, other=-1).to(tl.int64))
        neg = unpack_best_index(tl.load(neg_idx_ptr + rows64, mask=row_ok, other=-1).to(tl.int64))
    else:
        pos = tl.load(pos_idx_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
        neg = tl.load(neg_idx_ptr + rows64, mask=row_ok, other=-1).to(tl.int64)
    valid = row_ok & (pos >= 0) & (neg >= 0)
    pos_safe = tl.where(valid, pos, 0)
    neg_safe = tl.where(valid, neg, 0)

    a_base = x_ptr + rows64[:, None] * stride_xn
    p_base = y_ptr + pos_safe[:, None] * stride_yn
    n_base = y_ptr + neg_safe[:, None] * stride_yn
    # Row sums per column chunk: one (BLOCK_R,) register vector per quantity (five (BLOCK_R,
    # BLOCK_D) tiles spilled on sm_90 for cosine).
    first_p = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)  # |a-p|^2 or a.p
    first_n = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    a_sq = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    p_sq = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    n_sq = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for d0 in tl.range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        # 64-bit: a column-major operand steps columns by N (up to 2**20): col * stride passes 2**31.
        cols64 = cols.to(tl.int64)[None, :]
        mask = valid[:, None] & (cols[None, :] < D)
        # Upcast right after the load: the interpreter mishandles bf16 arithmetic.
        a = tl.load(a_base + cols64 * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
        p = tl.load(p_base + cols64 * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
        n = tl.load(n_base + cols64 * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
        if METRIC <= 1:
            diff = a - p
            first_p += tl.sum(diff * diff, axis=1)
            diff = a - n
            first_n += tl.sum(diff * diff, axis=1)
        else:
            first_p += tl.sum(a * p, axis=1)
            first_n += tl.sum(a * n, axis=1)
            if METRIC == 2:
                a_sq += tl.sum(a * a, axis=1)
                p_sq += tl.sum(p * p, axis=1)
                n_sq += tl.sum(n * n, axis=1)
    d_ap = finish_pair_distance(first_p, a_sq, p_sq, METRIC)
    d_an = finish_pair_distance(first_n, a_sq, n_sq, METRIC)

    # The margins arrive as fp32 (hi, lo) pairs: one fp32 argument would round an fp64 loss.
    base_margin = tl.cast(base_margin_hi, ACC_DTYPE) + tl.cast(base_margin_lo, ACC_DTYPE)
    violation = d_ap - d_an + base_margin
    if MARGIN_AWARE:
        # ATL: margin = base + scale * (1 - cos(anchor_text_rows, text_n)) / 2, in the text's accumulation dtype.
        ta_base = anchor_text_ptr + rows64[:, None] * stride_atn
        tn_base = cand_text_ptr + neg_safe[:, None] * stride_ctn
        dot = tl.zeros((BLOCK_R,), dtype=TEXT_ACC_DTYPE)
        ta_sq = tl.zeros((BLOCK_R,), dtype=TEXT_ACC_DTYPE)
        tn_sq = tl.zeros((BLOCK_R,), dtype=TEXT_ACC_DTYPE)
        for t0 in tl.range(0, T, BLOCK_T):
            tcols = t0 + tl.arange(0, BLOCK_T)
            tcols64 = tcols.to(tl.int64)[None, :]
            tmask = valid[:, None] & (tcols[None, :] < T)
            ta = tl.load(ta_base + tcols64 * stride_atd, mask=tmask, other=0.0).to(TEXT_ACC_DTYPE)
            tn = tl.load(tn_base + tcols64 * stride_ctd, mask=tmask, other=0.0).to(TEXT_ACC_DTYPE)
            dot += tl.sum(ta * tn, axis=1)
            ta_sq += tl.sum(ta * ta, axis=1)
            tn_sq += tl.sum(tn * tn, axis=1)
        cos = dot * _inverse_norm(ta_sq) * _inverse_norm(tn_sq)
        margin_scale = tl.cast(margin_scale_hi, TEXT_ACC_DTYPE) + tl.cast(margin_scale_lo, TEXT_ACC_DTYPE)
        # The base in the text's dtype too, as the reference and the mining kernel add it: an fp64
        # base plus an fp32 term was an fp64 sum, an ulp of fp32 off the margin the mining used.
        margin_base = tl.cast(base_margin_hi, TEXT_ACC_DTYPE) + tl.cast(base_margin_lo, TEXT_ACC_DTYPE)
        margin = margin_base + margin_scale * (1.0 - cos) * 0.5
        violation = d_ap - d_an + margin.to(ACC_DTYPE)
    if SMOOTH:
        # softplus and its derivative as torch computes them (reference.SOFTPLUS_THRESHOLD = 20).
        z = tl.exp(tl.minimum(violation, 20.0))
        big = violation > 20.0
        loss = tl.where(big, violation, _log1p(z))
        slope = tl.where(big, 1.0, z / (z + 1.0))
    else:
        # A NaN violation stays NaN (as relu), and its slope is 0 (as threshold_backward).
        loss = tl.where(violation < 0, 0.0, violation)
        slope = tl.where(violation > 0, 1.0, 0.0)
    # An anchor with a NaN or inf entry (in its embedding, or in its text where the text sets the
    # margin) has NaN keys, which the mining's strict comparisons never select (nor does the
    # reference, which masks them): it would drop out of the loss, and a diverged embedding would give a finite
    # loss. Its loss is NaN instead (no gradient). Only unpaired anchors need the check, a rare
    # case: a second pass over their rows, outside the main loop so that its registers stay as
    # they were.
    unpaired = row_ok & ~valid
    row_sum = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    if tl.sum(unpaired.to(tl.int32), axis=0) > 0:
        for d0 in tl.range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_base + cols.to(tl.int64)[None, :] * stride_xd, mask=unpaired[:, None] & (cols[None, :] < D),
                        other=0.0)
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)  # NaN or inf iff an entry is (or it overflows)
        if MARGIN_AWARE:
            text_base = anchor_text_ptr + rows64[:, None] * stride_atn
            for t0 in tl.range(0, T, BLOCK_T):
                tcols = t0 + tl.arange(0, BLOCK_T)
                ta = tl.load(text_base + tcols.to(tl.int64)[None, :] * stride_atd,
                             mask=unpaired[:, None] & (tcols[None, :] < T), other=0.0)
                row_sum += tl.sum(ta.to(ACC_DTYPE), axis=1)
    loss = tl.where(valid, loss, tl.where(tl.abs(row_sum) < float("inf"), 0.0, float("nan")))
    slope = tl.where(valid, slope, 0.0).to(ACC_DTYPE)

    tl.store(pairs_ptr + rows64 * 2, pos, mask=row_ok)
    tl.store(pairs_ptr + rows64 * 2 + 1, neg, mask=row_ok)
    tl.store(terms_ptr + rows64 * 3, tl.where(valid, d_ap, 0.0), mask=row_ok)
    tl.store(terms_ptr + rows64 * 3 + 1, tl.where(valid, d_an, 0.0), mask=row_ok)
    tl.store(terms_ptr + rows64 * 3 + 2, slope, mask=row_ok)
    if LINK:
        # Push pair ids 2i (positive) and 2i + 1 (negative) onto one of their partner's STRIPES
        # lists, anchor i's stripe i % STRIPES; links is [ticket (1), heads (M * STRIPES), next
        # (2N)], ticket and heads set to -1 by the mining pre-pass. Stripes split a hub's list
        # (a row that hundreds of anchors picked) into lists that the backward walks together.
        linked = valid & (slope != 0)
        pair = (rows64 * 2).to(tl.int32)
        stripe = rows64 % STRIPES
        previous = tl.atomic_xchg(links_ptr + 1 + pos_safe * STRIPES + stripe, pair, mask=linked)
        tl.store(links_ptr + 1 + M * STRIPES + rows64 * 2, previous, mask=linked)
        previous = tl.atomic_xchg(links_ptr + 1 + neg_safe * STRIPES + stripe, pair + 1, mask=linked)
        tl.store(links_ptr + 1 + M * STRIPES + rows64 * 2 + 1, previous, mask=linked)

    if REDUCTION == 0:
        tl.store(loss_ptr + rows64, loss, mask=row_ok)
    if REDUCTION == 3:
        counted = valid & (loss > 0)
    else:
        counted = valid
    # The sum and the count (the divisor of the means) over all programs: partials in a
    # workspace, added up by the program that finishes last.
    tl.store(partial_ptr + pid.to(tl.int64) * 2, tl.sum(loss, axis=0))
    tl.store(partial_ptr + pid.to(tl.int64) * 2 + 1, tl.sum(counted.to(ACC_DTYPE), axis=0))
    # Every thread's partial store is ordered before the ticket's release.
    tl.debug_barrier()
    ticket = tl.atomic_add(links_ptr, 1, sem="acq_rel", scope="gpu")
    programs = tl.num_programs(0)
    if ticket == programs - 2:  # the ticket starts at -1: this program finished last
        sums = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        counts = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        for p0 in tl.range(0, programs, BLOCK_P):
            spots = tl.arange(0, BLOCK_P).to(tl.int64) + p0
            # volatile: other programs' stores, not a cached copy.
            sums += tl.load(partial_ptr + spots * 2, mask=spots < programs, other=0.0, volatile=True)
            counts += tl.load(partial_ptr + spots * 2 + 1, mask=spots < programs, other=0.0, volatile=True)
        total = tl.sum(sums, axis=0)
        count = tl.sum(counts, axis=0)
        if REDUCTION == 1:
            tl.store(loss_ptr, total)
        elif REDUCTION >= 2:
            # An empty selection gives 0 with a zero gradient (0 / 1), never 0 / 0.
            tl.store(loss_ptr, ieee_div(total, tl.maximum(count, 1.0)))
        tl.store(count_ptr, count)


@triton.jit
def _anchor_scale(grad_ptr, count_ptr, anchor, mask, REDUCTION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dL/d(loss of anchor): the upstream gradient, divided by the count for the means."""
    if REDUCTION == 0:
        scale = tl.load(grad_ptr + anchor, mask=mask, other=0.0).to(ACC_DTYPE)
    else:
        scale = tl.load(grad_ptr).to(ACC_DTYPE)
        if REDUCTION >= 2:
            scale = scale / tl.maximum(tl.load(count_ptr).to(ACC_DTYPE), 1.0)
    return scale


@triton.jit
def _hardest_triplet_bwd_kernel(
    grad_ptr, x_ptr, y_ptr, pairs_ptr, terms_ptr, count_ptr, links_ptr, x_inv_ptr, y_inv_ptr, g_ptr,
    R, M, D, N, ANCHOR_START,
    stride_xn, stride_xd, stride_yn, stride_yd,
    METRIC: tl.constexpr, REDUCTION: tl.constexpr, OWN: tl.constexpr, PARTNER: tl.constexpr, STRIPES: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [0, R) by columns [d0, d0 + BLOCK_D) of one gradient, each element written once, in
    the gradient's dtype. The N anchors are rows [ANCHOR_START, ANCHOR_START + N) of x (all of
    x when it holds only them; a row slice when x holds the candidates too).

    OWN: row j is row j of x; if it is an anchor, add its two pairs' terms (x's gradient).
    PARTNER: row j is a candidate row (of y, which may be x); add the terms of every pair on its
    STRIPES lists.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    if OWN:
        own = rows64 - ANCHOR_START  # the row's anchor index
        own_ok = row_ok & (own >= 0) & (own < N)
        slope = tl.load(terms_ptr + own * 3 + 2, mask=own_ok, other=0.0)
        coef = slope * _anchor_scale(grad_ptr, count_ptr, own, own_ok, REDUCTION, ACC_DTYPE)
        active = own_ok & (coef != 0)
        pos = tl.load(pairs_ptr + own * 2, mask=active, other=0)
        neg = tl.load(pairs_ptr + own * 2 + 1, mask=active, other=0)
        d_ap = tl.load(terms_ptr + own * 3, mask=active, other=0.0)
        d_an = tl.load(terms_ptr + own * 3 + 1, mask=active, other=0.0)
        own_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        pos_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        neg_inv = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
        if METRIC == 2:
            own_inv = tl.load(x_inv_ptr + own, mask=active, other=0.0).to(ACC_DTYPE)
            pos_inv = tl.load(y_inv_ptr + pos, mask=active, other=0.0).to(ACC_DTYPE)
            neg_inv = tl.load(y_inv_ptr + neg, mask=active, other=0.0).to(ACC_DTYPE)
    if PARTNER:
        # The row block's lists, row-major: list l is stripe l % STRIPES of row l // STRIPES.
        lists = tl.arange(0, BLOCK_R * STRIPES)
        list_rows = tl.program_id(0) * BLOCK_R + lists // STRIPES
        list_ok = list_rows < R
        list_rows64 = list_rows.to(tl.int64)
        head = tl.load(links_ptr + 1 + list_rows64 * STRIPES + lists % STRIPES, mask=list_ok, other=-1)
        list_inv = tl.zeros((BLOCK_R * STRIPES,), dtype=ACC_DTYPE)
        if METRIC == 2:
            list_inv = tl.load(y_inv_ptr + list_rows64, mask=list_ok, other=0.0).to(ACC_DTYPE)
    # One column chunk per program (grid axis 1): a partner's list is walked once per chunk, and
    # the chunks of a row block walk theirs in parallel. Rows that many anchors picked (hubs of
    # random data: hundreds of pairs) made the serial walk the whole kernel's time when one program
    # looped over the chunks (0.26 ms at N = 8192 on the H200, for O(N D) work).
    d0 = tl.program_id(1) * BLOCK_D
    cols = d0 + tl.arange(0, BLOCK_D)
    # 64-bit: a column-major operand steps columns by N (up to 2**20): col * stride passes 2**31.
    cols64 = cols.to(tl.int64)[None, :]
    col_ok = cols[None, :] < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC_DTYPE)
    if OWN:
        mask = active[:, None] & col_ok
        # Upcast right after the load: the interpreter mishandles bf16 arithmetic.
        a = tl.load(x_ptr + rows64[:, None] * stride_xn + cols64 * stride_xd, mask=mask, other=0.0).to(ACC_DTYPE)
        p = tl.load(y_ptr + pos[:, None] * stride_yn + cols64 * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
        n = tl.load(y_ptr + neg[:, None] * stride_yn + cols64 * stride_yd, mask=mask, other=0.0).to(ACC_DTYPE)
        acc += pair_distance_gradient(coef, d_ap, a, p, own_inv, pos_inv, METRIC)
        acc += pair_distance_gradient(-coef, d_an, a, n, own_inv, neg_inv, METRIC)
    if PARTNER:
        # Each row once per stripe (from cache): the lists' partner rows.
        b = tl.load(y_ptr + list_rows64[:, None] * stride_yn + cols64 * stride_yd, mask=list_ok[:, None] & col_ok,
                    other=0.0).to(ACC_DTYPE)
        pair = head
        # The walk takes as many steps as the block's longest list: a stripe of a hub's list.
        while tl.max(pair, axis=0) >= 0:
            listed = pair >= 0
            pair64 = pair.to(tl.int64)
            anchor = pair64 // 2
            role = pair64 - anchor * 2  # 0: this row is the anchor's positive, 1: its negative
            # (Names apart from the OWN part's: a loop-carried name keeps its shape on a GPU.)
            pair_slope = tl.load(terms_ptr + anchor * 3 + 2, mask=listed, other=0.0)
            g = pair_slope * _anchor_scale(grad_ptr, count_ptr, anchor, listed, REDUCTION, ACC_DTYPE)
            g = tl.where(role == 0, g, -g)
            dist = tl.load(terms_ptr + anchor * 3 + role, mask=listed, other=0.0)
            a_mask = listed[:, None] & col_ok
            anchor_row = tl.load(x_ptr + (anchor + ANCHOR_START)[:, None] * stride_xn + cols64 * stride_xd, mask=a_mask,
                                 other=0.0)
            anchor_row = anchor_row.to(ACC_DTYPE)
            a_inv = tl.zeros((BLOCK_R * STRIPES,), dtype=ACC_DTYPE)
            if METRIC == 2:
                a_inv = tl.load(x_inv_ptr + anchor, mask=listed, other=0.0).to(ACC_DTYPE)
            contribution = pair_distance_gradient(g, dist, b, anchor_row, list_inv, a_inv, METRIC)
            acc += tl.sum(tl.reshape(contribution, (BLOCK_R, STRIPES, BLOCK_D)), axis=1)
            pair = tl.load(links_ptr + 1 + M * STRIPES + pair64, mask=listed, other=-1)
    tl.store(g_ptr + rows64[:, None] * D + cols[None, :], acc.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


def hardest_triplet_loss_triton(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_labels: torch.Tensor,
    candidate_labels: torch.Tensor,
    anchor_text: torch.Tensor | None,
    candidate_text: torch.Tensor | None,
    *,
    metric: str,
    base_margin: float,
    margin_scale: float,
    text_positive_threshold: float | None,
    self_offset: int,
    smooth: bool,
    reduction: str,
    link: bool,
) -> tuple[torch.Tensor, ...]:
    """Mining and the loss forward: (loss, pairs, terms, count, links, candidate_inv, anchor_inv).

    Shapes and meaning as :func:`torchfg.ops.hardest_triplet_loss.hardest_triplet_loss`'s op;
    ``links`` is [ticket (1), heads (M * LINK_STRIPES), next (2N)] int32 when ``link`` (else empty), and the
    inverse norms are the mining pre-pass's row statistics for cosine (else empty).
    """
    from torchfg.ops.triplet.triton import mine_hardest_splits_triton

    n, m, d = anchors.shape[0], candidates.shape[0], anchors.shape[1]
    device = anchors.device
    acc, acc_tl = _acc_dtype(anchors.dtype)
    # [ticket (1), heads (M * LINK_STRIPES), next (2N)]: without partner lists, the ticket alone.
    links = torch.empty(links_size(n, m) if link else 1, dtype=torch.int32, device=device)
    bests = mine_hardest_splits_triton(
        anchors, candidates, anchor_labels, candidate_labels, anchor_text, candidate_text, metric=metric,
        base_margin=base_margin, margin_scale=margin_scale, text_positive_threshold=text_positive_threshold,
        self_offset=self_offset, fill=(links[: 1 + m * LINK_STRIPES], -1),
    )
    block_r, block_d, warps = _blocks(
        d, anchors.dtype, rows_aligned(anchors, candidates, *((anchor_text, candidate_text) if anchor_text is not None else ()))
    )
    programs = max(1, cdiv(n, block_r))
    pairs = torch.empty(n, 2, dtype=torch.int64, device=device)
    terms = torch.empty(n, 3, dtype=acc, device=device)
    loss = torch.empty(n if reduction == "none" else (), dtype=acc, device=device)
    count = torch.empty(1, dtype=acc, device=device)
    partial = torch.empty(programs, 2, dtype=acc, device=device)
    margin_aware = anchor_text is not None and margin_scale != 0.0
    # Read only where margin_aware, so with text: both tensors then (the op checks them as a pair).
    anchor_text_rows, candidate_text_rows = cast(torch.Tensor, anchor_text), cast(torch.Tensor, candidate_text)
    text_args = (anchor_text_rows, candidate_text_rows) if margin_aware else (anchors, candidates)
    t = anchor_text_rows.shape[1] if margin_aware else 0
    text_strides = ((anchor_text_rows.stride(0), anchor_text_rows.stride(1),
                     candidate_text_rows.stride(0), candidate_text_rows.stride(1)) if margin_aware else (0, 0, 0, 0))
    if n == 0:
        loss.zero_()  # no program runs; an empty batch has loss 0 (and a zero gradient)
        count.zero_()
    else:
        _hardest_triplet_fwd_kernel[(programs,)](
            anchors, candidates, *text_args,
            bests.pos_val, bests.pos_idx, bests.neg_val, bests.neg_idx,
            pairs, terms, loss, partial, count, links,
            n, m, d, t, bests.splits,
            anchors.stride(0), anchors.stride(1), candidates.stride(0), candidates.stride(1), *text_strides,
            *split_scalar(base_margin), *split_scalar(margin_scale),
            METRIC=metric_code(metric), MARGIN_AWARE=margin_aware, SMOOTH=smooth,
            REDUCTION=REDUCTION_CODES[reduction], MERGE=bests.splits > 1, PACKED=bests.packed, LINK=link,
            STRIPES=LINK_STRIPES, ACC_DTYPE=acc_tl,
            TEXT_ACC_DTYPE=tl.float64 if margin_aware and anchor_text_rows.dtype == torch.float64 else tl.float32,
            BLOCK_R=block_r, BLOCK_D=block_d,
            # fp64 embeddings with 64 text columns spilled 8 bytes (triton 3.6).
            BLOCK_T=fit_block(16 if torch.float64 in (anchors.dtype, text_args[0].dtype) else 64, t),
            BLOCK_P=128, num_warps=warps, **LAUNCH_OPTIONS,
        )
    candidate_inv, anchor_inv = bests.candidate_stat, bests.anchor_stat
    if metric != "cosine" or candidate_inv is None or anchor_inv is None:
        # Only cosine's inverse norms serve the backward; the mining sets both statistics or neither.
        candidate_inv, anchor_inv = torch.empty(0, dtype=acc, device=device), torch.empty(0, dtype=acc, device=device)
    return loss, pairs, terms, count, links if link else links.new_empty(0), candidate_inv, anchor_inv


def hardest_triplet_loss_backward_triton(
    grad: torch.Tensor,
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    pairs: torch.Tensor,
    terms: torch.Tensor,
    count: torch.Tensor,
    links: torch.Tensor,
    candidate_inv: torch.Tensor,
    anchor_inv: torch.Tensor,
    *,
    metric: str,
    reduction: str,
    candidates_are_anchors: bool,
    needs_candidate_grad: bool,
    anchor_start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d anchors (N, D), dL/d candidates (M, D) or empty) in the input dtype, every row written once.

    With ``candidates_are_anchors`` (``anchors`` is then ``candidates``, and the N = ``pairs``' rows
    anchors are its rows [anchor_start, anchor_start + N)) the anchor and partner terms go into its
    one gradient (one launch); otherwise a second launch writes the candidates' gradient when
    ``needs_candidate_grad``.
    """
    acc, acc_tl = _acc_dtype(anchors.dtype)
    n, (m, d) = pairs.shape[0], candidates.shape
    check_precondition(0 <= anchor_start <= anchor_start + n <= anchors.shape[0])
    grad_x = torch.empty(anchors.shape, dtype=anchors.dtype, device=anchors.device)
    grad_y = (torch.empty(candidates.shape, dtype=candidates.dtype, device=candidates.device)
              if needs_candidate_grad and not candidates_are_anchors else anchors.new_empty(0))
    if d == 0:
        return grad_x, grad_y
    if n == 0:
        # No anchor, no pair: a zero gradient (the mining took no candidate statistics to read).
        return grad_x.zero_(), grad_y.zero_()
    check_precondition(links.numel() == 0 or links.numel() == links_size(n, m))
    partner = (candidates_are_anchors or needs_candidate_grad) and links.numel() > 0
    check_precondition(partner or not (candidates_are_anchors or needs_candidate_grad),
                       lambda: "the forward built no partner lists (link=False) but a partner gradient is needed")
    grad = grad.contiguous()
    dummy = terms
    x_inv = anchor_inv if metric == "cosine" else dummy
    y_inv = candidate_inv if metric == "cosine" else dummy
    block_r, block_d, warps = _blocks(d, anchors.dtype, rows_aligned(anchors, candidates))
    common = dict(METRIC=metric_code(metric), REDUCTION=REDUCTION_CODES[reduction], ACC_DTYPE=acc_tl,
                  BLOCK_R=block_r, BLOCK_D=block_d)
    strides = (anchors.stride(0), anchors.stride(1), candidates.stride(0), candidates.stride(1))

    def launch(target: torch.Tensor, rows: int, own: bool, partner_terms: bool) -> None:
        if rows:
            # The list walk holds (BLOCK_R * LINK_STRIPES, BLOCK_D) tiles: twice the warps (4 spilled
            # 68 bytes at 16 x 128 in 16 bits on sm_90, triton 3.6).
            _hardest_triplet_bwd_kernel[(cdiv(rows, block_r), cdiv(d, block_d))](
                grad, anchors, candidates, pairs, terms, count, links if partner_terms else pairs, x_inv, y_inv, target,
                rows, m, d, n, anchor_start, *strides, OWN=own, PARTNER=partner_terms, STRIPES=LINK_STRIPES,
                num_warps=warps * 2 if partner_terms and not triton_interpreter_enabled() else warps, **common,
                **LAUNCH_OPTIONS,
            )

    if candidates_are_anchors:
        launch(grad_x, m, True, partner)
        return grad_x, grad_y
    launch(grad_x, n, True, False)
    if needs_candidate_grad:
        launch(grad_y, m, False, True)
    return grad_x, grad_y
