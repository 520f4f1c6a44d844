"""Input checks shared by every public function: each error names the argument."""

from __future__ import annotations

import numbers
import operator
import os
from typing import Iterable, SupportsIndex, cast

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x: object, name: str, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """A floating-point tensor, optionally with an exact or a minimum number of dims."""
    x = check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    return x


def check_labels(labels: object, name: str, n: int | None = None, *, device: torch.device | None = None) -> torch.Tensor:
    """1-D integer labels (of length ``n`` when given); moved to ``device`` when given."""
    labels = check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (one per embedding), got {labels.shape[0]}")
    if device is not None and labels.device != device:
        labels = labels.to(device)
    return labels


def mining_labels(labels: torch.Tensor) -> torch.Tensor:
    """Checked labels in the dtype the mining kernels take: int32 as they are (one 32-bit word per
    label, a single mining pass), any other integer type as int64."""
    return labels if labels.dtype == torch.int32 else labels.long()


def is_row_slice(rows: torch.Tensor, of: torch.Tensor, start: int) -> bool:
    """Whether ``rows`` (N > 0 rows) is ``of[start:start + N]`` in memory: the same storage, dtype,
    strides, and the storage offset of row ``start`` (no data pointers: fake tensors have none)."""
    n = rows.shape[0]
    return (n > 0 and 0 <= start and start + n <= of.shape[0] and rows.dtype == of.dtype
            and rows.stride() == of.stride()
            and rows.storage_offset() == of.storage_offset() + start * of.stride(0)
            and rows.untyped_storage()._cdata == of.untyped_storage()._cdata)


def check_same_device_dtype(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_row_sets(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str, *, size_name: str = "D") -> None:
    """Two sets of rows compared with each other: same device, dtype and row size (last dim)."""
    check_same_device_dtype(a, a_name, b, b_name)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature size {size_name}, got {a.shape[-1]} and {b.shape[-1]}"
        )


# Scalars meet fp32 arithmetic (half inputs accumulate in fp32, and Triton receives Python floats
# as fp32), so a finite argument must stay finite there: 1e39 would be a finite margin on the
# PyTorch fp64 path and inf in a kernel.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _finite(value) -> bool:
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is a
    # SymFloat, which math.isfinite cannot trace (fullgraph fails) and a comparison guards on.
    return -FLOAT32_MAX <= value <= FLOAT32_MAX


def check_positive(value: object, name: str, *, allow_zero: bool = False, reciprocal: bool = False) -> float:
    """``value`` as a finite Python float ``> 0`` (``>= 0`` with ``allow_zero``); with
    ``reciprocal`` (a temperature: the caller divides by it), ``1 / value`` must be finite in fp32."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or not _finite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite in float32 and {bound}, got {value!r}")
    if reciprocal and value < 1.0 / FLOAT32_MAX:
        raise ValueError(f"{name} must be >= {1.0 / FLOAT32_MAX:.3g} (1/{name} finite in float32), got {value!r}")
    return float(value)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int (numpy / index-like ints accepted, bool refused), a SymInt as is."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(value, (int, torch.SymInt)):
        # As it is: a size taken from a tensor's shape is a SymInt under torch.compile(dynamic=True)
        # (where it passes isinstance(int)) and under non-strict torch.export (where it does not),
        # and operator.index / int() would specialise it (a recompile per value, or an export
        # error for a dynamic dim); comparisons on it only guard. Typed int: a SymInt stands in for
        # one wherever the callers use it.
        return cast(int, value)
    try:
        # Anything without __index__ raises the TypeError handled below.
        return int(operator.index(cast(SupportsIndex, value)))
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_int(value: object, name: str, minimum: int = 0) -> int:
    """``value`` as a Python int ``>= minimum`` (numpy / index-like ints accepted, bool refused)."""
    value = as_int(value, name)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


_ENV_ON = ("1", "true", "yes", "on", "y")
_ENV_OFF = ("0", "false", "no", "off", "n")


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment variable ``name`` (case and surrounding spaces ignored; unset or
    empty: ``default``). Any other value is a ValueError naming the variable: a switch silently
    read the wrong way (``TORCHFG_CPU_KERNELS=disable`` kept the kernels on) is worse than none."""
    return parse_env_flag(name, os.environ.get(name, ""), default)


def parse_env_flag(name: str, raw: str, default: bool) -> bool:
    """:func:`env_flag` of the value ``raw`` of the variable ``name``."""
    value = raw.strip().lower()
    if not value:
        return default
    if value in _ENV_ON:
        return True
    if value in _ENV_OFF:
        return False
    raise ValueError(f"environment variable {name}={raw!r} must be one of {_ENV_ON} (on) or {_ENV_OFF} (off)")


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a Python float finite in fp32, optionally within ``[low, high]`` (bool refused).

    Any real number type: numpy scalars too (a margin read from a numpy config, as PML takes it).
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not _finite(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f" and in [{low}, {high}]"
        else:
            bounds = f" and >= {low}" if low is not None else f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be finite in float32{bounds}, got {value!r}")
    return value


def in_backward() -> bool:
    """Whether this thread is running an autograd backward pass: a forward that runs there is a
    recomputation (``torch.utils.checkpoint``, either mode), and a module that updates state in
    its forward would update it a second time or read the updated state."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1
