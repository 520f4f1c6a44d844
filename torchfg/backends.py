"""Backend discovery and dispatch.

Every op in :mod:`torchfg.ops` takes ``backend="auto" | "torch" | "triton" | "cuda"``:

* ``"torch"``: the chunked pure-PyTorch reference (any device; the ground truth).
* ``"triton"``: fused Triton kernels, for CUDA tensors. CPU tensors are accepted only
  under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks kernels.
* ``"cuda"``: kernels from ``torchfg/csrc/`` compiled with ``torch.utils.cpp_extension``.
* ``"auto"``: the first backend, in the op's order of preference, that supports the inputs
  (dtype, ``k``), can run on the tensor's device and needs no build; else ``"torch"``.

Each op declares its backends once, with what they can do, through :func:`register_op` (in
its ``ops/<op>/__init__.py``), and resolves the user's choice with :func:`resolve_backend`:
this module is the only place that reads ``TORCHFG_BACKEND`` and decides. It imports nothing
from :mod:`torchfg.ops` (status functions of compiled backends are handed in by the op).

The environment variable ``TORCHFG_BACKEND`` replaces ``"auto"`` globally: with
``TORCHFG_BACKEND=triton`` every op that has a Triton kernel runs it (and raises if
Triton is unavailable); ops without one use their reference. An explicit ``backend=``
argument other than ``"auto"`` always wins over the environment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import torch

from torchfg._validation import check_choice
from torchfg.errors import BackendUnavailableError

__all__ = [
    "BACKENDS",
    "BackendSpec",
    "BackendUnavailableError",
    "backend_is_forced",
    "backend_status",
    "check_backend",
    "register_op",
    "registered_ops",
    "resolve_backend",
    "triton_status",
    "triton_interpreter_enabled",
    "MIN_TRITON",
]

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "TORCHFG_BACKEND"


def _interpreter_on(value: str) -> bool:
    # Triton's own reading of the variable (its getenv_bool), so that "false", "off" or "2" mean
    # off here too: read as on, compiled kernels were launched into an interpreter Triton had not
    # switched on ("0 active drivers").
    return value.lower() in ("1", "true", "on", "yes", "y")


_ENVIRON_TYPE = type(os.environ)
_Answer = TypeVar("_Answer")


class EnvironReading(Generic[_Answer]):
    """``parse(value)`` of the environment variable ``name`` (``""`` when unset), memoised per raw
    value: every call looks the variable up, and a new value (monkeypatch, ``os.environ[...] =``)
    is parsed again. An exception ``parse`` raises (an invalid value) is raised again at every
    call, nothing is kept. The answer kept under a raw value is parsed from that value itself, so
    a change by another thread meanwhile cannot be stored under the wrong value.

    For switches the launchers read on every call (``TRITON_INTERPRET``, 7 times in a fused
    triplet step): ``os.environ.get`` encodes the key and decodes the value in Python (~1.4 us),
    while CPython's ``os.environ`` keeps the encoded strings in a dict that one lookup reads.
    """

    def __init__(self, name: str, parse: Callable[[str], _Answer]) -> None:
        self.name, self.parse = name, parse
        encodekey = getattr(os.environ, "encodekey", None)  # CPython's os._Environ
        self._key = encodekey(name) if encodekey is not None else None
        self._answers: dict[bytes | None, _Answer] = {}

    def __call__(self) -> _Answer:
        environ = os.environ
        memo = type(environ) is _ENVIRON_TYPE and self._key is not None
        data = getattr(environ, "_data", None) if memo else None
        decode = getattr(environ, "decodevalue", None) if memo else None
        # No memo where os.environ was replaced by another mapping, nor under torch.compile: there
        # the plain reading is traced, as before the memo (dynamo guarded on the memo, and the
        # entry that the first trace added cost a recompile at the second call).
        if data is None or decode is None or torch.compiler.is_compiling():
            return self.parse(os.environ.get(self.name, ""))
        raw = data.get(self._key)
        try:
            return self._answers[raw]
        except KeyError:
            pass  # parsed below, outside the handler: an invalid value's error is not chained to it
        answer = self.parse("" if raw is None else decode(raw))
        if len(self._answers) >= 64:
            self._answers.clear()
        self._answers[raw] = answer
        return answer


_triton_interpreter_reading = EnvironReading("TRITON_INTERPRET", _interpreter_on)


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` switches Triton's interpreter on (Triton kernels then run on the CPU)."""
    return _triton_interpreter_reading()


def _triton_import_status() -> tuple[bool, str]:
    return _probe_triton_import()


# Dynamo must not trace the probe: torch 2.11 traces through lru_cache wrappers and refuses
# importlib.util.find_spec, which broke torch.compile(fullgraph=True) of every op on a GPU box.
# What torch.compiler.assume_constant_result does (run it eagerly at trace time, fold the answer
# into the graph), without the decorator's import of torch._dynamo: seconds on a first training
# step that never compiles (tests/test_step_budget.py guards that). The decorator sets only this.
_triton_import_status._dynamo_marked_constant = True  # type: ignore[attr-defined]


# Held while triton is imported, and taken before a fork: a fork while another thread imports
# triton (a DataLoader starting its workers during an evaluation thread's first call) copied
# Python's lock of the half-imported module, and every later import of triton in the child
# waited for it forever. The fork now waits for the import to finish.
_import_lock = threading.RLock()


def _new_import_lock() -> None:
    global _import_lock
    _import_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=lambda: _import_lock.acquire(),
        after_in_parent=lambda: _import_lock.release(),
        after_in_child=_new_import_lock,
    )


def _triton_installed() -> bool:
    return _probe_triton_installed()


# As _triton_import_status: dynamo must not trace find_spec (torch 2.11 refuses it).
_triton_installed._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def _probe_triton_installed() -> bool:
    # Cached: every CPU op call with backend="auto" asks (find_spec costs ~40 us).
    return importlib.util.find_spec("triton") is not None


_NOT_INSTALLED = "triton is not installed (pip install 'torchfg[triton]')"

# The oldest Triton the kernels compile with (every kernel, sm_90, benchmarks/compile_sm90.py):
# 3.4 cannot compile fp64 tl.dot (the fp64 pairwise and mining kernels). pyproject's extra asks
# for it too, but an environment can hold an older one (torch 2.8's CUDA wheels pin 3.4).
MIN_TRITON = (3, 5)


def _parse_triton_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as ``3.6.0``, ``3.5.1+git1234`` or ``3.7rc1``;
    None if it does not start with a number (such a build is given the benefit of the doubt)."""
    match = re.match(r"\s*([0-9]+)(?:\.([0-9]+))?", version)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


@functools.lru_cache(maxsize=None)
def _probe_triton_import() -> tuple[bool, str]:
    if not _triton_installed():
        return False, _NOT_INSTALLED
    with _import_lock:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # a broken install must not break torchfg
            return False, f"triton failed to import: {exc!r}"
    version = str(getattr(triton, "__version__", ""))
    parsed = _parse_triton_version(version)
    if parsed is not None and parsed < MIN_TRITON:
        minimum = ".".join(map(str, MIN_TRITON))
        return False, f"triton {version} is older than {minimum}, which torchfg's kernels need " \
                      f"(pip install 'triton>={minimum}')"
    return True, f"triton {version}"


def triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device`` (any CUDA device if None), and why not."""
    if device is not None and device.type == "cpu" and not triton_interpreter_enabled():
        # Without importing triton (seconds, on the first CPU call of a process that never uses it).
        if not _triton_installed():
            return False, _NOT_INSTALLED
        return False, "tensor is on the CPU; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    ok, why = _triton_import_status()
    if not ok:
        return False, why
    if device is not None and device.type == "cpu":
        if triton_interpreter_enabled():
            return True, why + " (interpreter, TRITON_INTERPRET=1)"
        return False, "tensor is on the CPU; Triton kernels need a CUDA device (or TRITON_INTERPRET=1)"
    if device is not None and device.type != "cuda":
        return False, f"Triton kernels do not support device type {device.type!r}"
    if not triton_interpreter_enabled() and not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, why


@dataclass(frozen=True)
class BackendSpec:
    """One backend of one op and what it can do.

    Attributes:
        name: ``"torch"``, ``"triton"`` or ``"cuda"``.
        dtypes: input dtypes it supports (None: every float dtype).
        max_k: largest ``k`` it supports (ops with a ``k``; None: no bound).
        auto_max_k: ``"auto"`` prefers this backend only up to this ``k`` (None: no bound);
            past it, ``auto`` tries the next backends first and comes back to this one last.
        status: ``device -> (available, why not)``; None uses the default of ``name``.
        needs_build: the backend is compiled on first use (minutes): ``"auto"`` takes it only
            once ``is_built()`` says so, an explicit request builds it through ``prepare()``.
        is_built: whether the build is done (needs_build only).
        prepare: ``device -> None``, run when the backend is chosen explicitly (e.g. build it).
        device_max_k: ``device -> largest k`` once prepared (a limit known only at run time).
    """

    name: str
    dtypes: tuple[torch.dtype, ...] | None = None
    max_k: int | None = None
    auto_max_k: int | None = None
    status: Callable[[torch.device], tuple[bool, str]] | None = None
    needs_build: bool = False
    is_built: Callable[[], bool] | None = None
    prepare: Callable[[torch.device], None] | None = None
    device_max_k: Callable[[torch.device], int] | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS or self.name == "auto":
            raise ValueError(f"BackendSpec.name must be one of {BACKENDS[1:]}, got {self.name!r}")

    def unsupported(self, dtype: torch.dtype, k: int | None) -> str | None:
        """Why this backend cannot take inputs of ``dtype`` (and ``k``), or None if it can."""
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"it supports dtypes {tuple(str(d) for d in self.dtypes)}, got {dtype}"
        if k is not None and self.max_k is not None and k > self.max_k:
            return f"it supports k <= {self.max_k}, got k={k}"
        return None

    def available(self, device: torch.device) -> tuple[bool, str]:
        """(whether this backend can run on ``device``, why or why not in words)."""
        if self.status is not None:
            return self.status(device)
        if self.name == "torch":
            return True, "pure PyTorch"
        if self.name == "triton":
            return triton_status(device)
        return False, f"no status function was registered for the {self.name} backend"


_TORCH = BackendSpec("torch")
_REGISTRY: dict[str, tuple[BackendSpec, ...]] = {}


def register_op(op: str, *backends: BackendSpec) -> None:
    """Declare the backends of ``op`` beyond its reference, in ``"auto"``'s order of preference.

    The ``"torch"`` reference is always implied and always last. Registering an op again
    replaces its entry (so that reloading a module is harmless).
    """
    names = [spec.name for spec in backends]
    if "torch" in names or len(set(names)) != len(names):
        raise ValueError(f"{op}: register each non-torch backend once (torch is implied), got {names}")
    _REGISTRY[op] = tuple(backends) + (_TORCH,)


def registered_ops() -> dict[str, tuple[BackendSpec, ...]]:
    """Every registered op and its backends (torch last), for ``torchfg info`` and the docs."""
    return dict(_REGISTRY)


def check_backend(backend: object, op: str, name: str = "backend") -> str:
    """``backend`` checked where it is written (a constructor), before any input is seen: a known
    name, and one that ``op`` implements (``"auto"`` always is).

    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: ``op`` has no such backend (as :func:`resolve_backend` would say
            at the first call).
    """
    backend = check_choice(backend, name, BACKENDS)
    specs = _REGISTRY.get(op)
    if backend != "auto" and specs is not None and all(spec.name != backend for spec in specs):
        raise BackendUnavailableError(
            f"{op}: {name}={backend!r} is not implemented for this op (it has {tuple(s.name for s in specs)})"
        )
    return backend


def backend_status(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``op``'s ``backend`` can run on ``device`` (never builds anything), and why not."""
    for spec in _REGISTRY.get(op, ()):
        if spec.name == backend:
            return spec.available(device)
    return False, f"{op} has no {backend} backend"


def _parse_environment_backend(value: str) -> str | None:
    env = value.strip().lower()
    if not env or env == "auto":
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
    return env


# Read by every op call with backend="auto" (the default): memoised per value of the variable.
_environment_backend_reading = EnvironReading(ENV_VAR, _parse_environment_backend)


def _environment_backend() -> str | None:
    return _environment_backend_reading()


def backend_is_forced(backend: str | None) -> bool:
    """Whether ``backend`` (or, for ``"auto"``, ``TORCHFG_BACKEND``) names a backend explicitly."""
    return (backend not in (None, "auto")) or _environment_backend() is not None


def _auto(specs: Sequence[BackendSpec], device: torch.device, dtype: torch.dtype, k: int | None) -> str:
    def usable(spec: BackendSpec) -> bool:
        if spec.unsupported(dtype, k) is not None or not spec.available(device)[0]:
            return False
        # Interpreted Triton is for checking kernels, never a default.
        if spec.name == "triton" and device.type == "cpu":
            return False
        # Never start a build that can take minutes behind the user's back.
        if spec.needs_build and not (spec.is_built is not None and spec.is_built()):
            return False
        if k is not None and spec.device_max_k is not None and k > spec.device_max_k(device):
            return False
        return True

    kernels = [s for s in specs if s.name != "torch"]  # the reference is the fallback, always last
    preferred = [s for s in kernels if k is None or s.auto_max_k is None or k <= s.auto_max_k]
    later = [s for s in kernels if s not in preferred]
    for spec in preferred + later:
        if usable(spec):
            return spec.name
    return "torch"


def resolve_backend(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = "auto",
    *,
    k: int | None = None,
) -> str:
    """Turn a user's ``backend`` argument into the concrete backend ``op`` runs on.

    Args:
        op: a name given to :func:`register_op`.
        device: device of the op's inputs.
        dtype: dtype of the op's inputs.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or None (= ``"auto"``).
        k: the op's ``k``, for backends with a bound on it.

    Returns:
        The backend's name. ``"auto"`` takes the first registered backend that supports the
        inputs, can run on ``device`` and needs no build, else ``"torch"``.

    Raises:
        ValueError: unknown backend name (argument or ``TORCHFG_BACKEND``).
        BackendUnavailableError: an explicitly requested backend cannot run these inputs here.
    """
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if op not in _REGISTRY:
        raise KeyError(f"{op!r} is not a registered op (torchfg.backends.register_op)")
    specs = _REGISTRY[op]
    from_env = False
    if backend == "auto":
        env = _environment_backend()
        if env is not None:
            backend, from_env = env, True
    if backend == "auto":
        return _auto(specs, device, dtype, k)
    source = f"{ENV_VAR}={backend}" if from_env else f"backend={backend!r}"
    spec = next((s for s in specs if s.name == backend), None)
    if spec is None:
        if from_env:  # a global switch: ops without that backend run their reference
            return "torch"
        raise BackendUnavailableError(
            f"{op}: backend={backend!r} is not implemented for this op (it has {tuple(s.name for s in specs)})"
        )
    why = spec.unsupported(dtype, k)
    if why is not None:
        if from_env:
            return "torch"
        raise BackendUnavailableError(f"{op}: {source} cannot run these inputs: {why}")
    ok, why = spec.available(device)
    if not ok:
        raise BackendUnavailableError(f"{op}: {source} is unavailable: {why}")
    if spec.prepare is not None:
        spec.prepare(device)
    if k is not None and spec.device_max_k is not None:
        limit = spec.device_max_k(device)
        if k > limit:
            raise BackendUnavailableError(f"{op}: {source} supports k <= {limit} on {device}, got k={k}")
    return backend
