"""Pure-PyTorch DINO cross-entropy over crop pairs: the ground truth and the CPU path.

Layout (crop-major, as in the original method): student logits ``s`` are (n_crops * B, K) with
crop ``v`` of sample ``b`` in row ``v * B + b``; teacher logits ``t`` are (n_global * B, K), and
teacher crop ``i`` is the same view as student crop ``i`` (the global crops come first).

With ``p_i = softmax((t_i - center) / teacher_temp)`` and ``log q_v = log_softmax(s_v / student_temp)``
the loss is the mean over the ``n_pairs = n_global * (n_crops - 1)`` ordered pairs (i, v), v != i,
of the batch mean of ``-sum_k p_i log q_v``. Grouping the pairs by student crop,

    loss = 1 / (n_pairs B) * sum_v sum_b -<P_v[b], log q_v[b]>,   P_v = sum_{i != v} p_i
    P_v  = P - p_v  for v < n_global,   P otherwise,                 P = sum_i p_i

so the teacher probabilities are summed once into ``P`` (B, K) and no (n_crops x n_global x B x K)
pairing is ever built; the work is one pass over the crops with O(B K) fp32 temporaries. The
gradient follows from ``sum_k P_v = n_targets(v)``:

    d loss / d s_v = (n_targets(v) softmax(s_v / student_temp) - P_v) / (n_pairs B student_temp)

where ``n_targets(v) = n_global - [v < n_global]`` is how many teacher crops pair with crop v.
All math is fp32 (fp64 when an input is fp64) whatever the input dtype.
"""

from __future__ import annotations

import torch

from torchfg._validation import accumulation_dtype

__all__ = ["dino_loss_reference", "dino_loss_backward_reference", "n_pairs", "dino_accumulation_dtype"]


def n_pairs(n_crops: int, n_global: int) -> int:
    """Number of ordered (teacher crop, student crop) pairs with different views."""
    return n_global * (n_crops - 1)


def dino_accumulation_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """fp64 when either input is fp64, fp32 otherwise."""
    if torch.float64 in (student.dtype, teacher.dtype):
        return torch.float64
    return accumulation_dtype(student.dtype)


def _log_normaliser(logits: torch.Tensor, row_max_prob: torch.Tensor) -> torch.Tensor:
    """logsumexp per row from the row maximum of the logits and of the probabilities.

    ``max p = exp(max x - lse)`` lies in [1/K, 1], so ``lse = max x - log(max p)`` is exact to a few
    ulps of ``log K`` and costs no extra pass of exp (slow on CPUs for very negative arguments).
    """
    return logits.amax(dim=-1) - row_max_prob.log()


def _teacher_probs(teacher_crop: torch.Tensor, center: torch.Tensor, teacher_temp: float, acc: torch.dtype):
    """(B, K) probabilities of one teacher crop and the (B,) log-normalisers of its logits."""
    logits = (teacher_crop.to(acc) - center) / teacher_temp
    probs = torch.softmax(logits, dim=-1)
    return probs, _log_normaliser(logits, probs.amax(dim=-1))


def _teacher_sum(
    teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """P = sum_i p_i (B, K) and the teacher log-normalisers (n_global, B)."""
    n_global, batch, k = teacher.shape
    lse = torch.empty(n_global, batch, dtype=acc, device=teacher.device)
    prob_sum = torch.zeros(batch, k, dtype=acc, device=teacher.device)
    for i in range(n_global):
        probs, lse[i] = _teacher_probs(teacher[i], center, teacher_temp, acc)
        prob_sum += probs
    return prob_sum, lse


def _target(
    prob_sum: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float, v: int, acc: torch.dtype
) -> torch.Tensor:
    """P_v: the teacher probabilities summed over the crops that pair with student crop v."""
    if v < teacher.shape[0]:
        # Recomputed rather than kept: n_global extra softmaxes instead of n_global (B, K) buffers.
        return prob_sum - _teacher_probs(teacher[v], center, teacher_temp, acc)[0]
    return prob_sum


def dino_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    n_global: int,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward. Inputs as in the module docstring, already validated.

    Returns:
        loss: 0-dim, in the accumulation dtype (fp32; fp64 if an input is fp64).
        student_lse: (n_crops * B,) logsumexp of ``s / student_temp`` per row, accumulation dtype.
        teacher_lse: (n_global * B,) logsumexp of ``(t - center) / teacher_temp`` per row.
    """
    acc = dino_accumulation_dtype(student, teacher)
    k = student.shape[1]
    batch = student.shape[0] // n_crops
    s = student.reshape(n_crops, batch, k)
    t = teacher.reshape(n_global, batch, k)
    c = center.to(acc)
    prob_sum, teacher_lse = _teacher_sum(t, c, teacher_temp, acc)
    student_lse = torch.empty(n_crops, batch, dtype=acc, device=student.device)
    total = torch.zeros((), dtype=acc, device=student.device)
    for v in range(n_crops):
        logits = s[v].to(acc) / student_temp
        log_q = torch.log_softmax(logits, dim=-1)
        # max log_q = max x - lse exactly up to the rounding of a number of size <= log K.
        student_lse[v] = logits.amax(dim=-1) - log_q.amax(dim=-1)
        del logits
        target = _target(prob_sum, t, c, teacher_temp, v, acc)
        # A dot product, not (target * log_q).sum(): no third (B, K) temporary.
        total -= torch.dot(target.reshape(-1), log_q.reshape(-1))
    loss = total / (n_pairs(n_crops, n_global) * batch)
    return loss, student_lse.reshape(-1), teacher_lse.reshape(-1)


def dino_loss_backward_reference(
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
) -> torch.Tensor:
    """d loss / d student (n_crops * B, K) in the student's dtype.

    The row statistics are accepted for a uniform signature with the fused backward; the reference
    recomputes the softmaxes instead.
    """
    acc = dino_accumulation_dtype(student, teacher)
    k = student.shape[1]
    batch = student.shape[0] // n_crops
    s = student.reshape(n_crops, batch, k)
    t = teacher.reshape(n_global, batch, k)
    c = center.to(acc)
    coef = grad_loss.to(acc) / (n_pairs(n_crops, n_global) * batch * student_temp)
    # softmax kernels are faster on CPUs than exp(x - lse) from the saved statistics, which only
    # the fused backward needs.
    prob_sum, _ = _teacher_sum(t, c, teacher_temp, acc)
    grad = torch.empty(n_crops, batch, k, dtype=student.dtype, device=student.device)
    for v in range(n_crops):
        n_targets = n_global - (1 if v < n_global else 0)
        q = torch.softmax(s[v].to(acc) / student_temp, dim=-1)
        target = _target(prob_sum, t, c, teacher_temp, v, acc)
        grad[v] = q.mul_(n_targets).sub_(target).mul_(coef)
    return grad.reshape(n_crops * batch, k)
