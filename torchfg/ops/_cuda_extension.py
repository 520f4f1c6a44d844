"""Locating, building and loading the CUDA kernels in ``torchfg/csrc/``.

The default wheel is pure Python. The CUDA sources are compiled where they are used:

* **ahead of time**: if a compiled extension module ``torchfg._C_cuda`` was built at install
  time (opt-in, see the project's install notes), it is imported;
* **just in time** otherwise: on first use, with :func:`torch.utils.cpp_extension.load`, when a
  CUDA device, a CUDA build of torch and ``nvcc`` are present. The build is cached by torch under
  ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later processes load it
  in a second. ``TORCHFG_CUDA_JIT=0`` forbids the JIT build (the ``cuda`` backend then reports
  itself unavailable).

Either way the kernels register the torch ops ``torch.ops.torchfg_cuda.*`` (a namespace of
their own, so that they never clash with the Python ``torchfg::`` custom ops).

The sources are searched in ``TORCHFG_CSRC_DIR``, then ``torchfg/csrc`` (package data of an
install, and the sources themselves in a checkout).
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

from torchfg._validation import env_flag
from torchfg.errors import ExtensionBuildError

__all__ = [
    "SOURCES",
    "csrc_dir",
    "status",
    "backend_status",
    "is_built",
    "load",
    "ops",
    "is_loaded",
    "mark_self_check_failed",
    "self_check_failure",
    "ExtensionBuildError",
    "KernelSelfCheckError",
]

# Sources of the extension, relative to the csrc directory.
SOURCES = ("knn/knn_kernel.cu", "knn/knn_binding.cpp")
_EXTENSION_NAME = "torchfg_cuda_ext"
_AOT_MODULE = "torchfg._C_cuda"
_JIT_ENV = "TORCHFG_CUDA_JIT"
_CSRC_ENV = "TORCHFG_CSRC_DIR"

_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A fork during another thread's build would hand the child a lock held by a thread it does
    # not have (as for the CPU k-NN kernel's build).
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)
_loaded: str | None = None  # how the ops got registered, once they are
_build_error: str | None = None
# Set once a kernel disagrees with the torch reference on its first use: the kernels are
# compiled but never run in CI, so a wrong one must take the backend out of service rather than
# keep returning wrong neighbours.
_self_check_failure: str | None = None


class KernelSelfCheckError(ExtensionBuildError):
    """A CUDA kernel failed its first-use self-check; the ``cuda`` backend is disabled for the process."""


def mark_self_check_failed(reason: str) -> None:
    """Record that a kernel failed its self-check: :func:`status` and :func:`backend_status` then
    report the ``cuda`` backend unavailable (so ``"auto"`` never picks it) and :func:`load` raises."""
    global _self_check_failure
    _self_check_failure = reason


def self_check_failure() -> str | None:
    """Why the ``cuda`` backend failed its self-check in this process, or None."""
    return _self_check_failure


def csrc_dir() -> Path | None:
    """Directory holding the CUDA sources, or None when this install has none."""
    package = Path(__file__).resolve().parent.parent
    candidates = []
    override = os.environ.get(_CSRC_ENV)  # read once: another thread may change it
    if override:
        candidates.append(Path(override))
    candidates.append(package / "csrc")
    for candidate in candidates:
        if all((candidate / source).is_file() for source in SOURCES):
            return candidate
    return None


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def _aot_module_present() -> bool:
    # Cached: "auto" asks on every op call, and a failed import scans sys.path each time.
    try:
        importlib.import_module(_AOT_MODULE)
    except ImportError:
        return False
    return True


def _try_aot() -> bool:
    global _loaded
    if not _aot_module_present():
        return False
    _loaded = f"ahead-of-time build ({_AOT_MODULE})"
    return True


def is_loaded() -> bool:
    return _loaded is not None


def is_built() -> bool:
    """Whether the ops are registered now, or an ahead-of-time build can register them at once."""
    return _loaded is not None or _try_aot()


def backend_status(device: torch.device) -> tuple[bool, str]:
    """Whether the ``cuda`` backend can run on ``device`` (built, or buildable on first use), and why not."""
    if device.type != "cuda":
        return False, f"the CUDA extension needs a CUDA tensor, got device {device.type!r}"
    if not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return status()


def status() -> tuple[bool, str]:
    """Whether the ``cuda`` backend can run (built, or buildable on first use), and why not.

    Never compiles anything; :func:`load` does.
    """
    if _self_check_failure is not None:
        return False, f"the CUDA kernel failed its first-use self-check: {_self_check_failure}"
    if _loaded is not None:
        return True, f"loaded: {_loaded}"
    if _build_error is not None:
        return False, f"the CUDA extension failed to build: {_build_error}"
    if _try_aot():
        return True, f"loaded: {_loaded}"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if not env_flag(_JIT_ENV, True):
        return False, f"not built ahead of time, and JIT builds are disabled by {_JIT_ENV}={os.environ.get(_JIT_ENV, '').strip()}"
    sources = csrc_dir()
    if sources is None:
        return False, "the torchfg/csrc/ CUDA sources are not part of this install"
    nvcc = _nvcc()
    if nvcc is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH) to JIT-build the CUDA extension"
    return True, f"not built yet; JIT-compiles on first use with {nvcc} from {sources}"


def load(verbose: bool = False) -> None:
    """Register the ``torch.ops.torchfg_cuda`` ops, building them on first use.

    Raises:
        ExtensionBuildError: the extension is unavailable or failed to compile; the failure is
            remembered so that later calls fail fast.
    """
    global _loaded, _build_error
    if _self_check_failure is not None:
        raise KernelSelfCheckError(_self_check_failure)
    if _loaded is not None:
        return
    with _lock:
        if _loaded is not None:
            return
        if _build_error is not None:
            raise ExtensionBuildError(_build_error)
        ok, why = status()
        if _loaded is not None:
            return
        if not ok:
            raise ExtensionBuildError(why)
        from torch.utils import cpp_extension

        source_dir = csrc_dir()
        assert source_dir is not None
        try:
            cpp_extension.load(
                name=_EXTENSION_NAME,
                sources=[str(source_dir / source) for source in SOURCES],
                extra_include_paths=[str(source_dir / "knn")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-std=c++17"],
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as exc:  # compiler errors come as RuntimeError/OSError/CalledProcessError
            _build_error = f"{type(exc).__name__}: {exc}"
            raise ExtensionBuildError(_build_error) from exc
        _loaded = f"JIT build of {source_dir} ({_EXTENSION_NAME})"


def ops() -> ModuleType:
    """``torch.ops.torchfg_cuda`` after :func:`load`."""
    load()
    return torch.ops.torchfg_cuda
