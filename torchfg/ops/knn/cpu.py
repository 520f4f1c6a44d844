"""Compiled kernels of the CPU k-NN search (``torchfg/csrc/knn_cpu/knn_select.c``): the selection
behind the pool interface of :mod:`torchfg.ops.knn.reference`, and the exact recomputation of the
selected distances (:func:`exact_selected`).

The search is the reference's (the same GEMMs and raw keys on the same tiles, the same exact
recomputation afterwards); only the selection changes, and the default tile side of a
self-search (:func:`default_tile_size`, narrower: from N = 1024 rather than 2048 it is tiled). Each query row keeps its k best (distance, column)
pairs in a candidate buffer that a quickselect cuts back to k when it fills, and an entry of a
distance tile is rejected with one compare against the raw key of the row's k-th best, where
``torch.topk`` costs about 8 ns per entry at k = 100. The distances are
finished with the torch path's fp32 operations and ties go to the lower column, so on the same
tiles (an explicit ``chunk_size``, or any search that is not a tiled self-search) the neighbours
are those of the pure PyTorch path, index for index and bit for bit. With the default tiles a
self-search of N >= 1024 rows computes its keys in other GEMM shapes, which round differently:
a near-tie (two copies of one row) can then resolve to the other copy.

Build: plain C with no torch headers, compiled on first use with the system C compiler
(``CC``, which may carry arguments such as ``ccache gcc``, else ``cc``, ``gcc`` or ``clang``) in
about a second, into a folder named by a hash of the source, compiler, flags and platform under
``$TORCHFG_CACHE_DIR/knn_cpu``, else ``$XDG_CACHE_HOME/torchfg/knn_cpu``, else
``~/.cache/torchfg/knn_cpu`` (the library is readable by all, 0755 less the umask, so a shared
cache serves every user), then loaded with :mod:`ctypes`; later processes only load it. AVX2 code is
compiled where torch itself runs AVX2 kernels (the flag is part of the cache key). OpenMP is
linked by the soname ``libgomp.so.1``, which a process that imported torch has already loaded
from torch's wheel, so the kernel runs on torch's OpenMP thread pool with
``torch.get_num_threads()`` threads.

The exact recomputation (every backend returns the selected distances recomputed from the rows,
``torchfg.ops.knn._exact_selected``) reads each selected pair's two rows where they lie and sums
in a fixed order of 32 lanes, instead of gathering a (Q, k, D) block and taking the difference,
square and sum as separate passes: at Q = G = 4096, k = 100, D = 512 it takes 15-20 ms where
the PyTorch recomputation took 80-95 ms, as long as the search. Its sums differ from torch's by
rounding only (the neighbours are the same; integer data gives the same bits), and its Euclidean
root is IEEE where torch's CPU sqrt is not.

Anything that goes wrong (no compiler, a failed build, a failed first-use self-check, a
read-only cache) leaves the pure PyTorch path in place: :func:`status` says why. The compiled
path is used automatically by the ``torch`` backend on CPU tensors (selection: fp32, fp16, bf16;
recomputation: fp32 rows, and the fp32 unit rows of cosine; fp64 keeps the PyTorch path);
``TORCHFG_CPU_KERNELS=0`` or ``torchfg.ops.knn.cpu.enabled = False`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from torchfg._validation import env_flag
from torchfg.ops.knn.reference import knn_reference, order_runs_by_index

__all__ = [
    "ENV_VAR",
    "enabled",
    "status",
    "is_usable",
    "load",
    "CompiledPool",
    "SlackExhausted",
    "knn_cpu",
    "default_tile_size",
    "exact_selected",
]

ENV_VAR = "TORCHFG_CPU_KERNELS"
# Module switch next to the environment variable (for tests and benchmarks in one process).
enabled = True

_SOURCE = Path("knn_cpu") / "knn_select.c"
_LIBRARY_NAME = "libtorchfg_knn_cpu.so"
_DIGEST_NAME = "libtorchfg_knn_cpu.sha256"  # the digest of the library as built
_CSRC_ENV = "TORCHFG_CSRC_DIR"
_CACHE_ENV = "TORCHFG_CACHE_DIR"
# Seconds a build may take before it counts as failed (it takes about one).
_BUILD_TIMEOUT_S = 120
# The finish codes of knn_select.c. The kernel finishes with IEEE fp32 operations, as torch's
# add and clamp do; torch's fp32 sqrt is not IEEE (MKL's vectorised sqrt: 15% of its results are
# one ulp from the correctly rounded root on this AMD EPYC), so no C sqrt can reproduce which
# squared distances it merges. The Euclidean selection therefore runs on the squared distance
# (same order, fewer merges) with a slack of extra entries per row, and torch's sqrt of those
# k + slack decides the k (see CompiledPool.result). A search whose slack runs out (a k-th
# distance shared by more entries than it holds: many copies of one row) is redone with the
# next slack, then with the PyTorch selection.
_FINISH_IDENTITY, _FINISH_PLUS_ONE, _FINISH_CLAMP = 0, 1, 2
_FINISH = {"dot": _FINISH_IDENTITY, "cosine": _FINISH_PLUS_ONE, "sqeuclidean": _FINISH_CLAMP, "euclidean": _FINISH_CLAMP}
_EUCLIDEAN_SLACKS = (8, 64)
_INT32_MAX = 2**31 - 1
# The metrics of tfg_knn_cpu_exact.
_EXACT = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2, "dot": 3}


class SlackExhausted(RuntimeError):
    """A Euclidean row had more than the slack's entries tied, under torch's sqrt, with its k-th
    distance: the compiled selection cannot tell which of them the PyTorch path keeps."""


_lock = threading.Lock()


def _reset_lock_in_child() -> None:
    # A fork while another thread builds (a DataLoader's workers starting during a first knn in an
    # evaluation thread) copies the lock held by a thread the child does not have: every knn of
    # the child would wait on it forever.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_in_child)

_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the library cannot be used, once known
_built_how: str = ""


def _switched_off() -> str | None:
    if not enabled:
        return "disabled by torchfg.ops.knn.cpu.enabled = False"
    if not env_flag(ENV_VAR, True):
        # .get: another thread may unset the variable between the two reads.
        return f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR, '').strip()}"
    return None


def _source_path() -> Path | None:
    """The C source: ``TORCHFG_CSRC_DIR``, then ``torchfg/csrc`` (package data of an install, and
    the sources themselves in a checkout)."""
    package = Path(__file__).resolve().parents[2]
    override = os.environ.get(_CSRC_ENV)  # read once: another thread may change it
    candidates = [Path(override)] if override else []
    candidates.append(package / "csrc")
    for candidate in candidates:
        if (candidate / _SOURCE).is_file():
            return candidate / _SOURCE
    return None


def _compiler() -> list[str] | None:
    """The compiler's command: ``CC`` split as a shell would (``CC="ccache gcc"`` or
    ``CC="gcc -O2"`` carry arguments), else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    cc = os.environ.get("CC", "")  # read once: another thread may change it
    if cc.strip():
        try:
            command = shlex.split(cc)
        except ValueError:  # unbalanced quotes
            return None
        found = shutil.which(command[0])
        return [found, *command[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _cache_root() -> Path:
    root = os.environ.get(_CACHE_ENV)  # read once: another thread may change it
    if root:
        return Path(root) / "knn_cpu"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "torchfg" / "knn_cpu"


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-std=c99"]
    # AVX2 only where torch dispatches AVX2 kernels itself: a library cached for this machine
    # never runs instructions it lacks (and a machine without them gets another cache key).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-mavx2")
    return flags


def _build(source: Path, compiler: Sequence[str]) -> Path:
    """Compile ``source`` with the ``compiler`` command (as :func:`_compiler` returns it) into the
    cache (once per source hash, command and flags) and return the library."""
    flags = _flags()
    # The platform too: the same compiler command on another machine type or C library (a cache
    # on a shared home) builds a library this process cannot load.
    platform_tag = [sys.platform, platform.machine(), *platform.libc_ver()]
    key = hashlib.sha256(source.read_bytes() + "\0".join([*compiler, *flags, *platform_tag]).encode()).hexdigest()[:20]
    target_dir = _cache_root() / key
    target = target_dir / _LIBRARY_NAME
    digest_file = target_dir / _DIGEST_NAME
    if target.is_file() and _digest_matches(target, digest_file):
        _share(target)
        return target
    # Missing, or not the file that was built (truncated by a full disk or a crash before the data
    # reached it, replaced): a truncated library kills the process with SIGBUS inside dlopen, so
    # it is rebuilt rather than loaded.
    target_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target_dir)
    # Compile to a private name, then rename: concurrent processes (pytest-xdist) never load a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        run = subprocess.run(
            [*compiler, *flags, str(source), "-o", partial],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if run.returncode != 0:
            raise RuntimeError(f"{shlex.join(compiler)} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        if os.path.getsize(partial) == 0:  # a "compiler" that succeeds without writing anything
            raise RuntimeError(f"{shlex.join(compiler)} exited 0 but wrote no library")
        # mkstemp made the file 0600: other users of a shared cache could not load it. Give it
        # the mode a compiler's own output would have (0755 less the umask).
        os.chmod(partial, 0o755 & ~_umask())
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # on disk before its name is: a crash never leaves a short library
        _write_atomically(digest_file, _digest(Path(partial)))
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _remove_stale_partials(target_dir: Path) -> None:
    """Deletes the private build outputs (``tmp*``) of builds killed before their cleanup ran.

    A live build is younger than twice the build timeout, so only files older than that go: a
    concurrent process's partial library is left alone.
    """
    cutoff = time.time() - 2 * _BUILD_TIMEOUT_S
    for leftover in target_dir.glob("tmp*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:  # removed by another process meanwhile, or a read-only cache
            pass


def _digest(library: Path) -> str:
    return hashlib.sha256(library.read_bytes()).hexdigest()


def _digest_matches(library: Path, digest_file: Path) -> bool:
    """Whether ``library`` is the file whose digest was recorded when it was built (a library
    cached by an earlier version, without a digest, is rebuilt once)."""
    try:
        return digest_file.read_text().strip() == _digest(library)
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    fd, partial = tempfile.mkstemp(dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(partial, 0o644 & ~_umask())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _share(library: Path) -> None:
    """A library an earlier version cached with mode 0600 becomes readable by all, when it is ours."""
    try:
        info = library.stat()
        mode = 0o755 & ~_umask()
        if info.st_uid == os.getuid() and mode & 0o044 and not info.st_mode & 0o044:
            os.chmod(library, mode)
    except (OSError, AttributeError):  # a read-only cache, or no os.getuid (Windows)
        pass


def _umask() -> int:
    """The process's umask: from /proc (Linux >= 4.7), else by setting it and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _bind(library: ctypes.CDLL) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    library.tfg_knn_cpu_offer.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, c_int, c_int]
    library.tfg_knn_cpu_offer.restype = c_int
    library.tfg_knn_cpu_result.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, c_int]
    library.tfg_knn_cpu_result.restype = None
    library.tfg_knn_cpu_exact.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, ptr, c_int, ptr, ptr, c_int]
    library.tfg_knn_cpu_exact.restype = None
    for name in ("tfg_knn_cpu_version", "tfg_knn_cpu_simd", "tfg_knn_cpu_openmp"):
        getattr(library, name).argtypes = []
        getattr(library, name).restype = c_int


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None if it cannot be used (see :func:`status`)."""
    global _library, _failure, _built_how
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is not None or _failure is not None:
            return _library
        source, compiler = _source_path(), _compiler()
        if source is None:
            _failure = f"the C source {_SOURCE} is not part of this install"
            return None
        if compiler is None:
            cc = os.environ.get("CC", "").strip()
            _failure = (f"no C compiler found (CC={cc!r} names no program on the PATH)" if cc
                        else "no C compiler found (set CC, or install cc / gcc / clang)")
            return None
        try:
            path = _build(source, compiler)
            library = ctypes.CDLL(str(path))
            _bind(library)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            # AttributeError: a loadable library without the kernel's symbols (a foreign file).
            _failure = f"the C kernel could not be built or loaded: {exc}"
            return None
        _built_how = f"{path} (simd width {library.tfg_knn_cpu_simd()}, openmp {bool(library.tfg_knn_cpu_openmp())})"
        try:
            mismatch = _self_check(library)
        except Exception as exc:  # a broken kernel must leave the PyTorch path in place
            mismatch = repr(exc)
        if mismatch is not None:
            _failure = f"the C kernel failed its first-use self-check: {mismatch}"
            return None
        _library = library
        return _library


def status() -> tuple[bool, str]:
    """Whether the compiled selection is used for fp32 CPU blocks, and why not. Builds on first call."""
    off = _switched_off()
    if off is not None:
        return False, off
    if load() is None:
        return False, str(_failure)
    return True, f"loaded: {_built_how}"


def is_usable(device: torch.device, dtype: torch.dtype, num_columns: int = 0) -> bool:
    """Whether the CPU search of ``dtype`` inputs on ``device`` against ``num_columns`` gallery
    rows takes the compiled selection.

    The selection runs on fp32 blocks: fp32, fp16 and bf16 inputs (fp64 is selected in fp64 by
    the PyTorch path). Its keys hold a column in 31 bits, so a gallery of 2**31 - 1 rows or more
    takes the PyTorch selection (its columns are int64). A failed build means False; a
    ``TORCHFG_CPU_KERNELS`` value that is neither on nor off raises a ValueError naming it.
    """
    if device.type != "cpu" or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if num_columns >= _INT32_MAX:
        return False
    return _switched_off() is None and load() is not None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class CompiledPool:
    """The k nearest (distance, column) of ``num_rows`` query rows, offered column blocks; the
    selection of :class:`~torchfg.ops.knn.reference.RowPool`.

    State: per row a buffer of up to ``capacity`` candidates (64-bit (distance, column) keys;
    capacity = 2k, at least k + 16), held in torch tensors; the kernel works on their data
    pointers.

    Args:
        k: neighbours kept per row, >= 1.
        num_rows: R, rows of every block offered.
        metric: one of ``torchfg.ops.metric.METRICS``; picks the finish from raw key to distance.
        query_aux: (R,) fp32 values added to the raw keys before the clamp (the squared query
            norms of the chunked Euclidean search), or None.
        slack: extra entries kept per row for the Euclidean metric (see :func:`_settle_sqrt`).
        num_columns: the columns that will be offered in all, where known: the buffer then holds
            no more than them (at least the kept entries + 1, which the kernel needs). Any number
            may still be offered; more only cost reductions.
        library: the loaded kernel (default: :func:`load`).
    """

    def __init__(
        self,
        k: int,
        num_rows: int,
        metric: str,
        query_aux: torch.Tensor | None = None,
        *,
        slack: int = _EUCLIDEAN_SLACKS[0],
        num_columns: int | None = None,
        library: ctypes.CDLL | None = None,
    ) -> None:
        library = library or load()
        if library is None:
            raise RuntimeError(f"the compiled CPU k-NN selection is unavailable: {_failure}")
        if metric not in _FINISH:
            raise ValueError(f"metric must be one of {sorted(_FINISH)}, got {metric!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._library = library
        self.k, self.num_rows = k, num_rows
        self._mode = _FINISH[metric]
        self._sqrt = metric == "euclidean"
        # Entries kept per row: the k, plus the slack that settles the Euclidean merges.
        self._kept = k + (slack if self._sqrt else 0)
        # A buffer of twice the kept entries: each reduction (a quickselect over the buffer)
        # then pays for at least as many accepted entries as it keeps.
        self._capacity = max(2 * self._kept, self._kept + 16)
        if num_columns is not None:
            # A small gallery fills no more: 1M queries against 4 rows kept 20 keys a row (160 MiB).
            self._capacity = max(self._kept + 1, min(self._capacity, num_columns))
        self._keys = torch.empty(num_rows, self._capacity, dtype=torch.int64)
        self._count = torch.zeros(num_rows, dtype=torch.int32)
        self._threshold = torch.full((num_rows,), -1, dtype=torch.int64)  # UINT64_MAX: keep everything
        self._limit = torch.full((num_rows,), float("inf"), dtype=torch.float32)
        if query_aux is not None:
            if query_aux.shape != (num_rows,):
                raise ValueError(f"query_aux must have shape ({num_rows},), got {tuple(query_aux.shape)}")
            # The kernel reads it through a host pointer (a meta tensor's is NULL: "no aux").
            query_aux = query_aux.to("cpu", torch.float32).contiguous()
        self._aux = query_aux

    def offer(self, block: torch.Tensor, offset: int) -> None:
        """Offer ``block`` (R, W) fp32 raw keys for columns ``offset .. offset + W - 1``, none of
        them offered before (in any order). Read in place when its rows or its columns are
        contiguous (a transposed view of a contiguous tile)."""
        # Plain checks: torch._check costs more than the kernel call on small blocks.
        if block.dtype != torch.float32 or block.device.type != "cpu":
            raise RuntimeError(f"block must be fp32 on the CPU, got {block.dtype} on {block.device}")
        if block.dim() != 2 or block.shape[0] != self.num_rows:
            raise RuntimeError(f"block must be ({self.num_rows}, W), got {tuple(block.shape)}")
        if offset < 0 or offset + block.shape[1] > _INT32_MAX:
            raise RuntimeError(f"columns must lie in [0, 2**31 - 1), got offset {offset}")
        rows, width = block.shape
        if rows == 0 or width == 0:
            return
        if block.stride(1) != 1 and block.stride(0) != 1:
            block = block.contiguous()
        row_stride, col_stride = block.stride()
        if block.stride(1) == 1 or width == 1:
            col_stride = 1  # a single-column view may report any stride
        code = self._library.tfg_knn_cpu_offer(
            block.data_ptr(), rows, width, row_stride, col_stride, offset,
            self._keys.data_ptr(), self._count.data_ptr(), self._threshold.data_ptr(), self._limit.data_ptr(),
            self._kept, self._capacity, _pointer(self._aux), self._mode, torch.get_num_threads(),
        )  # fmt: skip
        if code != 0:
            raise RuntimeError(f"unsupported block strides {block.stride()}")

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances (R, k) fp32, columns (R, k) int64), sorted by (distance, column).

        Ends the pool (the buffers are consumed). Needs at least k columns offered in all (a
        ValueError otherwise). NaN distances sort after +inf, as in ``torch.sort``.

        Raises:
            SlackExhausted: Euclidean only, where a row's k-th distance is shared (under torch's
                sqrt) by more entries than the slack holds; the caller then searches with the
                PyTorch selection. It takes more than 8 entries at the k-th distance that are
                not exact ties of one squared distance, or exact ties in large numbers.
        """
        distances = torch.empty(self.num_rows, self._kept, dtype=torch.float32)
        columns = torch.empty(self.num_rows, self._kept, dtype=torch.int64)
        if self.num_rows:
            self._library.tfg_knn_cpu_result(
                self._keys.data_ptr(), self._count.data_ptr(), self._threshold.data_ptr(), self._limit.data_ptr(),
                self.num_rows, self._kept, self._capacity, distances.data_ptr(), columns.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
        # The sentinel column survives only where fewer than k columns were offered: named here
        # rather than failing later on an out-of-range index.
        if self.num_rows and bool((columns[:, : self.k] == _INT32_MAX).any()):
            raise ValueError(f"a row was offered fewer than k={self.k} columns")
        if not self._sqrt:
            return distances, columns
        return _settle_sqrt(distances, columns, self.k)


def _settle_sqrt(squared: torch.Tensor, columns: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best by (torch's sqrt, column) of the k + slack best by (squared distance, column),
    (R, k + s) each, checked to be the k best of the whole row.

    torch's sqrt is non-decreasing, so the k best of the row lie among the entries whose root is
    at most the k-th root T, and every entry outside the k + s has a squared distance at least
    the last one's: when the last root exceeds T, none of them can enter.
    """
    distances = squared.sqrt()  # the PyTorch path's finish, bit for bit
    if squared.shape[0] == 0:
        return distances[:, :k], columns[:, :k]
    # Sorted by squared distance, so only rows where the roots merge need a new order. The +inf
    # entries that fill a row past a small gallery (k + slack > G) lie beyond the k kept: counting
    # them as merged re-sorted every row (3.5x cdist + topk at k = G - 1).
    merged = torch.nonzero(
        ((distances[:, 1:] == distances[:, :-1]) & (distances[:, 1:] != float("inf"))).any(1)
    ).flatten()
    if merged.numel():
        merged_d, merged_c = distances.index_select(0, merged), columns.index_select(0, merged)
        order = order_runs_by_index(merged_d, merged_c)
        distances = distances.index_copy(0, merged, merged_d.gather(1, order))
        columns = columns.index_copy(0, merged, merged_c.gather(1, order))
    if not bool((distances[:, -1] > distances[:, k - 1]).all()):
        raise SlackExhausted("more entries share a row's k-th distance than the slack holds")
    return distances[:, :k].contiguous(), columns[:, :k].contiguous()


def default_tile_size(num_rows: int) -> int:
    """Side of the square tiles of the compiled symmetric self-search of ``num_rows`` rows.

    Narrower than the PyTorch selection's (:func:`torchfg.ops.knn.reference.default_tile_size`):
    the compiled selection costs the same per entry whatever the tile, so more tiles per side
    only save GEMM work ((b + 1) / (2 b) of the plain search). Medians on 2 cores, D = 512:
    N = 4096 took 109 / 217 ms (k = 10 / 100) with tiles of 512 against 125 / 271 ms with 1024;
    N = 8192, 1024 against 2048: 449 / 698 against 420 / 765 ms (within the machine's noise).
    """
    return 1024 if num_rows >= 8192 else 512


def knn_cpu(
    query: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    metric: str,
    symmetric: bool = False,
    self_offset: int = -1,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    unit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~torchfg.ops.knn.reference.knn_reference` with the compiled selection.

    Same arguments and contract: (distances (Q, k) in query's dtype, indices (Q, k) int64), sorted
    by (distance, index), and the same neighbours. Needs :func:`is_usable` for the inputs.
    """
    tile = chunk_size
    if tile is None and symmetric:
        tile = default_tile_size(query.shape[0])
    # A repeated attempt reports only the rows past those an earlier one reported.
    reported = attempt_rows = 0

    def report(rows: int) -> None:
        nonlocal reported, attempt_rows
        new = max(0, attempt_rows + rows - reported)
        attempt_rows += rows
        reported += new
        if new and progress is not None:
            progress(new)

    num_columns = query.shape[0] if symmetric else gallery.shape[0]
    for slack in _EUCLIDEAN_SLACKS if metric == "euclidean" else (0,):

        def make_pool(k: int, num_rows: int, metric: str, query_aux: torch.Tensor | None) -> CompiledPool:
            return CompiledPool(k, num_rows, metric, query_aux, slack=slack, num_columns=num_columns)

        attempt_rows = 0
        try:
            # The tile only as the tile: as chunk_size it also cut a search below two tiles into
            # 512-row query chunks (N = 513: a 512-row and a 1-row GEMM, which round otherwise).
            return knn_reference(query, gallery, k, metric, symmetric, self_offset, chunk_size, report, make_pool,
                                 tile_size=tile, unit=unit)
        except SlackExhausted:
            # Rare: a k-th distance shared by more entries than the slack holds (many copies of
            # one row). The search again with the next slack, then with the PyTorch selection.
            pass
    attempt_rows = 0
    return knn_reference(query, gallery, k, metric, symmetric, self_offset, chunk_size, report, unit=unit)


def exact_selected(
    query: torch.Tensor,
    gallery: torch.Tensor,
    indices: torch.Tensor,
    metric: str,
    query_nonzero: torch.Tensor | None = None,
    gallery_nonzero: torch.Tensor | None = None,
    *,
    library: ctypes.CDLL | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected pairs' distances recomputed from the rows, each row sorted by (distance, index).

    The C kernel behind :func:`torchfg.ops.knn._exact_selected` on CPU tensors: one pass over
    each pair's two rows where they lie, instead of gathering a (Q, k, D) block and taking the
    difference, square and sum in separate passes (which at k = 100 cost as much as the search).
    The sums run in fp32 in a fixed order of 32 lanes: the same bits with and without AVX2 and
    for every thread count; they differ from torch's ``sum`` by rounding only (a row's identical
    copy is at exactly 0 either way, and integer data gives exact ties).

    Args:
        query: (Q, D) fp32 rows with unit feature stride (cosine: the unit rows).
        gallery: (G, D) fp32 rows with unit feature stride, G < 2**31 - 1.
        indices: (Q, k) int64 selected gallery rows of each query.
        metric: one of ``torchfg.ops.metric.METRICS``; euclidean takes the IEEE sqrt.
        query_nonzero, gallery_nonzero: (Q,) and (G,) bool, cosine only: pairs with a zero row
            are at distance 1.
        library: the loaded kernel (default: :func:`load`).

    Returns:
        (distances (Q, k) fp32, indices (Q, k) int64).
    """
    library = library or load()
    if library is None:
        raise RuntimeError(f"the compiled CPU k-NN kernels are unavailable: {_failure}")
    if metric not in _EXACT:
        raise ValueError(f"metric must be one of {sorted(_EXACT)}, got {metric!r}")
    for name, rows in (("query", query), ("gallery", gallery)):
        if rows.dtype != torch.float32 or rows.device.type != "cpu" or rows.dim() != 2:
            raise ValueError(f"{name} must be a 2-D fp32 CPU tensor, got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if gallery.shape[0] >= _INT32_MAX or gallery.shape[1] != query.shape[1]:
        raise ValueError(f"gallery must be (G, {query.shape[1]}) with G < 2**31 - 1, got {tuple(gallery.shape)}")
    if indices.dtype != torch.int64 or indices.dim() != 2 or indices.shape[0] != query.shape[0]:
        raise ValueError(f"indices must be ({query.shape[0]}, k) int64, got {indices.dtype} {tuple(indices.shape)}")
    num_query, k = indices.shape
    distances = torch.empty(num_query, k, dtype=torch.float32)
    columns = torch.empty(num_query, k, dtype=torch.int64)
    if num_query == 0 or k == 0:
        return distances, columns
    # The kernel reads the rows these name: one out of range would read outside the gallery.
    low, high = (int(v) for v in torch.aminmax(indices))
    if low < 0 or high >= gallery.shape[0]:
        raise ValueError(f"indices must lie in [0, {gallery.shape[0]}), got [{low}, {high}]")
    if metric == "cosine":
        if query_nonzero is None or gallery_nonzero is None:
            raise ValueError("cosine needs query_nonzero and gallery_nonzero")
        # The kernel reads them at every selected row and column.
        if query_nonzero.shape != (num_query,) or gallery_nonzero.shape != (gallery.shape[0],):
            raise ValueError(
                f"query_nonzero and gallery_nonzero must have shapes ({num_query},) and ({gallery.shape[0]},), "
                f"got {tuple(query_nonzero.shape)} and {tuple(gallery_nonzero.shape)}"
            )
        # On the CPU: the kernel reads them through host pointers (a meta tensor's is NULL).
        query_nonzero = query_nonzero.to("cpu", torch.uint8).contiguous()
        gallery_nonzero = gallery_nonzero.to("cpu", torch.uint8).contiguous()
    # The kernel reads rows with unit feature stride; a single column may report any stride.
    query = query if query.stride(1) == 1 or query.shape[1] <= 1 else query.contiguous()
    gallery = gallery if gallery.stride(1) == 1 or gallery.shape[1] <= 1 else gallery.contiguous()
    indices = indices.contiguous()
    library.tfg_knn_cpu_exact(
        query.data_ptr(), query.stride(0), gallery.data_ptr(), gallery.stride(0), query.shape[1], num_query, k,
        indices.data_ptr(), _pointer(query_nonzero), _pointer(gallery_nonzero), _EXACT[metric],
        distances.data_ptr(), columns.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return distances, columns


def _self_check(library: ctypes.CDLL) -> str | None:
    """Compare the kernel with a full sort on a small case with ties and merging finishes, in both
    layouts, before first use: a miscompiled kernel must not return wrong neighbours."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(-6, 6, (37, 70), generator=generator).float() * 0.25
    keys[3, 5] = float("inf")
    for metric, finish in (
        ("sqeuclidean", lambda raw: raw.clamp_min(0.0)),
        ("cosine", lambda raw: (raw + 1.0).clamp_min(0.0)),
        ("dot", lambda raw: raw),
    ):
        for transposed in (False, True):
            pool = CompiledPool(7, keys.shape[0], metric, library=library)
            for start, stop in ((0, 33), (33, 70)):
                tile = keys[:, start:stop]
                pool.offer(tile.t().contiguous().t() if transposed else tile.contiguous(), start)
            distances, columns = pool.result()
            finished = finish(keys)
            order = torch.sort(finished, dim=1, stable=True).indices[:, :7]
            if not torch.equal(columns, order) or not torch.equal(distances, finished.gather(1, order)):
                return f"{metric}, {'transposed' if transposed else 'row-major'} block"
    # The exact recomputation against fp64, on a width with a lane tail and a duplicated row.
    rows = torch.randn(23, 37, generator=generator)
    rows[5] = rows[2]
    # Distinct columns per row, as a search selects them; row 2's include its copy, row 5.
    selected = torch.rand(9, 23, generator=generator).argsort(dim=1)[:, :11]
    selected[2, :2] = torch.tensor([5, 2])
    selected[2, 2:] = torch.tensor([c for c in range(23) if c not in (2, 5)][:9])
    nonzero = torch.ones(23, dtype=torch.bool)
    for metric in _EXACT:
        distances, columns = exact_selected(rows[:9], rows, selected, metric, nonzero[:9], nonzero, library=library)
        q, g = rows[:9].double().unsqueeze(1), rows.double()[columns]
        squared = ((q - g) ** 2).sum(-1)
        expected = {"dot": -(q * g).sum(-1), "sqeuclidean": squared, "euclidean": squared.sqrt(), "cosine": squared * 0.5}[metric]
        in_order = (distances[:, 1:] > distances[:, :-1]) | ((distances[:, 1:] == distances[:, :-1]) & (columns[:, 1:] > columns[:, :-1]))
        if (
            not torch.equal(columns.sort(dim=1).values, selected.sort(dim=1).values)
            or not torch.allclose(distances.double(), expected, rtol=1e-5, atol=1e-5)
            or not bool(in_order.all())
            or (metric != "dot" and float(distances[2, 0]) != 0.0)
        ):
            return f"exact recomputation, {metric}"
    return None
