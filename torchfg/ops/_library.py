"""Registration of torchfg's custom operators (``torch.ops.torchfg.*``).

``torch.library.custom_op`` would do, but in PyTorch 2.13 it wraps every kernel in
``torch._disable_dynamo``, whose first call imports ``torch._dynamo``: about 140 MiB of
resident memory and 1.5 s once per process, in eager training that never compiles (seven times
the memory of a steady triplet step at N = 4096 on the CPU). The ops are defined here with the
lower-level public API instead, as pytorch/extension-cpp does for C++ ops: the schema inferred
from the Python signature (``torch.library.infer_schema``, the same inference ``custom_op``
uses), the kernel registered with ``Library.impl`` for every device, and the fake and autograd
formulas with ``torch.library.register_fake`` and an ``Autograd`` kernel of our own (see
:meth:`TorchfgOp.register_autograd`). Under ``torch.compile`` the ops are opaque graph nodes
exactly as before (their fake kernels give the shapes).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from torchfg.ops.precision import autocast_off

__all__ = ["TorchfgOp", "custom_op", "on_input_device", "python_kernel"]

_LIBRARY = torch.library.Library("torchfg", "FRAGMENT")
_KERNELS: dict[str, Callable[..., Any]] = {}


class TorchfgOp:
    """One ``torch.ops.torchfg`` operator: call it like the function it was defined from."""

    def __init__(self, name: str, kernel: Callable[..., Any]) -> None:
        schema = torch.library.infer_schema(kernel, mutates_args=())
        _LIBRARY.define(name + schema)
        # Autocast passes through custom ops but stays on inside them: their PyTorch paths would
        # have their matmuls recast (forward and backward ops alike).
        self.impl = on_input_device(autocast_off(kernel))
        _LIBRARY.impl(name, self.impl, "CompositeExplicitAutograd")
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
        """The backward formula, with :func:`torch.library.register_autograd`'s contract:
        ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` returning one
        gradient (or None) per input.

        The kernel is registered for the ``Autograd`` key as ``register_autograd`` registers it,
        but built here: torch's version rebuilds the argument list against the schema on every
        call (``torch._library.utils.fill_defaults``, quadratic in the argument count: about
        95 us of host time per fused triplet step, whose GPU work at N = 8192 is 0.5 ms). Our
        schemas have no default values or keyword-only arguments, so the dispatcher hands every
        argument through positionally and there is nothing to fill.
        """
        overload = self._overload
        if any(a.has_default_value() or a.kwarg_only for a in overload._schema.arguments):
            raise TypeError(f"{self.qualname}: the autograd kernel takes ops without default values or "
                            "keyword-only arguments (the dispatcher then passes every argument positionally)")
        _LIBRARY.impl(self.qualname.partition("::")[2], _autograd_kernel(overload, self.impl, backward, setup_context),
                      "Autograd", with_keyset=True)

    def register_first_order_only(self, public_name: str) -> None:
        """Mark a backward op as not differentiable: differentiating its outputs raises.

        Without an autograd formula, a gradient taken with ``create_graph=True`` comes out of
        the op detached, so a second-order gradient through it (a gradient penalty, say) would
        be silently zero. With this, the first backward runs as before (the op is called with
        grad mode off, or its outputs get a node) and only a second-order pass raises.
        """

        def backward(ctx: Any, *grads: Any) -> Any:
            raise RuntimeError(
                f"{public_name}: second-order gradients are not supported (the gradient of its "
                "gradient, e.g. after backward(create_graph=True)); compute that term with plain "
                "PyTorch ops instead"
            )

        self.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


def on_input_device(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``kernel`` with the current CUDA device set to its first CUDA tensor argument's.

    Triton launches on ``torch.cuda.current_device()`` and that device's current stream, whatever
    the pointers it is given: inputs on cuda:1 while cuda:0 is current ran the kernel on GPU 0
    against GPU 1's memory (an illegal address without peer access, and no ordering with the
    stream that produced the inputs). The CUDA extension guards itself; the autograd engine sets
    the device for backward passes, which reach the backward ops through here as well.
    """

    @functools.wraps(kernel)
    def run(*args: Any, **kwargs: Any) -> Any:
        for arg in args:
            # is_cuda and get_device(): C getters, where arg.device builds a torch.device (~0.6 us
            # for .device.type; every tensor argument is asked on the CPU).
            if isinstance(arg, torch.Tensor) and arg.is_cuda:
                if arg.get_device() != torch.cuda.current_device():
                    with torch.cuda.device(arg.device):
                        return kernel(*args, **kwargs)
                break
        return kernel(*args, **kwargs)

    return run


# Dispatch keys below Autograd that reach an op's own kernel (registered for
# CompositeExplicitAutograd) and nothing else: a CPU or a CUDA tensor's backend key, with or without
# ADInplaceOrView (a fallthrough for these ops). Any other key below Autograd (Python for a dispatch
# mode or fake tensors, Functionalize, functorch's layers, Meta's fake kernel, another backend,
# conjugate or negative views) keeps the redispatch. (The ops' kernels are torchfg's own: a kernel
# that other code registered for the CPU or CUDA key of a torchfg op would not be reached.)
_DIRECT_KEYSETS = tuple(
    torch._C.DispatchKeySet(backend) | extra
    for backend in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA)
    for extra in (torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView), torch._C.DispatchKeySet(backend))
)


def _reaches_kernel_directly(keyset: torch._C.DispatchKeySet) -> bool:
    """Whether a redispatch with ``keyset`` (already below Autograd) would run the op's own kernel
    and nothing else on the way."""
    return keyset in _DIRECT_KEYSETS


def _autograd_kernel(overload: torch._ops.OpOverload, impl: Callable[..., Any], backward: Callable[..., Any],
                     setup_context: Callable[..., Any]) -> Callable[..., Any]:
    """The ``Autograd`` dispatch-key kernel of ``overload``: an autograd.Function whose forward
    redispatches below autograd (the op's own kernels), as torch.library.register_autograd's does.

    Where the redispatch would reach ``impl`` (the op's CompositeExplicitAutograd kernel) with no
    other kernel on the way (plain CPU or CUDA tensors, no dispatch mode: :func:`_reaches_kernel_directly`),
    ``impl`` is called directly: the redispatch converted the op's arguments to the dispatcher's
    values and back (about 12 us of host time per call with the fused triplet loss's 15 arguments),
    for the same call. Its outputs are still checked against the schema where this kernel returns.
    """

    def below_autograd(keyset: torch._C.DispatchKeySet, args: Any) -> Any:
        rest = keyset & torch._C._after_autograd_keyset
        with torch._C._AutoDispatchBelowAutograd():
            if _reaches_kernel_directly(rest):
                return impl(*args)
            return overload.redispatch(rest, *args)

    # Wrapped once here, not per call: the backward runs wherever the caller calls backward(),
    # possibly inside an autocast region.
    backward = autocast_off(backward)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> Any:
            # The dispatch key set rides last so that the op's inputs keep their positions.
            *inputs, keyset = args
            output = below_autograd(keyset, inputs)
            setup_context(ctx=ctx, inputs=tuple(inputs), output=output)
            return output

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            needs_input_grad = ctx.needs_input_grad
            ctx.needs_input_grad = needs_input_grad[:-1]  # the user's backward sees the op's inputs only
            try:
                result = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs_input_grad
            return (*result, None) if isinstance(result, tuple) else (result, None)

    Function.__name__ = Function.__qualname__ = f"GeneratedBackwardFor_torchfg_{overload._opname}"

    def kernel(keyset: torch._C.DispatchKeySet, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Function.apply(*args, keyset)
        return below_autograd(keyset, args)

    return kernel


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
