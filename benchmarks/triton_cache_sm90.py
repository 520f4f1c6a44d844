"""Compile a GPU session's Triton kernels for Hopper ahead of time, on a machine without a GPU.

Compilation was the GPU sessions' bottleneck: each autotuned key compiles every config of its
list, one after another, and the k-NN kernels take 10-40 s each (``sm90_knn_full_*.csv``); on
the first H200 run the k-NN k = 100, pairwise and DINO steps ran out of their time in Triton's
compiler, not in timed runs. This script moves that work to the CPU machine:

``build`` (needs torch, torchfg and the GPU machines' Triton, e.g. ``/work/venv36``):
    runs the benchmark plan of ``benchmarks/gpu_session.sh`` (its ``--print-plan`` lines: the same
    ``torchfg bench`` arguments) on CPU tensors, with the Triton cases' launches going through
    Triton's own runtime for an sm_90 target: the real binder specialises every argument, the
    autotuner compiles every config that survives its pruning (its benchmark is replaced by fixed
    timings), and each launch compiles but does not run (``warmup=True``). The launchers see an
    H100 (132 SMs, ``compile_sm90._EmulatedH100``), as on the GPU machines. Each case runs again
    with each autotune config as the winner (launchers that read the winner compile more). Each
    compiled kernel (its cubin and metadata) goes into the bundle with what the runtime's cache key
    was made of: the kernel's module and name, signature, constexprs, 16-divisibility attributes
    and options, and the hash of its source and of the jit functions it calls.
    Before writing, every entry's key is recomputed from what was recorded and must equal the key
    the runtime used, so that the recorded description is lossless.

``install`` (on the GPU machine, before the tests and benchmarks):
    rebuilds each entry's ``ASTSource`` from the installed torchfg and computes the cache key with
    the machine's own Triton (``get_cache_key``, as ``triton.compile`` does), then stores the cubin
    under that key in ``TRITON_CACHE_DIR``. A launch with the same specialisation then loads it
    instead of compiling. The key's hash of Triton's own files (``triton_key``) is therefore the
    machine's, not the build's: they differ between the cp311 and cp312 wheels of one release.
    Everything else must match, or nothing (or the entry) is installed: the Triton version and the
    hash of its Python files, the target, the ptxas version, libdevice, the parsed compile options,
    the cache-invalidating environment and the kernel's source hash (a cubin of older source would
    otherwise run under the new one's key). It always exits 0: a stale bundle costs compile time.

``report`` (at the end of the session):
    lists the kernels the machine compiled itself (cache entries that ``install`` did not write),
    so that the next build can cover them.

Examples::

    # here (torch CPU + triton 3.6): writes gpu-cache/triton-sm90.tgz
    TRITON_CACHE_DIR=/work/tc-build36 /work/venv36/bin/python benchmarks/triton_cache_sm90.py build
    # on the GPU machine (gpu_session.sh does both; carry=["wheels", "gpu-cache/triton-sm90.tgz"])
    python benchmarks/triton_cache_sm90.py install gpu-cache/triton-sm90.tgz
    python benchmarks/triton_cache_sm90.py report

``build`` also takes ``--bench ARGS`` (one ``torchfg bench`` argument string, repeatable) instead of
the session's plan, ``--sizes-cap N`` for a quick look, and ``--require-cached`` (fail if a kernel
was not in the cache: after ``install``, the check that the bundle serves the plan). The build's
venv needs torch (the CPU wheel), numpy and the GPU machines' Triton (3.6).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MANIFEST = "manifest.json"
TARGET = ("cuda", 90, 32)  # an H100 and an H200 are both sm_90


# --------------------------------------------------------------------------------------------
# What a cache key is made of, written as JSON and read back exactly.
# --------------------------------------------------------------------------------------------


def encode_value(value: Any) -> Any:
    """A constexpr value as JSON, keeping what ``str()`` and ``cache_key`` see (the key uses them)."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    if isinstance(value, tl.constexpr):
        return {"constexpr": encode_value(value.value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r} ({type(value).__name__})")


def decode_value(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        return tl.dtype(value["dtype"])
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(decode_value(value["constexpr"]))
    return value


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively: how an option compares after a JSON round trip."""
    return json.loads(json.dumps(value))


def _options_json(options: Any) -> dict[str, Any]:
    # extern_libs holds this machine's path to libdevice; the key hashes the file's content.
    return _jsonable({k: v for k, v in options.__dict__.items() if k != "extern_libs"})


def _unwrap_jit(obj: Any) -> Any:
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):  # @autotune / @heuristics wrap the JITFunction in .fn
        obj = obj.fn
    return obj


def _kernel(module: str, name: str) -> Any:
    import importlib

    return _unwrap_jit(getattr(importlib.import_module(module), name))


def triton_python_hash() -> str:
    """The hash of Triton's Python files that ``triton_key`` covers (its compiler, backends and
    language packages, and ``runtime/cache.py``), without the compiled ``libtriton``: equal in
    every wheel of one release (cp311 here, cp312 on the GPU machines), unlike the whole key."""
    import pkgutil

    import triton
    import triton.runtime.cache as cache

    root = Path(triton.__file__).parent
    digests = [hashlib.sha256(Path(cache.__file__).read_bytes()).hexdigest()]
    for package in ("compiler", "backends", "language"):
        for lib in pkgutil.walk_packages([str(root / package)], prefix=f"triton.{package}."):
            origin = lib.module_finder.find_spec(lib.name).origin
            digests.append(hashlib.sha256(Path(origin).read_bytes()).hexdigest())
    return hashlib.sha256("-".join(digests).encode()).hexdigest()


def libdevice_hash(options: Any) -> str:
    """The content hash of the libdevice the options link (kernels calling its math functions
    embed it; the key hashes the machine's file, the cubin holds the build's)."""
    return hashlib.sha256(Path(dict(options.extern_libs)["libdevice"]).read_bytes()).hexdigest()


def _backend() -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget(*TARGET))


def entry_key(entry: dict[str, Any], backend: Any, env_vars: dict[str, str]) -> tuple[str, Any, Any]:
    """(cache hash, ASTSource, parsed options) of a recorded entry, computed as ``triton.compile`` does."""
    from triton.compiler.compiler import ASTSource
    from triton.runtime.cache import get_cache_key

    fn = _kernel(entry["module"], entry["name"])
    constexprs = {tuple(path): decode_value(v) for path, v in entry["constexprs"]}
    attrs = {tuple(path): v for path, v in entry["attrs"]}
    src = ASTSource(fn, dict(entry["signature"]), constexprs, attrs)
    options = backend.parse_options(dict(entry["launch_options"]))
    key = get_cache_key(src, backend, options, env_vars=env_vars)
    return hashlib.sha256(key.encode("utf-8")).hexdigest(), src, options


# --------------------------------------------------------------------------------------------
# build: the session's benchmark cases, launched through Triton's runtime for sm_90, nothing run.
# --------------------------------------------------------------------------------------------


class _NoGpuDriver:
    """What ``JITFunction.run`` asks the active driver before it compiles: an sm_90 device 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:  # noqa: ARG002 - one stream
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*TARGET)


class Recorder:
    """Compiles every launch for sm_90 through Triton's runtime (warmup: compile, no launch) and
    records what each compiled kernel's cache key was made of."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.entries: dict[str, dict[str, Any]] = {}
        self.case = ""
        self.errors: list[str] = []
        self.compiled: list[str] = []  # compiled here, not found in TRITON_CACHE_DIR
        self.from_cache = 0
        # The config the made-up timings make fastest: the ``winner``-th of each autotuner's list
        # (or the next one its pruning kept). A launcher that reads the winner (the mining kernel's
        # second pass takes its BLOCK_M) compiles other kernels for other winners, and a GPU may
        # choose any of them: build() reruns each case once per winner.
        self.winner = 0
        self.most_configs = 1
        # What a launch with no options of its own compiles with; an entry records the difference.
        self.default_options = _options_json(_backend().parse_options({}))

    def __enter__(self) -> "Recorder":
        import torch
        from triton import knobs
        from triton.runtime import autotuner, jit
        from triton.runtime.driver import driver
        from triton._C.libtriton import get_cache_invalidating_env_vars

        import torchfg.backends as backends

        recorder = self
        self._saved = [(jit.JITFunction, "run", jit.JITFunction.run),
                       (jit.JITFunction, "_do_compile", jit.JITFunction._do_compile),
                       (autotuner.Autotuner, "_bench", autotuner.Autotuner._bench)]
        run, do_compile = jit.JITFunction.run, jit.JITFunction._do_compile
        self.env_vars = dict(get_cache_invalidating_env_vars())

        def compile_only(fn, *args, grid, warmup, **kwargs):  # noqa: ARG001 - nothing is launched
            return run(fn, *args, grid=grid, warmup=True, **kwargs)

        def record(fn, key, signature, device, constexprs, options, attrs, warmup):
            misses, start = len(recorder.compiled), time.perf_counter()
            kernel = do_compile(fn, key, signature, device, constexprs, options, attrs, warmup)
            seconds = time.perf_counter() - start if len(recorder.compiled) > misses else None
            if kernel is not None:  # None: a jit_cache_hook took the compile (build() refuses those)
                recorder.add(fn, signature, constexprs, attrs, options, kernel, seconds)
            return kernel

        def bench(tuner, *args, config, **meta):
            # Compile the config as the real benchmark would, with made-up timings. A config the
            # compiler rejects is reported as the real one would be (infinitely slow), and noted.
            from triton.compiler.errors import CompileTimeAssertionFailure
            from triton.runtime.errors import OutOfResources, PTXASError

            try:
                tuner.fn.run(*args, **dict(meta, **config.all_kwargs()))
            except (OutOfResources, CompileTimeAssertionFailure, PTXASError) as exc:
                recorder.errors.append(f"{recorder.case}: {config}: {type(exc).__name__}")
                return [float("inf")] * 3
            names = [str(c) for c in tuner.configs]
            position = names.index(str(config)) if str(config) in names else 0
            recorder.most_configs = max(recorder.most_configs, len(names))
            return [1.0 + (position - recorder.winner) % len(names)] * 3

        def listen(*, src, metadata, metadata_group, times, cache_hit):  # noqa: ARG001
            if cache_hit:
                recorder.from_cache += 1
            else:
                recorder.compiled.append(f"{recorder.case}: {src.name}")

        self._listener = knobs.compilation.listener
        knobs.compilation.listener = listen
        # No kernel runs, so what the kernels would have written stays as allocated: garbage indices
        # would stop a case at its first gather (k-NN). Fresh allocations are zeroed instead.
        for name in ("empty", "empty_like", "empty_strided"):
            original = getattr(torch, name)

            def zeroed(*args, _original=original, **kwargs):
                return _original(*args, **kwargs).zero_()

            self._saved.append((torch, name, original))
            setattr(torch, name, zeroed)
        jit.JITFunction.run = compile_only
        jit.JITFunction._do_compile = record
        autotuner.Autotuner._bench = bench
        # CPU tensors stand in for CUDA ones: the backends must accept them, also where a module
        # imported the check by name (k-NN's recomputation by the selected-pair kernel).
        import torchfg.bench.core  # noqa: F401 - the benchmark modules import it too
        import torchfg.ops.knn  # noqa: F401

        original_status = backends.triton_status
        for module in [m for name, m in sys.modules.items() if name.startswith("torchfg")]:
            if getattr(module, "triton_status", None) is original_status:
                self._saved.append((module, "triton_status", original_status))
                module.triton_status = lambda device=None: (True, "compile only (triton_cache_sm90.py)")
        self._active = driver._active  # None until a real driver was asked for; no GPU here
        driver.set_active(_NoGpuDriver())
        return self

    def __exit__(self, *exc: Any) -> None:
        from triton import knobs
        from triton.runtime.driver import driver

        knobs.compilation.listener = self._listener
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        driver._active = self._active

    @staticmethod
    def forget_tuning() -> None:
        """Every autotuner's choices (Triton's and torchfg's memo of them), so the next call tunes."""
        import gc

        from triton.runtime.autotuner import Autotuner

        from torchfg.ops._triton_utils import AutotunedLaunch

        for obj in gc.get_objects():
            kind = type(obj)  # not isinstance: some module proxies warn when asked for __class__
            if issubclass(kind, Autotuner):
                obj.cache.clear()
            elif issubclass(kind, AutotunedLaunch):
                obj._memo.clear()

    def add(self, fn: Any, signature: dict, constexprs: dict, attrs: dict, options: Any, kernel: Any,
            compile_seconds: float | None) -> None:
        if kernel.hash in self.entries:
            return
        files = {Path(p).suffix[1:]: Path(p) for p in kernel.metadata_group.values()}
        given = _options_json(options)
        launch_options = {k: v for k, v in given.items() if self.default_options.get(k) != v}
        if any(isinstance(v, (list, dict)) for v in launch_options.values()):
            raise ValueError(f"{fn.fn.__name__}: options {launch_options} are not all scalars")
        entry = {
            "module": fn.module,
            "name": fn.fn.__name__,
            # The hash of the kernel's source and of every jit function it calls: the key is
            # recomputed from the machine's source, so a cubin of older source must not be stored.
            "source_key": fn.cache_key,
            "file_name": kernel.src.name[:150],
            "signature": list(signature.items()),
            "constexprs": [[list(path), encode_value(v)] for path, v in constexprs.items()],
            "attrs": [[list(path), v] for path, v in attrs.items()],
            "launch_options": launch_options,
            "options": given,
            "hash": kernel.hash,
            "case": self.case,
            "compile_s": None if compile_seconds is None else round(compile_seconds, 2),
        }
        folder = self.out / kernel.hash
        folder.mkdir(parents=True, exist_ok=True)
        for ext in ("cubin", "json"):
            shutil.copyfile(files[ext], folder / f"{entry['file_name']}.{ext}")
        self.entries[kernel.hash] = entry


def session_plan() -> list[list[str]]:
    """The ``torchfg bench`` argument lists of ``gpu_session.sh`` (its ``--print-plan``)."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--print-plan"],
                          capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def _bench_runs(argv: list[str], sizes_cap: int | None) -> Iterator[tuple[str, Any, Any]]:
    """(label, problem, step) for each Triton case x size of one ``torchfg bench`` argument list, each preceded
    by the tiny warm-up problem ``measure_case`` runs first (``_warm_libraries``)."""
    import dataclasses

    import torch

    from torchfg.bench.cli import add_arguments
    from torchfg.bench.core import _op_params, load_op, parse_dtype

    parser = argparse.ArgumentParser(prog="torchfg bench", add_help=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    dtypes = [torch.bfloat16 if d == "auto" else parse_dtype(d) for d in args.dtype.split(",")]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op in (load_op(name) for name in args.ops):
        # The Triton cases; a CUDA-graph case captures the plain case's kernels (and needs a GPU).
        cases = [c for c in op.cases() if (args.cases is None or c.name in args.cases) and "triton" in c.name
                 and "cudagraph" not in c.name]
        params = _op_params(op, dict(args.param))
        d = args.dim or op.default_dim["cuda"]
        for dtype in dtypes:
            for n in args.sizes or op.default_sizes["cuda"]:
                # Never below what the parameters allow (k-NN's k, a cross-batch memory's batch).
                n = max(min(n, sizes_cap), op.smallest_size(params)) if sizes_cap else n
                # Made for CUDA, as on the GPU machine (xbm sizes its batch by the device type),
                # then run on the CPU.
                problem = dataclasses.replace(op.make_problem(n, d, dtype, cuda, args.seed, **params), size=n,
                                              device=cpu)
                tiny = dataclasses.replace(
                    op.make_problem(op.warm_up_size(problem), d, dtype, cuda, args.seed, **params), device=cpu)
                for case in cases:
                    if not case.supports(problem)[0]:
                        continue
                    label = f"{op.name} {case.name} N={n} {str(dtype)[6:]} {problem.params_text()}"
                    yield label + " (warm-up size)", tiny, lambda case=case, tiny=tiny: case.setup(tiny)()
                    yield label, problem, lambda case=case, problem=problem: case.setup(problem)()


def _compile_seconds(entries: list[dict[str, Any]]) -> float:
    return sum(e["compile_s"] or 0.0 for e in entries)


def build(out: Path, plans: list[list[str]], sizes_cap: int | None, require_cached: bool = False,
          rotation_seconds: float = 30.0) -> int:
    """Write the bundle; with ``require_cached``, fail if any kernel was not already in the cache
    (the check that an installed bundle serves these launches)."""
    import triton

    from compile_sm90 import _EmulatedH100

    from triton import knobs

    # Code that is not the source's compiled under the source's key: not for a bundle.
    overrides = [name for name, on in (
        ("TRITON_KERNEL_OVERRIDE", knobs.compilation.override),
        ("TRITON_INSTRUMENTATION_MODE", bool(knobs.compilation.instrumentation_mode)),
        ("knobs.runtime.add_stages_inspection_hook", getattr(knobs.runtime, "add_stages_inspection_hook", None)),
        ("knobs.runtime.jit_cache_hook", knobs.runtime.jit_cache_hook),
    ) if on]
    if overrides:
        print(f"triton cache: not building with {', '.join(overrides)} set")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(out)
    failed = []
    start = time.perf_counter()
    with _EmulatedH100(), recorder:
        for argv in plans:
            for label, _, step in _bench_runs(argv, sizes_cap):
                recorder.case = label
                before, t0 = len(recorder.entries), time.perf_counter()
                recorder.most_configs, winners = 1, 0
                try:
                    step()
                    # Other winners, within a time cap: the slow cases (N = 32768 and up) are the
                    # torch side's CPU time, and their kernels mostly match the smaller sizes'.
                    while winners + 1 < recorder.most_configs and time.perf_counter() - t0 < rotation_seconds:
                        winners += 1
                        recorder.forget_tuning()
                        recorder.winner = winners
                        step()
                except Exception as exc:  # noqa: BLE001 - reported; the other cases still build
                    failed.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
                finally:
                    recorder.winner = 0
                    recorder.forget_tuning()
                print(f"{label}: {len(recorder.entries) - before} new kernels, {winners + 1} of "
                      f"{recorder.most_configs} winners, {time.perf_counter() - t0:.1f} s", flush=True)
    backend = _backend()

    def reproducible(digest: str, entry: dict[str, Any]) -> bool:
        try:
            return entry_key(entry, backend, recorder.env_vars)[0] == digest
        except Exception as exc:  # noqa: BLE001 - one odd entry must not cost the others
            recorder.errors.append(f"{entry['name']}: key not recomputable: {type(exc).__name__}: {exc}")
            return False

    mismatched = [h for h, e in recorder.entries.items() if not reproducible(h, e)]
    manifest = {
        "triton": triton.__version__, "triton_python": triton_python_hash(), "target": list(TARGET),
        "backend": backend.hash(), "libdevice": libdevice_hash(backend.parse_options({})),
        "env_vars": recorder.env_vars, "built": time.strftime("%Y-%m-%d %H:%M:%S"), "plans": plans,
        "entries": [e for h, e in recorder.entries.items() if h not in mismatched],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for h in mismatched:
        shutil.rmtree(out / h, ignore_errors=True)
    # One compressed file to carry (cubins shrink about 4x; the device tool's carry is 64 MiB);
    # the folder goes, so that carrying gpu-cache/ does not send everything twice.
    archive = out.parent / (out.name + ".tgz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=".")
    shutil.rmtree(out)
    size = archive.stat().st_size
    print(f"{archive}: {len(manifest['entries'])} kernels ({size / 2**20:.1f} MiB) for triton {triton.__version__} in "
          f"{time.perf_counter() - start:.0f} s ({len(recorder.compiled)} compiled, {recorder.from_cache} found in "
          f"the cache; {_compile_seconds(manifest['entries']):.0f} s of compiling); {len(mismatched)} left out "
          f"(key not reproducible); {len(recorder.errors)} configs the compiler rejected; {len(failed)} cases failed")
    for line in recorder.errors + failed + (recorder.compiled if require_cached else []):
        print("  " + line)
    return 1 if failed or mismatched or (require_cached and recorder.compiled) else 0


# --------------------------------------------------------------------------------------------
# install / report: on the GPU machine.
# --------------------------------------------------------------------------------------------


def install(bundle: Path) -> int:
    """Store the bundle's kernels in this machine's Triton cache under this machine's keys."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_manager

    manifest = json.loads((bundle / MANIFEST).read_text())
    backend = _backend()
    env_vars = dict(get_cache_invalidating_env_vars())
    try:  # the GPU's own target; a machine without one is taken for the bundle's (tests)
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
        here = [target.backend, target.arch, target.warp_size]
    except Exception:  # noqa: BLE001 - no driver: no GPU here
        here = list(TARGET)
    mismatch = [
        f"{what}: bundle {theirs!r}, here {ours!r}" for what, theirs, ours in (
            ("target", manifest["target"], here),
            ("triton", manifest["triton"], triton.__version__),
            ("triton's Python files", manifest.get("triton_python"), triton_python_hash()),
            ("compiler backend (ptxas version, arch)", manifest["backend"], backend.hash()),
            ("libdevice", manifest.get("libdevice"), libdevice_hash(backend.parse_options({}))),
            ("cache-invalidating environment", manifest["env_vars"], env_vars),
        ) if theirs != ours
    ]
    if mismatch:
        print("triton cache bundle not installed: " + "; ".join(mismatch))
        return 0
    installed, skipped, failed = [], [], []
    # Listed as they are written: a step stopped mid-way still tells report what came from here.
    listing = _installed_list()
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("")
    for entry in manifest["entries"]:
        try:
            digest, src, options = entry_key(entry, backend, env_vars)
        except Exception as exc:  # noqa: BLE001 - e.g. a kernel renamed since the build
            failed.append(f"{entry['name']}: {type(exc).__name__}: {exc}")
            continue
        if src.fn.cache_key != entry["source_key"]:
            skipped.append(f"{entry['name']}: its source (or a jit function it calls) changed since the build")
            continue
        if _options_json(options) != entry["options"]:
            skipped.append(f"{entry['name']}: compile options differ here")
            continue
        name = entry["file_name"]
        cache = get_cache_manager(digest)
        if cache.get_group(f"{name}.json") is None:
            metadata = json.loads((bundle / entry["hash"] / f"{name}.json").read_text())
            # The metadata a compile here would write: this key's hash and this machine's options.
            metadata.update(options.__dict__, hash=digest)
            paths = {
                f"{name}.cubin": cache.put((bundle / entry["hash"] / f"{name}.cubin").read_bytes(), f"{name}.cubin"),
                f"{name}.json": cache.put(json.dumps(metadata), f"{name}.json", binary=False),
            }
            cache.put_group(f"{name}.json", paths)
        installed.append(Path(cache.cache_dir).name)  # the key's folder (base32 of the hash)
        with listing.open("a") as f:
            f.write(installed[-1] + "\n")
    print(f"triton cache: {len(installed)} kernels installed (built {manifest['built']}), {len(skipped)} skipped, "
          f"{len(failed)} failed")
    for line in skipped[:20] + failed[:20]:
        print("  " + line)
    # A stale bundle costs compile time, not the session: the entries it could not place compile.
    return 0


def _installed_list() -> Path:
    """Where ``install`` lists the cache folders it wrote: in the cache directory itself (Triton
    reads only its key folders), so that ``report`` needs nothing but the cache."""
    from triton import knobs

    return Path(knobs.cache.dir) / "torchfg-bundle-installed.txt"


def _installed() -> list[str]:
    path = _installed_list()
    return path.read_text().split() if path.exists() else []


def compiled_here() -> list[str]:
    """The kernels in this machine's Triton cache that ``install`` did not put there."""
    from triton import knobs

    cache_dir = Path(knobs.cache.dir)
    installed = set(_installed())
    found = []
    for folder in sorted(cache_dir.glob("*")) if cache_dir.is_dir() else []:
        if folder.name in installed or not folder.is_dir():
            continue
        groups = [p.name[len("__grp__"):-len(".json")] for p in folder.glob("__grp__*.json")]
        found.extend(f"{folder.name} {g}" for g in groups)
    return found


def report(save: Path | None = None, exclude: Path | None = None) -> int:
    """Print what this machine compiled itself; ``save`` writes that list, ``exclude`` leaves out
    what an earlier saved list holds (the session's tests compile their own small kernels)."""
    found = compiled_here()
    if save is not None:
        save.write_text("".join(line + "\n" for line in found))
    earlier = set(exclude.read_text().splitlines()) if exclude is not None and exclude.exists() else set()
    found = [line for line in found if line not in earlier]
    names = collections.Counter(line.split()[1] for line in found)
    since = f" (after the {len(earlier)} of {exclude.name})" if exclude is not None else ""
    print(f"triton cache: {len(_installed())} kernels came from the bundle; compiled on this machine{since}: "
          f"{len(found)}" + "".join(f"\n  {n} x {name}" for name, n in names.most_common()))
    return 0


def main(argv: list[str] | None = None) -> int:
    # The kernels must be real JITFunctions, not the interpreter's stand-ins: unset before triton
    # is imported (here, not at import time, so that importing this module changes nothing).
    os.environ.pop("TRITON_INTERPRET", None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the session's Triton kernels for sm_90 into a bundle")
    b.add_argument("--out", type=Path, default=ROOT / "gpu-cache" / "triton-sm90",
                   help="the bundle's folder while it is built; what stays is the archive <out>.tgz")
    b.add_argument("--bench", action="append", default=None, metavar="ARGS",
                   help="one `torchfg bench` argument string (default: gpu_session.sh --print-plan)")
    b.add_argument("--sizes-cap", type=int, default=None, help="cap every N (a quick look; keys differ)")
    b.add_argument("--rotation-seconds", type=float, default=30.0,
                   help="per case, how long to keep rerunning it with the next autotune winner (default 30)")
    b.add_argument("--require-cached", action="store_true",
                   help="fail if a kernel had to be compiled (checks that an installed bundle serves the plan)")
    sub.add_parser("install", help="store a bundle's kernels in this machine's cache").add_argument("bundle", type=Path)
    r = sub.add_parser("report", help="list the kernels this machine compiled itself (TRITON_CACHE_DIR)")
    r.add_argument("--save", type=Path, default=None, help="also write the list to this file")
    r.add_argument("--exclude", type=Path, default=None, help="leave out the kernels a saved list holds")
    args = parser.parse_args(argv)
    if args.command == "build":
        plans = [shlex.split(a) for a in args.bench] if args.bench else session_plan()
        if args.out.exists():
            shutil.rmtree(args.out)
        return build(args.out, plans, args.sizes_cap, args.require_cached, args.rotation_seconds)
    if args.command == "report":
        return report(args.save, args.exclude)
    if args.bundle.suffix == ".tgz" and args.bundle.is_file():
        with tempfile.TemporaryDirectory() as unpacked, tarfile.open(args.bundle) as tar:
            tar.extractall(unpacked, filter="data")
            return install(Path(unpacked))
    if not (args.bundle / MANIFEST).exists():
        print(f"triton cache: no bundle at {args.bundle}")
        return 0
    return install(args.bundle)

if __name__ == "__main__":
    raise SystemExit(main())
