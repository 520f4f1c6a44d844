"""Shared pieces of the Triton launchers (imported only by ``ops/<op>/triton.py``, which need triton)."""

from __future__ import annotations

import functools
import math
import operator
import struct
from typing import Any, Callable

import torch
import triton.language as tl

from torchfg.backends import triton_interpreter_enabled
from torchfg.ops.precision import dot_operand_dtypes

__all__ = ["TL_DTYPES", "AutotunedLaunch", "cdiv", "check_precondition", "dot_dtypes", "next_power_of_2", "sm_count",
           "split_scalar"]

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


# Host-side grid arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr functions whose
# host calls go through a wrapper that unwraps every argument: about 3 us each, and a fused
# triplet step made 19 of them.
# CUDA caps a launch grid's y and z dimensions at 65535 programs (x at 2**31 - 1); the
# interpreter has no cap, so launchers bound their y / z extents themselves.
MAX_GRID_YZ = 65535
# Compile options every torchfg launch passes. FMA contraction on: Triton's default up to 3.9,
# which warns once per process that it becomes off in 3.10; every register, spill and accuracy
# figure of the kernels was taken with it on.
LAUNCH_OPTIONS: dict[str, Any] = {"enable_fp_fusion": True}


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling of ``numerator / denominator`` for ints (``triton.cdiv`` on the host)."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2`` on the host."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def check_precondition(condition: bool, message: Callable[[], str] | None = None) -> None:
    """``torch._check(condition, message)``, called only when ``condition`` fails: the launchers
    check their preconditions on every call of a host-bound step, where a ``torch._check`` call
    costs ~2 us even when it passes."""
    if not condition:
        torch._check(condition, message)


_SM_COUNTS: dict[tuple[Any, int], int] = {}


def sm_count(device: Any) -> int:
    """``torch.cuda.get_device_properties(device).multi_processor_count``, kept per device index
    (a launcher's grid sizing asks on every call; the query costs a few us on the host).

    Kept under the properties function too: a replaced one (``compile_sm90.py``'s emulated H100, a
    test's monkeypatch) is asked again rather than answered from the real device's entry. A device
    without an index (the current one) is always asked."""
    properties = torch.cuda.get_device_properties
    index = device.index
    if index is None:
        return properties(device).multi_processor_count
    key = (properties, index)
    count = _SM_COUNTS.get(key)
    if count is None:
        count = properties(device).multi_processor_count
        if len(_SM_COUNTS) >= 64:
            _SM_COUNTS.clear()
        _SM_COUNTS[key] = count
    return count


def dot_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype, str]:
    """(``tl.dot`` operand dtype, accumulation dtype, input precision) under the TF32 policy of
    :mod:`torchfg.ops.precision`."""
    operand, acc, precision = dot_operand_dtypes(dtype, interpreter=triton_interpreter_enabled())
    return TL_DTYPES[operand], TL_DTYPES[acc], precision


def split_scalar(value: float) -> tuple[float, float]:
    """``value`` as ``(hi, lo)``, two float32 numbers whose sum is ``value`` to about 48 bits.

    A Python float reaches a compiled Triton kernel as fp32 (the interpreter keeps fp64): an fp64
    loss's margin of 0.4 became 0.4000000059604645 on the H200, 6e-9 off. A kernel that computes
    in fp64 rebuilds it as ``tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)``; in fp32 the sum
    rounds back to ``hi``, the value it had before. Past fp32's range it is ``(+-inf, 0)``.
    """
    value = float(value)
    if value == 0.0 or not math.isfinite(value):  # zeros keep their sign (0.0 and -0.0 hash alike)
        return value, 0.0
    return _split_finite(value)


@functools.lru_cache(maxsize=256)  # the same margins every step: packing them cost ~10 us a step
def _split_finite(value: float) -> tuple[float, float]:
    try:
        hi = _to_fp32(value)
    except OverflowError:  # past fp32's range (some Pythons raise, others round to inf)
        return math.copysign(math.inf, value), 0.0
    lo = value - hi
    if not math.isfinite(lo):
        return hi, 0.0
    lo = _to_fp32(lo)
    # Rounding lo to fp32 can land on exactly half of hi's last place; with hi's last bit odd,
    # an fp32 hi + lo would then round away from hi. One fp32 step towards zero keeps the
    # promise (fp32 sum == hi) at a cost of 2**-24 of lo.
    if lo and _to_fp32(hi + lo) != hi:  # hi + lo is exact in a double
        lo = struct.unpack("f", struct.pack("I", struct.unpack("I", struct.pack("f", lo))[0] - 1))[0]
    return hi, lo


def _to_fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


_DTYPE = operator.attrgetter("dtype")


def _items(positions: list[int]) -> Callable[[tuple], tuple]:
    """A function of a tuple returning its items at ``positions``, as a tuple (C speed)."""
    if len(positions) >= 2:
        return operator.itemgetter(*positions)
    if positions:
        only = positions[0]
        return lambda items: (items[only],)
    return lambda items: ()


class AutotunedLaunch:
    """An autotuned kernel (``triton.autotune`` over ``triton.heuristics`` over ``triton.jit``)
    whose later launches skip the autotuner's and the heuristics' per-call work.

    Triton's ``Autotuner.run`` rebuilds its key from every argument on each call (a dict of all
    arguments, a list scan per name, ``str(dtype)`` per tensor) and ``Heuristics.run`` builds that
    dict again per heuristic: about 100 us of host time per mining launch on the CI machine, a
    fifth of a fused triplet step's host time. Once the autotuner has chosen a config for a call,
    the final launch arguments (config, heuristic values) are kept under a key of the call's
    non-tensor arguments and its tensors' dtypes; an equal key is a call the autotuner and the
    heuristics would answer alike (both read only those), and it goes straight to the JIT
    function, which still specialises on the tensors (alignment) itself.

    Requirements: the heuristics read scalar arguments only (never a tensor's data pointer or
    shape), and no config has a ``pre_hook``. Launches the autotuner has not cached (a single
    config, or a tool that replaced ``Autotuner.run``) are not memoised, except single-config
    autotuners, whose answer cannot change.
    """

    def __init__(self, tuned: Any) -> None:
        from triton.runtime.autotuner import Heuristics

        self.tuned = tuned
        self._heuristics = tuned.fn if isinstance(tuned.fn, Heuristics) else None
        self._jit = self._heuristics.fn if self._heuristics is not None else tuned.fn
        self._memo: dict[tuple, tuple[Any, dict[str, Any]]] = {}
        self._splits: dict[tuple[type, ...], tuple[Callable[[tuple], tuple], Callable[[tuple], tuple]]] = {}

    def __call__(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        """Launch on ``grid`` (a tuple, or a callable of the launch's arguments as triton takes);
        returns the ``triton.Config`` it ran with."""
        kwargs.update(LAUNCH_OPTIONS)
        memoizable = True
        try:
            key = (self._args_key(args), tuple(kwargs.items()))
            memo = self._memo.get(key)
        except TypeError:  # an unhashable argument: no memo for this call
            memoizable, memo = False, None
        if memo is not None:
            config, launch_kwargs = memo
            self._jit[grid](*args, **launch_kwargs)
            return config
        tuned = self.tuned
        tuned[grid](*args, **kwargs)
        # This call's own entry of the autotuner's cache: best_config is one attribute for every
        # thread, so a concurrent first call at another size could have replaced it already.
        answer = self._tuned_answer(args, kwargs)
        config = answer if answer is not None else tuned.best_config
        if memoizable and config.pre_hook is None and answer is config:
            if len(self._memo) >= 256:  # many distinct calls (e.g. varying floats): start over
                self._memo.clear()
            self._memo[key] = (config, self._launch_kwargs(args, kwargs, config))
        return config

    def _args_key(self, args: tuple) -> tuple:
        """The memo key of the positional arguments: their types, the non-tensor values and the
        tensors' dtypes (never a tensor itself, whose hash is its identity).

        The same information as one ``dtype if tensor else value`` entry per argument, plus the
        exact types, but gathered at C speed: the tensor positions of a signature of types are
        found once (the mining kernel's 56 arguments took ~10 us a launch one by one)."""
        types = tuple(map(type, args))
        split = self._splits.get(types)
        if split is None:
            tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
            others = [i for i, t in enumerate(types) if not issubclass(t, torch.Tensor)]
            if len(self._splits) >= 64:
                self._splits.clear()
            split = self._splits[types] = (_items(others), _items(tensors))
        values_of, tensors_of = split
        return types, values_of(args), tuple(map(_DTYPE, tensors_of(args)))

    def _tuned_answer(self, args: tuple, kwargs: dict) -> Any:
        """The config the autotuner holds for this call (as ``Autotuner.run`` keys it), or None."""
        tuned = self.tuned
        if len(tuned.configs) == 1:
            return tuned.configs[0]
        named = {**dict(zip(tuned.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in tuned.arg_names}
        key = [named[k] for k in tuned.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuned.cache.get(tuple(key))

    def _launch_kwargs(self, args: tuple, kwargs: dict, config: Any) -> dict[str, Any]:
        """The keyword arguments the JIT function received: as ``Autotuner.run`` then
        ``Heuristics.run`` build them (each heuristic sees the ones before it)."""
        heuristics = self._heuristics
        launch_kwargs = {**kwargs, **config.all_kwargs()}
        if heuristics is not None:
            for name, heuristic in heuristics.values.items():
                launch_kwargs[name] = heuristic({**dict(zip(heuristics.arg_names, args)), **launch_kwargs})
        return launch_kwargs
