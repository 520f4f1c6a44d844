"""Fused Triton forward and backward for the DINO cross-entropy over crop pairs.

Crop blocking. A program owns one sample ``b`` and holds every crop of it at once, in tiles whose
row counts are powers of two (a Triton requirement) chosen from the real crop counts so that no
lane idles in DINO's layouts: the teacher crops and the student's global crops in one block of
``BLOCK_G = next_pow2(n_global)`` rows (2 for DINO), the local crops in up to three blocks whose
sizes are the binary digits of ``n_local`` (8 -> 8; 6 -> 4 + 2; 10 -> 8 + 2; 7 -> 4 + 2 + 1; the
third block rounds up, so only ``n_local`` >= 15 with four set bits wastes rows). See
:func:`crop_blocks`. Student crop ``v < n_global`` and teacher crop ``v`` are the same view, so
they share the rows of the global block.

Forward (grid: samples x K-splits). A program streams one contiguous range of the K axis in
(rows x BLOCK_K) tiles and keeps, per row, online-softmax states:

* student: running max ``m`` and ``sum exp(x - m)`` of ``x = s / student_temp``;
* teacher: running max and sum of ``a = (t - center) / teacher_temp``, and the running
  ``sum exp(a - m) * (S - x_i)`` where ``S`` is the column sum of all student crops, i.e. the
  unnormalised dot of teacher crop i with every student crop it is paired with.

The launcher merges the per-split states (small: splits x crops x B) into the row log-sum-exps and
the loss, using ``-sum_k p_i log q_v = lse_v - <p_i, x_v>``. Nothing of size (B, K) is allocated.

Backward (grid: samples x K-tiles). With the saved row log-sum-exps the teacher probabilities and
the student softmax are recomputed tile by tile and the student gradient is written by the same
pass, in the student's dtype: ``grad_v = coef * (n_targets(v) softmax(x_v) - (P - p_v [v < n_global]))``,
``P = sum_i p_i``. That gradient is the only (crops x B x K) buffer (no fp32 copy, no cast pass):
the op's peak extra memory is the gradient plus O(splits x crops x B) statistics. Inputs of any
float dtype are upcast after every load; the math is fp32 (fp64 for fp64 inputs).

Tiling lives in module constants (:data:`TILE_ELEMENTS`, :data:`BLOCK_K_BOUNDS`, :data:`NUM_WARPS`,
:data:`INTERPRETER_BLOCK_K`) read by :func:`launch_config`, which both launchers call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops._triton_utils import LAUNCH_OPTIONS, cdiv, next_power_of_2, split_scalar
from torchfg.ops.dino.reference import dino_accumulation_dtype, n_pairs

__all__ = [
    "dino_loss_triton", "dino_loss_backward_triton", "crop_blocks", "launch_config", "LaunchConfig",
    "TILE_ELEMENTS", "BLOCK_K_BOUNDS", "NUM_WARPS", "INTERPRETER_BLOCK_K",
]

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

#: Elements of all rows' tiles (teacher + every student crop) held per K step by a compiled kernel:
#: ~24-32 fp32 values per thread at 4 warps, with room for the exponentials.
TILE_ELEMENTS = 3072
#: BLOCK_K is a power of two within these bounds (>= 16 keeps 16-byte vector loads of 16-bit data).
BLOCK_K_BOUNDS = (16, 1024)
#: Warps per program of both kernels.
NUM_WARPS = 4
#: Under TRITON_INTERPRET=1 (tests on CPU): narrow tiles, one warp, so that several tiles are visited.
INTERPRETER_BLOCK_K = 32


@triton.jit
def _load_scaled(ptr, rows, row_ok, ks, k_ok, stride_row, stride_k, scale, ACC: tl.constexpr):
    """(R, BLOCK_K) tile of ``rows`` at columns ``ks`` times ``scale``, in ACC; 0 where masked."""
    x = tl.load(
        ptr + rows[:, None] * stride_row + ks[None, :].to(tl.int64) * stride_k,
        mask=row_ok[:, None] & k_ok[None, :], other=0.0,
    )
    return x.to(ACC) * scale


@triton.jit
def _online_logsumexp(x, k_ok, row_max, row_sum):
    """Fold one tile into per-row (max, sum exp(x - max)) states."""
    x = tl.where(k_ok[None, :], x, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(x, axis=1))
    shift = _finite_shift(new_max)
    row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return new_max, row_sum


@triton.jit
def _finite_shift(row_max):
    """The running max, or 0 while a row has seen only -inf (masked prototypes, say).

    Shifting by -inf would give exp(-inf - -inf) = NaN; shifting by 0 gives exp(-inf) = 0, the
    right (empty) sum. One select per row, not per element.
    """
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _store_student_stats(s_max_ptr, s_sum_ptr, split, n_crops, B, b, crops, crops_ok, row_max, row_sum):
    """One crop block's per-(split, crop, sample) running max and sum into the (splits, crops, B) workspace."""
    stat = (split.to(tl.int64) * n_crops + crops) * B + b
    tl.store(s_max_ptr + stat, row_max, mask=crops_ok)
    tl.store(s_sum_ptr + stat, row_sum, mask=crops_ok)


@triton.jit
def _dino_forward_kernel(
    student_ptr, teacher_ptr, center_ptr,
    inv_student_temp_hi, inv_student_temp_lo, inv_teacher_temp_hi, inv_teacher_temp_lo,
    s_max_ptr, s_sum_ptr, t_max_ptr, t_sum_ptr, t_dot_ptr,
    B, K, n_crops, n_global, k_per_split,
    stride_s_row, stride_s_k, stride_t_row, stride_t_k, stride_c,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L1: tl.constexpr, BLOCK_L2: tl.constexpr,
    BLOCK_L3: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    # 64-bit offsets: split * k_per_split and the (splits, crops, B) workspace index are bounded by
    # K and the workspace size only through the launcher; int64 makes that hold by type.
    k_begin = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    inv_student_temp = tl.cast(inv_student_temp_hi, ACC) + tl.cast(inv_student_temp_lo, ACC)
    inv_teacher_temp = tl.cast(inv_teacher_temp_hi, ACC) + tl.cast(inv_teacher_temp_lo, ACC)

    # Global block: teacher crop i and student crop i (the same view) share row i.
    g = tl.arange(0, BLOCK_G)
    g_ok = g < n_global
    g_rows = (g * B + b).to(tl.int64)
    g_max = tl.full((BLOCK_G,), float("-inf"), ACC)
    g_sum = tl.zeros((BLOCK_G,), ACC)
    t_max = tl.full((BLOCK_G,), float("-inf"), ACC)
    t_sum = tl.zeros((BLOCK_G,), ACC)
    t_dot = tl.zeros((BLOCK_G,), ACC)
    # Local blocks (constexpr-absent when their size is 0): crops n_global + offset + arange.
    if BLOCK_L1 > 0:
        l1 = n_global + tl.arange(0, BLOCK_L1)
        l1_ok = l1 < n_crops
        l1_rows = (l1 * B + b).to(tl.int64)
        l1_max = tl.full((BLOCK_L1,), float("-inf"), ACC)
        l1_sum = tl.zeros((BLOCK_L1,), ACC)
    if BLOCK_L2 > 0:
        l2 = n_global + BLOCK_L1 + tl.arange(0, BLOCK_L2)
        l2_ok = l2 < n_crops
        l2_rows = (l2 * B + b).to(tl.int64)
        l2_max = tl.full((BLOCK_L2,), float("-inf"), ACC)
        l2_sum = tl.zeros((BLOCK_L2,), ACC)
    if BLOCK_L3 > 0:
        l3 = n_global + BLOCK_L1 + BLOCK_L2 + tl.arange(0, BLOCK_L3)
        l3_ok = l3 < n_crops
        l3_rows = (l3 * B + b).to(tl.int64)
        l3_max = tl.full((BLOCK_L3,), float("-inf"), ACC)
        l3_sum = tl.zeros((BLOCK_L3,), ACC)

    for k0 in tl.range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        xg = _load_scaled(student_ptr, g_rows, g_ok, ks, k_ok, stride_s_row, stride_s_k, inv_student_temp, ACC)
        g_max, g_sum = _online_logsumexp(xg, k_ok, g_max, g_sum)
        # Masked rows and columns were loaded as 0: they add nothing to the column sum.
        column_sum = tl.sum(xg, axis=0)
        if BLOCK_L1 > 0:
            x1 = _load_scaled(student_ptr, l1_rows, l1_ok, ks, k_ok, stride_s_row, stride_s_k, inv_student_temp, ACC)
            l1_max, l1_sum = _online_logsumexp(x1, k_ok, l1_max, l1_sum)
            column_sum += tl.sum(x1, axis=0)
        if BLOCK_L2 > 0:
            x2 = _load_scaled(student_ptr, l2_rows, l2_ok, ks, k_ok, stride_s_row, stride_s_k, inv_student_temp, ACC)
            l2_max, l2_sum = _online_logsumexp(x2, k_ok, l2_max, l2_sum)
            column_sum += tl.sum(x2, axis=0)
        if BLOCK_L3 > 0:
            x3 = _load_scaled(student_ptr, l3_rows, l3_ok, ks, k_ok, stride_s_row, stride_s_k, inv_student_temp, ACC)
            l3_max, l3_sum = _online_logsumexp(x3, k_ok, l3_max, l3_sum)
            column_sum += tl.sum(x3, axis=0)

        c = tl.load(center_ptr + ks.to(tl.int64) * stride_c, mask=k_ok, other=0.0).to(ACC)
        t = tl.load(
            teacher_ptr + g_rows[:, None] * stride_t_row + ks[None, :].to(tl.int64) * stride_t_k,
            mask=g_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(ACC)
        a = tl.where(k_ok[None, :], (t - c[None, :]) * inv_teacher_temp, float("-inf"))
        # Row i: the sum of the student crops paired with teacher crop i (all but crop i).
        paired = column_sum[None, :] - xg
        t_new_max = tl.maximum(t_max, tl.max(a, axis=1))
        t_shift = _finite_shift(t_new_max)
        rescale = tl.exp(t_max - t_shift)
        e = tl.exp(a - t_shift[:, None])
        t_sum = t_sum * rescale + tl.sum(e, axis=1)
        t_dot = t_dot * rescale + tl.sum(e * paired, axis=1)
        t_max = t_new_max

    _store_student_stats(s_max_ptr, s_sum_ptr, split, n_crops, B, b, g, g_ok, g_max, g_sum)
    if BLOCK_L1 > 0:
        _store_student_stats(s_max_ptr, s_sum_ptr, split, n_crops, B, b, l1, l1_ok, l1_max, l1_sum)
    if BLOCK_L2 > 0:
        _store_student_stats(s_max_ptr, s_sum_ptr, split, n_crops, B, b, l2, l2_ok, l2_max, l2_sum)
    if BLOCK_L3 > 0:
        _store_student_stats(s_max_ptr, s_sum_ptr, split, n_crops, B, b, l3, l3_ok, l3_max, l3_sum)
    stat = (split.to(tl.int64) * n_global + g) * B + b
    tl.store(t_max_ptr + stat, t_max, mask=g_ok)
    tl.store(t_sum_ptr + stat, t_sum, mask=g_ok)
    tl.store(t_dot_ptr + stat, t_dot, mask=g_ok)


@triton.jit
def _write_student_grad(
    student_ptr, grad_ptr, s_lse_ptr, crops, crop_ok, B, b, ks, k_ok,
    stride_s_row, stride_s_k, stride_g_row, stride_g_k, inv_student_temp, coef, n_targets, target,
    ACC: tl.constexpr,
):
    """grad = coef * (n_targets softmax(x) - target) for the rows of ``crops``, stored in grad's dtype."""
    rows = (crops * B + b).to(tl.int64)
    ok = crop_ok[:, None] & k_ok[None, :]
    x = tl.load(
        student_ptr + rows[:, None] * stride_s_row + ks[None, :].to(tl.int64) * stride_s_k, mask=ok, other=0.0,
    ).to(ACC)
    lse = tl.load(s_lse_ptr + crops * B + b, mask=crop_ok, other=0.0).to(ACC)
    # Masked lanes go through exp(-inf) = 0 rather than exp of garbage.
    q = tl.exp(tl.where(ok, x * inv_student_temp - lse[:, None], float("-inf")))
    grad = coef * (n_targets * q - target)
    tl.store(
        grad_ptr + rows[:, None] * stride_g_row + ks[None, :].to(tl.int64) * stride_g_k,
        grad.to(grad_ptr.dtype.element_ty), mask=ok,
    )


@triton.jit
def _dino_backward_kernel(
    student_ptr, teacher_ptr, center_ptr, coef_ptr, s_lse_ptr, t_lse_ptr, grad_ptr,
    inv_student_temp_hi, inv_student_temp_lo, inv_teacher_temp_hi, inv_teacher_temp_lo,
    B, K, n_crops, n_global,
    stride_s_row, stride_s_k, stride_t_row, stride_t_k, stride_c, stride_g_row, stride_g_k,
    ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L1: tl.constexpr, BLOCK_L2: tl.constexpr,
    BLOCK_L3: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    inv_student_temp = tl.cast(inv_student_temp_hi, ACC) + tl.cast(inv_student_temp_lo, ACC)
    inv_teacher_temp = tl.cast(inv_teacher_temp_hi, ACC) + tl.cast(inv_teacher_temp_lo, ACC)
    coef = tl.load(coef_ptr).to(ACC)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < n_global
    g_rows = (g * B + b).to(tl.int64)
    teacher_ok = g_ok[:, None] & k_ok[None, :]
    c = tl.load(center_ptr + ks.to(tl.int64) * stride_c, mask=k_ok, other=0.0).to(ACC)
    t = tl.load(
        teacher_ptr + g_rows[:, None] * stride_t_row + ks[None, :].to(tl.int64) * stride_t_k,
        mask=teacher_ok, other=0.0,
    ).to(ACC)
    t_lse = tl.load(t_lse_ptr + g * B + b, mask=g_ok, other=0.0).to(ACC)
    p = tl.exp(tl.where(teacher_ok, (t - c[None, :]) * inv_teacher_temp - t_lse[:, None], float("-inf")))
    p_total = tl.sum(p, axis=0)[None, :]

    # A global crop pairs with the other n_global - 1 teacher crops; a local crop with all of them.
    _write_student_grad(
        student_ptr, grad_ptr, s_lse_ptr, g, g_ok, B, b, ks, k_ok, stride_s_row, stride_s_k,
        stride_g_row, stride_g_k, inv_student_temp, coef, n_global - 1.0, p_total - p, ACC,
    )
    if BLOCK_L1 > 0:
        l1 = n_global + tl.arange(0, BLOCK_L1)
        _write_student_grad(
            student_ptr, grad_ptr, s_lse_ptr, l1, l1 < n_crops, B, b, ks, k_ok, stride_s_row, stride_s_k,
            stride_g_row, stride_g_k, inv_student_temp, coef, n_global + 0.0, p_total, ACC,
        )
    if BLOCK_L2 > 0:
        l2 = n_global + BLOCK_L1 + tl.arange(0, BLOCK_L2)
        _write_student_grad(
            student_ptr, grad_ptr, s_lse_ptr, l2, l2 < n_crops, B, b, ks, k_ok, stride_s_row, stride_s_k,
            stride_g_row, stride_g_k, inv_student_temp, coef, n_global + 0.0, p_total, ACC,
        )
    if BLOCK_L3 > 0:
        l3 = n_global + BLOCK_L1 + BLOCK_L2 + tl.arange(0, BLOCK_L3)
        _write_student_grad(
            student_ptr, grad_ptr, s_lse_ptr, l3, l3 < n_crops, B, b, ks, k_ok, stride_s_row, stride_s_k,
            stride_g_row, stride_g_k, inv_student_temp, coef, n_global + 0.0, p_total, ACC,
        )


class LaunchConfig(NamedTuple):
    """Constexprs and warps of one launch of either kernel."""

    block_g: int  # rows of the global block (teacher crops and the student's global crops)
    block_local: tuple[int, int, int]  # rows of the three local blocks, 0 = absent
    block_k: int
    num_warps: int

    def constexprs(self) -> dict[str, int]:
        l1, l2, l3 = self.block_local
        return {"BLOCK_G": self.block_g, "BLOCK_L1": l1, "BLOCK_L2": l2, "BLOCK_L3": l3, "BLOCK_K": self.block_k}


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def crop_blocks(n_crops: int, n_global: int) -> tuple[int, tuple[int, int, int]]:
    """Power-of-two row blocks covering the crops: (global block, three local blocks, 0 = absent).

    The global block is ``next_pow2(n_global)``; the local crops take the binary digits of
    ``n_local = n_crops - n_global``, largest first, the third block rounded up to cover the rest.
    DINO's 2 + 6, 2 + 8 and 2 + 10 crops fill every row: (2, (4, 2, 0)), (2, (8, 0, 0)), (2, (8, 2, 0)).
    """
    block_g = next_power_of_2(n_global)
    rest = n_crops - n_global
    local: list[int] = []
    while rest > 0 and len(local) < 3:
        size = next_power_of_2(rest) if len(local) == 2 else _floor_power_of_2(rest)
        local.append(size)
        rest -= size
    local += [0] * (3 - len(local))
    return block_g, (local[0], local[1], local[2])


def launch_config(n_crops: int, n_global: int, *, interpreter: bool | None = None) -> LaunchConfig:
    """Tiling of both kernels for these crop counts (the compiled one, or the interpreter's)."""
    block_g, block_local = crop_blocks(n_crops, n_global)
    if triton_interpreter_enabled() if interpreter is None else interpreter:
        return LaunchConfig(block_g, block_local, INTERPRETER_BLOCK_K, 1)
    # Teacher rows and the student's global rows, then the local rows.
    rows = 2 * block_g + sum(block_local)
    low, high = BLOCK_K_BOUNDS
    block_k = max(low, min(high, _floor_power_of_2(max(TILE_ELEMENTS // rows, 1))))
    return LaunchConfig(block_g, block_local, block_k, NUM_WARPS)


def _num_splits(batch: int, k: int, block_k: int, device: torch.device) -> int:
    """K-splits per sample for the forward, so that small batches still fill the GPU."""
    tiles = cdiv(k, block_k)
    if triton_interpreter_enabled() or device.type != "cuda":
        return min(tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, cdiv(4 * sms, batch)))


def dino_loss_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    n_global: int,
    student_temp: float,
    teacher_temp: float,
    *,
    block_k: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward; same contract as :func:`torchfg.ops.dino.reference.dino_loss_reference`.

    ``block_k`` and ``num_splits`` override the tiling (tests use them to cover several splits).
    """
    acc = dino_accumulation_dtype(student, teacher)
    device = student.device
    k = student.shape[1]
    batch = student.shape[0] // n_crops
    config = launch_config(n_crops, n_global)
    if block_k:
        config = config._replace(block_k=block_k)
    splits = num_splits or _num_splits(batch, k, config.block_k, device)
    # Whole tiles per split, so that every split starts inside [0, K) and holds a valid column.
    k_per_split = cdiv(cdiv(k, splits), config.block_k) * config.block_k
    splits = cdiv(k, k_per_split)

    s_max = torch.empty(splits, n_crops, batch, dtype=acc, device=device)
    s_sum = torch.empty(splits, n_crops, batch, dtype=acc, device=device)
    t_max = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    t_sum = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    t_dot = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    _dino_forward_kernel[(batch, splits)](
        student, teacher, center, *_inverse_temperatures(student_temp, teacher_temp),
        s_max, s_sum, t_max, t_sum, t_dot,
        batch, k, n_crops, n_global, k_per_split,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), center.stride(0),
        ACC=_TL_ACC[acc], num_warps=config.num_warps, **config.constexprs(), **LAUNCH_OPTIONS,
    )
    student_lse = _merge_logsumexp(s_max, s_sum)
    t_row_max = t_max.amax(dim=0)
    t_rescale = torch.exp(t_max - t_row_max)
    t_norm = (t_sum * t_rescale).sum(dim=0)
    teacher_lse = t_row_max + torch.log(t_norm)
    # sum over pairs of <p_i, x_v> = sum_i <p_i, sum_{v != i} x_v>
    paired_dot = ((t_dot * t_rescale).sum(dim=0) / t_norm).sum()
    n_targets = torch.full((n_crops, 1), float(n_global), dtype=acc, device=device)
    n_targets[:n_global] -= 1
    total = (n_targets * student_lse).sum() - paired_dot
    # Two large, nearly equal fp32 sums (each ~ the largest logit / student_temp per pair): their
    # difference carries an absolute error of about eps times that, and must not go below 0, the
    # least a cross-entropy can be. The gradient does not go through this difference.
    loss = (total / (n_pairs(n_crops, n_global) * batch)).clamp_min_(0.0)
    return loss, student_lse.reshape(-1), teacher_lse.reshape(-1)


def _inverse_temperatures(student_temp: float, teacher_temp: float) -> tuple[float, float, float, float]:
    """1 / student_temp and 1 / teacher_temp as kernel arguments, each a (hi, lo) fp32 pair
    (:func:`split_scalar`: fp64 kernels rebuild the fp64 value). They were a device tensor built
    from Python floats: a host-to-device copy of pageable memory, which synchronises the host with
    the GPU on every forward and backward (and cannot be captured in a CUDA graph)."""
    return (*split_scalar(1.0 / student_temp), *split_scalar(1.0 / teacher_temp))


def _merge_logsumexp(row_max: torch.Tensor, row_sum: torch.Tensor) -> torch.Tensor:
    """Merge per-split (max, sum exp(x - max)) states along dim 0 into log-sum-exps."""
    merged_max = row_max.amax(dim=0)
    return merged_max + torch.log((row_sum * torch.exp(row_max - merged_max)).sum(dim=0))


def dino_loss_backward_triton(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_lse: torch.Tensor,
    teacher_lse: torch.Tensor,
    n_crops: int,
    n_global: int,
    student_temp: float,
    teacher_temp: float,
    *,
    block_k: int | None = None,
) -> torch.Tensor:
    """Triton backward: d loss / d student (n_crops * B, K) in the student's dtype."""
    acc = dino_accumulation_dtype(student, teacher)
    device = student.device
    k = student.shape[1]
    batch = student.shape[0] // n_crops
    config = launch_config(n_crops, n_global)
    if block_k:
        config = config._replace(block_k=block_k)
    # On the kernel's device whatever the caller passed (a CPU scalar upstream gradient too).
    coef = grad_loss.to(device=device, dtype=acc).reshape(1) / (n_pairs(n_crops, n_global) * batch * student_temp)
    grad = torch.empty(student.shape, dtype=student.dtype, device=device)
    _dino_backward_kernel[(batch, cdiv(k, config.block_k))](
        student, teacher, center, coef, student_lse, teacher_lse, grad,
        *_inverse_temperatures(student_temp, teacher_temp),
        batch, k, n_crops, n_global,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), center.stride(0),
        grad.stride(0), grad.stride(1),
        ACC=_TL_ACC[acc], num_warps=config.num_warps, **config.constexprs(), **LAUNCH_OPTIONS,
    )
    return grad
