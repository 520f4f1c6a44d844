"""One TF32 policy for every kernel: fp32 operands use TF32 exactly where PyTorch's matmuls would.

The rule is PyTorch's own (torch >= 2.9): ``torch.backends.cuda.matmul.fp32_precision`` says
``"tf32"`` or ``"ieee"``; ``"none"`` defers to ``torch.backends.fp32_precision``, whose ``"none"``
means IEEE fp32. The legacy switches (``torch.backends.cuda.matmul.allow_tf32 = True``,
``torch.set_float32_matmul_precision("high")``) set that same state, so they are honoured too.
Older torch without the new API: ``torch.backends.cuda.matmul.allow_tf32``.

fp16/bf16 operands go to the tensor cores as they are and accumulate in fp32; fp64 stays fp64.
Triton's CPU interpreter computes in IEEE fp32 whatever the setting (it has no TF32).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["fp32_matmul_precision", "dot_operand_dtypes", "autocast_off"]

_F = TypeVar("_F", bound=Callable)


def fp32_matmul_precision() -> str:
    """``"tf32"`` or ``"ieee"``: how fp32 ``tl.dot`` operands are multiplied, following PyTorch."""
    try:
        setting = torch.backends.cuda.matmul.fp32_precision
        if setting == "none":
            # A property of torch.backends' module class (torch >= 2.9), which its stubs do not declare.
            setting = torch.backends.fp32_precision  # type: ignore[attr-defined]
    except AttributeError:  # torch < 2.9: only the legacy switch exists
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32" if setting == "tf32" else "ieee"


def dot_operand_dtypes(dtype: torch.dtype, *, interpreter: bool) -> tuple[torch.dtype, torch.dtype, str]:
    """(operand dtype fed to ``tl.dot``, accumulation dtype, input precision) for an input dtype.

    Under the interpreter half operands are upcast to fp32 after loading: it mishandles bf16
    arithmetic, and it has no TF32.
    """
    if dtype == torch.float64:
        return torch.float64, torch.float64, "ieee"
    if dtype in (torch.float16, torch.bfloat16):
        return (torch.float32 if interpreter else dtype), torch.float32, "ieee"
    return torch.float32, torch.float32, ("ieee" if interpreter else fp32_matmul_precision())


def _public_any_autocast_enabled() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


# One C call (~0.1 us, a third of the two public queries), which dynamo folds like those; the
# public queries where a torch lacks it.
_any_autocast_enabled: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", _public_any_autocast_enabled)


def autocast_off(fn: _F) -> _F:
    """Run ``fn`` with ``torch.autocast`` disabled (CPU and CUDA): torchfg's losses and ops compute
    in their inputs' dtypes with the accumulation rules above, inside or outside an autocast region.

    Autocast would otherwise recast the matmuls inside them: the PyTorch paths fed bf16 operands
    into fp32 ``out=`` buffers (an error) or lost the fp32 accumulation of fp32 inputs. Inputs are
    taken as they are, so a model's bf16 embeddings stay bf16 (16-bit operands, fp32 accumulation);
    like PyTorch's own losses under autocast, nothing runs in lower precision than the inputs.
    Outside autocast the wrapper only reads a flag.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast_enabled():
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
