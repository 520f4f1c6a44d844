"""Registration of torchfg's custom operators (``torch.ops.torchfg.*``).

``torch.library.custom_op`` would do, but in PyTorch 2.13 it wraps every kernel in
``torch._disable_dynamo``, whose first call imports ``torch._dynamo``: about 140 MiB of
resident memory and 1.5 s once per process, in eager training that never compiles (seven times
the memory of a steady triplet step at N = 4096 on the CPU). The ops are defined here with the
lower-level public API instead, as pytorch/extension-cpp does for C++ ops: the schema inferred
from the Python signature (``torch.library.infer_schema``, the same inference ``custom_op``
uses), the kernel registered with ``Library.impl`` for every device, and the fake and autograd
formulas with ``torch.library.register_fake`` / ``register_autograd``. Under ``torch.compile``
the ops are opaque graph nodes exactly as before (their fake kernels give the shapes).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["TorchfgOp", "custom_op", "python_kernel"]

_LIBRARY = torch.library.Library("torchfg", "FRAGMENT")
_KERNELS: dict[str, Callable[..., Any]] = {}


class TorchfgOp:
    """One ``torch.ops.torchfg`` operator: call it like the function it was defined from."""

    def __init__(self, name: str, kernel: Callable[..., Any]) -> None:
        schema = torch.library.infer_schema(kernel, mutates_args=())
        _LIBRARY.define(name + schema)
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        self.qualname = f"torchfg::{name}"
        _KERNELS[self.qualname] = kernel
        self._overload = getattr(torch.ops.torchfg, name).default
        functools.update_wrapper(self, kernel)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._overload(*args, **kwargs)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: the meta/fake kernel (output shapes and dtypes) for tracing and compile."""
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]) -> None:
        """The backward formula, as :func:`torch.library.register_autograd`."""
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIBRARY)


def custom_op(qualname: str) -> Callable[[Callable[..., Any]], TorchfgOp]:
    """Decorator defining ``torch.ops.torchfg.<name>`` from a type-annotated Python function.

    ``qualname`` is ``"torchfg::<name>"``; the op mutates none of its arguments.
    """
    namespace, _, name = qualname.partition("::")
    if namespace != "torchfg" or not name:
        raise ValueError(f"qualname must be 'torchfg::<name>', got {qualname!r}")
    return lambda kernel: TorchfgOp(name, kernel)


def python_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """The Python implementation behind a ``torch.ops.torchfg`` overload (for dispatch-mode tools
    that run it to see what it launches)."""
    return _KERNELS[f"{op.namespace}::{op._opname}"]
