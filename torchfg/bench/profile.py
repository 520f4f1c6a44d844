"""What one step launches and allocates: :func:`profile_step` (``torchfg bench --launches``), and
where its time goes: :func:`kernel_times` (``torchfg bench --kernel-times``).

Triton launches are counted at the launcher, ATen ops that launch a kernel on a GPU through a
``TorchDispatchMode`` (views, empty allocations and metadata ops excluded; the inside of torchfg's
custom ops included), and the bytes of every new tensor storage. Work done outside PyTorch
(faiss, NumPy) is invisible to it. Used by ``tests/test_step_budget.py`` to hold the fused
triplet step to its launch and memory budget.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelTime", "StepProfile", "kernel_times", "profile_step"]

# ATen ops that launch no kernel: allocation without initialisation, metadata, aliasing.
_NO_KERNEL = {
    "aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.new_empty.default",
    "aten.new_empty_strided.default", "aten.detach.default", "aten.alias.default", "aten.lift_fresh.default",
    "aten.to.dtype", "aten.to.device", "aten.to.dtype_layout", "aten._local_scalar_dense.default",
    "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default", "aten.is_same_size.default",
    "aten.set_.source_Storage_storage_offset", "aten.resize_.default",
}


@dataclasses.dataclass
class StepProfile:
    """What one step launched and allocated.

    Attributes:
        triton: Triton launches by kernel name.
        aten: ATen ops that launch a GPU kernel, by op name.
        host_syncs: device-to-host reads (``.item()``, ``bool(tensor)``, ...).
        host_copies: tensors made from host data (``torch.tensor(...)``) or copied from the CPU to
            another device: on a GPU each is a host-to-device copy from pageable memory, which a
            CUDA graph cannot capture (with ``host_syncs``, what keeps a step capturable).
        allocated_bytes: bytes of every new tensor storage, summed over the step.
        peak_live_bytes: peak of the bytes of the step's tensors alive at once.
    """

    triton: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    aten: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    host_syncs: int = 0
    host_copies: int = 0
    allocated_bytes: int = 0
    peak_live_bytes: int = 0

    @property
    def launches(self) -> int:
        """Kernel launches of the step: Triton kernels plus ATen kernels."""
        return sum(self.triton.values()) + sum(self.aten.values())


class _Recorder(TorchDispatchMode):
    def __init__(self, profile: StepProfile) -> None:
        super().__init__()
        self.profile = profile
        self.in_kernel = 0
        self.live = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torchfg":
            # A custom op is opaque to the mode: run its Python implementation under the mode so
            # that what it launches and allocates is counted.
            from torchfg.ops._library import python_kernel

            with self:
                return python_kernel(func)(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.in_kernel:  # the Triton interpreter's own tensor traffic is not the step's
            return out
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            self.profile.host_syncs += 1
        elif name in _HOST_DATA or (name in _COPIES and _crosses_from_cpu(args, kwargs, out)):
            self.profile.host_copies += 1
        if not func.is_view and name not in _NO_KERNEL:
            self.profile.aten[name] += 1
        if not func.is_view:
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            for t in _tensors(out):
                storage = t.untyped_storage()
                if storage.data_ptr() in inputs or storage.nbytes() == 0:
                    continue  # in-place or out= results reuse an input's storage
                inputs.add(storage.data_ptr())
                self.profile.allocated_bytes += storage.nbytes()
                self.live += storage.nbytes()
                self.profile.peak_live_bytes = max(self.profile.peak_live_bytes, self.live)
                weakref.finalize(t, self._release, storage.nbytes())
        return out


# A tensor built from Python data (``torch.tensor``, ``torch.as_tensor`` of a list) passes through
# lift_fresh: on a GPU the data then travels from pageable host memory.
_HOST_DATA = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}
_COPIES = {"aten._to_copy.default", "aten.copy_.default", "aten._copy_from.default"}


def _crosses_from_cpu(args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether a copy reads a CPU tensor into a tensor on another device."""
    sources = [t for t in _tensors((args, kwargs)) if t.device.type == "cpu"]
    return bool(sources) and any(t.device.type != "cpu" for t in _tensors(out))


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


@contextlib.contextmanager
def _count_triton(recorder: _Recorder) -> Iterator[None]:
    """Count Triton launches (compiled: ``JITFunction.run``; interpreted: ``GridExecutor``)."""
    patches = []
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # no triton: nothing to count
        yield
        return

    def wrap(owner: type, attr: str, name_of: Callable[[Any], str], is_launch: Callable[..., bool]) -> None:
        original = getattr(owner, attr)

        def counted(self, *args, **kwargs):
            if not is_launch(kwargs):
                return original(self, *args, **kwargs)
            if not recorder.in_kernel:
                recorder.profile.triton[name_of(self)] += 1
            recorder.in_kernel += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                recorder.in_kernel -= 1

        setattr(owner, attr, counted)
        patches.append((owner, attr, original))

    wrap(interpreter.GridExecutor, "__call__", lambda ex: getattr(ex.fn, "__name__", "kernel"), lambda kw: True)
    wrap(jit.JITFunction, "run", lambda fn: fn.fn.__name__, lambda kw: not kw.get("warmup", False))
    try:
        yield
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)


def profile_step(step: Callable[[], Any]) -> StepProfile:
    """Run ``step()`` once (e.g. a loss and its backward) and return what it launched and allocated.

    Example:
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> p = profile_step(lambda: (x * 2).sum().backward())
        >>> sorted(p.aten.elements())
        ['aten.mul.Tensor', 'aten.mul.Tensor', 'aten.ones_like.default', 'aten.sum.default']
    """
    profile = StepProfile()
    recorder = _Recorder(profile)
    with _count_triton(recorder), recorder:
        step()
    return profile


@dataclasses.dataclass(frozen=True)
class KernelTime:
    """One kernel's share of a step: ``calls`` and ``ms`` are per step (averaged over the profiled steps)."""

    name: str
    calls: float
    ms: float


def kernel_times(step: Callable[[], Any], device: torch.device, *, steps: int = 3, top: int = 12) -> list[KernelTime]:
    """Where the time of ``step()`` goes, kernel by kernel: the ``top`` largest, by time per step.

    On a CUDA device, each GPU kernel's device time from the profiler's CUDA activity (Triton
    kernels under their function names, ATen's under theirs, copies and fills included): what
    a step's wall time cannot say, e.g. whether the mining or the loss kernels dominate. On a
    CPU, each ATen op's self CPU time (Triton's interpreter runs in no ATen op, so it is not
    charged). ``step()`` runs once first, unprofiled, so that compiling and autotuning stay out.

    Example:
        >>> x = torch.randn(512, 256)
        >>> [k.name for k in kernel_times(lambda: x @ x.T, torch.device("cpu"))][:1]
        ['aten::mm']
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            if event.device_type != DeviceType.CPU or not event.name.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        total = totals[event.name]
        total[0] += 1
        total[1] += us
    found = [KernelTime(name, calls / steps, us / steps / 1000.0) for name, (calls, us) in totals.items()]
    return sorted(found, key=lambda k: -k.ms)[:top]
