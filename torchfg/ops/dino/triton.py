"""Fused Triton forward and backward for the DINO cross-entropy over crop pairs.

Forward (grid: samples x K-splits). A program owns sample ``b`` and one contiguous range of the
K axis, and streams it in (BLOCK_C x BLOCK_K) tiles holding every crop of that sample at once:
row v of a tile is student crop v, and the same row of the teacher tile is teacher crop v (rows
>= n_global masked off). In that single pass it keeps, per row, online-softmax states:

* student: running max ``m`` and ``sum exp(x - m)`` of ``x = s / student_temp``;
* teacher: running max and sum of ``a = (t - center) / teacher_temp``, and the running
  ``sum exp(a - m) * (S - s_i) / student_temp`` where ``S`` is the sum of all student crops, i.e.
  the unnormalised dot of teacher crop i with every student crop it is paired with.

The launcher merges the per-split states (small: splits x crops x B) into the row log-sum-exps and
the loss, using ``-sum_k p_i log q_v = lse_v - <p_i, x_v>``. Nothing of size (crops x B x K) is
allocated in the forward.

Backward (grid: samples x K-tiles). With the saved row log-sum-exps the teacher probabilities and
the student softmax are recomputed tile by tile, and the student gradient is written directly:
``grad_v = coef * (n_targets(v) softmax(x_v) - (P - p_v [v < n_global]))``, ``P = sum_i p_i``;
that gradient is the only (crops x B x K) buffer. Inputs of any float dtype are upcast after
every load; the math is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops.dino.reference import dino_accumulation_dtype, n_pairs

__all__ = ["dino_loss_triton", "dino_loss_backward_triton"]

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _dino_forward_kernel(
    student_ptr, teacher_ptr, center_ptr, scalars_ptr,
    s_max_ptr, s_sum_ptr, t_max_ptr, t_sum_ptr, t_dot_ptr,
    B, K, n_crops, n_global, k_per_split,
    stride_s_row, stride_s_k, stride_t_row, stride_t_k, stride_c,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    # 64-bit offsets: split * k_per_split and the (splits, crops, B) workspace index are bounded by
    # K and the workspace size only through the launcher; int64 makes that hold by type.
    k_begin = split.to(tl.int64) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    inv_student_temp = tl.load(scalars_ptr).to(ACC)
    inv_teacher_temp = tl.load(scalars_ptr + 1).to(ACC)

    crops = tl.arange(0, BLOCK_C)
    is_crop = crops < n_crops
    is_global = crops < n_global
    rows = (crops * B + b).to(tl.int64)
    s_row_ptr = student_ptr + rows * stride_s_row
    t_row_ptr = teacher_ptr + rows * stride_t_row

    s_max = tl.full((BLOCK_C,), float("-inf"), ACC)
    s_sum = tl.zeros((BLOCK_C,), ACC)
    t_max = tl.full((BLOCK_C,), float("-inf"), ACC)
    t_sum = tl.zeros((BLOCK_C,), ACC)
    t_dot = tl.zeros((BLOCK_C,), ACC)
    for k0 in tl.range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        # Every tile holds at least one valid column, so the running maxima are finite after the
        # first tile and exp(old_max - new_max) never sees -inf - -inf.
        x = tl.load(
            s_row_ptr[:, None] + ks[None, :].to(tl.int64) * stride_s_k,
            mask=is_crop[:, None] & k_ok[None, :], other=0.0,
        ).to(ACC) * inv_student_temp
        x_masked = tl.where(k_ok[None, :], x, float("-inf"))
        s_new_max = tl.maximum(s_max, tl.max(x_masked, axis=1))
        s_sum = s_sum * tl.exp(s_max - s_new_max) + tl.sum(tl.exp(x_masked - s_new_max[:, None]), axis=1)
        s_max = s_new_max

        c = tl.load(center_ptr + ks.to(tl.int64) * stride_c, mask=k_ok, other=0.0).to(ACC)
        t = tl.load(
            t_row_ptr[:, None] + ks[None, :].to(tl.int64) * stride_t_k,
            mask=is_global[:, None] & k_ok[None, :], other=0.0,
        ).to(ACC)
        a = tl.where(k_ok[None, :], (t - c[None, :]) * inv_teacher_temp, float("-inf"))
        # Row i: the sum of the student crops paired with teacher crop i (all but crop i).
        paired = tl.sum(x, axis=0)[None, :] - x
        t_new_max = tl.maximum(t_max, tl.max(a, axis=1))
        rescale = tl.exp(t_max - t_new_max)
        e = tl.exp(a - t_new_max[:, None])
        t_sum = t_sum * rescale + tl.sum(e, axis=1)
        t_dot = t_dot * rescale + tl.sum(e * paired, axis=1)
        t_max = t_new_max

    stat = (split.to(tl.int64) * n_crops + crops) * B + b
    tl.store(s_max_ptr + stat, s_max, mask=is_crop)
    tl.store(s_sum_ptr + stat, s_sum, mask=is_crop)
    stat = (split.to(tl.int64) * n_global + crops) * B + b
    tl.store(t_max_ptr + stat, t_max, mask=is_global)
    tl.store(t_sum_ptr + stat, t_sum, mask=is_global)
    tl.store(t_dot_ptr + stat, t_dot, mask=is_global)


@triton.jit
def _dino_backward_kernel(
    student_ptr, teacher_ptr, center_ptr, scalars_ptr, s_lse_ptr, t_lse_ptr, grad_ptr,
    B, K, n_crops, n_global,
    stride_s_row, stride_s_k, stride_t_row, stride_t_k, stride_c, stride_g_row, stride_g_k,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    inv_student_temp = tl.load(scalars_ptr).to(ACC)
    inv_teacher_temp = tl.load(scalars_ptr + 1).to(ACC)
    coef = tl.load(scalars_ptr + 2).to(ACC)

    crops = tl.arange(0, BLOCK_C)
    is_crop = crops < n_crops
    is_global = crops < n_global
    rows = (crops * B + b).to(tl.int64)
    k64 = ks[None, :].to(tl.int64)

    c = tl.load(center_ptr + ks.to(tl.int64) * stride_c, mask=k_ok, other=0.0).to(ACC)
    t = tl.load(
        teacher_ptr + rows[:, None] * stride_t_row + k64 * stride_t_k,
        mask=is_global[:, None] & k_ok[None, :], other=0.0,
    ).to(ACC)
    t_lse = tl.load(t_lse_ptr + crops * B + b, mask=is_global, other=0.0).to(ACC)
    teacher_ok = is_global[:, None] & k_ok[None, :]
    # Masked lanes go through exp(-inf) = 0 rather than exp of garbage.
    p = tl.exp(tl.where(teacher_ok, (t - c[None, :]) * inv_teacher_temp - t_lse[:, None], float("-inf")))
    p_total = tl.sum(p, axis=0)

    student_ok = is_crop[:, None] & k_ok[None, :]
    x = tl.load(
        student_ptr + rows[:, None] * stride_s_row + k64 * stride_s_k, mask=student_ok, other=0.0,
    ).to(ACC)
    s_lse = tl.load(s_lse_ptr + crops * B + b, mask=is_crop, other=0.0).to(ACC)
    q = tl.exp(tl.where(student_ok, x * inv_student_temp - s_lse[:, None], float("-inf")))
    n_targets = (n_global - is_global.to(tl.int32)).to(ACC)
    grad = coef * (n_targets[:, None] * q - (p_total[None, :] - p))
    tl.store(
        grad_ptr + rows[:, None] * stride_g_row + k64 * stride_g_k,
        grad.to(grad_ptr.dtype.element_ty),
        mask=student_ok,
    )


def _block_sizes(n_crops: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_K, num_warps): every crop of a sample in one tile of ~2K elements."""
    block_c = max(triton.next_power_of_2(n_crops), 2)
    if triton_interpreter_enabled():
        return block_c, 32, 1
    block_k = max(16, min(1024, 2048 // block_c))
    return block_c, block_k, 4


def _num_splits(batch: int, k: int, block_k: int, device: torch.device) -> int:
    """K-splits per sample for the forward, so that small batches still fill the GPU."""
    tiles = triton.cdiv(k, block_k)
    if triton_interpreter_enabled() or device.type != "cuda":
        return min(tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(4 * sms, batch)))


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
    block_c, default_block_k, num_warps = _block_sizes(n_crops)
    block_k = block_k or default_block_k
    splits = num_splits or _num_splits(batch, k, block_k, device)
    # Whole tiles per split, so that every split starts inside [0, K) and holds a valid column.
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)

    scalars = torch.tensor([1.0 / student_temp, 1.0 / teacher_temp], dtype=acc, device=device)
    s_max = torch.empty(splits, n_crops, batch, dtype=acc, device=device)
    s_sum = torch.empty(splits, n_crops, batch, dtype=acc, device=device)
    t_max = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    t_sum = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    t_dot = torch.empty(splits, n_global, batch, dtype=acc, device=device)
    _dino_forward_kernel[(batch, splits)](
        student, teacher, center, scalars,
        s_max, s_sum, t_max, t_sum, t_dot,
        batch, k, n_crops, n_global, k_per_split,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), center.stride(0),
        ACC=_TL_ACC[acc], BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
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
    loss = total / (n_pairs(n_crops, n_global) * batch)
    return loss.to(student.dtype), student_lse.reshape(-1), teacher_lse.reshape(-1)


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
    block_c, default_block_k, num_warps = _block_sizes(n_crops)
    block_k = block_k or default_block_k
    coef = grad_loss.to(acc).reshape(1) / (n_pairs(n_crops, n_global) * batch * student_temp)
    scalars = torch.cat(
        [torch.tensor([1.0 / student_temp, 1.0 / teacher_temp], dtype=acc, device=device), coef]
    )
    grad = torch.empty(student.shape, dtype=student.dtype, device=device)
    _dino_backward_kernel[(batch, triton.cdiv(k, block_k))](
        student, teacher, center, scalars, student_lse, teacher_lse, grad,
        batch, k, n_crops, n_global,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), center.stride(0),
        grad.stride(0), grad.stride(1),
        ACC=_TL_ACC[acc], BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps,
    )
    return grad
