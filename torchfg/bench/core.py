"""The benchmark engine behind ``torchfg bench``: problems, cases, the floor and the run loop.

Each op module (``torchfg.bench.pairwise``, ``triplet``, ...) defines one :class:`OpBench`: how
to build a :class:`Problem` of size N, the FLOP model, and its :class:`Case` list (every torchfg
backend plus the baselines). :func:`run_benchmarks` measures every available case at every size
and returns one :class:`Result` per (op, size, case), measured or skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from torchfg.bench.measure import Measurement, environment_fields, matmul_floor, measure

__all__ = [
    "Problem",
    "Case",
    "OpBench",
    "Result",
    "OP_NAMES",
    "load_op",
    "run_benchmarks",
    "module_installed",
    "triton_available",
    "api_available",
    "parse_dtype",
    "resolve_device",
    "default_dtype",
    "parse_param",
]

OP_NAMES = ("pairwise", "triplet", "atl", "knn", "dino", "xbm")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"fp32"`` / ``"fp64"`` (and long names) -> dtype."""
    if not isinstance(name, str) or name.lower() not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, got {name!r}")
    return DTYPES[name.lower()]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (or a torch.device)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device={str(device)!r} does not exist: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return device


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device inside the block (nothing on a CPU).

    Triton launches its kernels, and PyTorch creates streams and events, on the current device,
    not on the inputs' one: without this a run on ``cuda:1`` would time ``cuda:0``'s stream.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (what large-batch training uses), fp32 on CPUs (bf16 GEMMs are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Problem:
    """One benchmark size: ``n`` rows (anchors / queries / batch) against ``m`` candidates, width ``d``.

    ``params`` are the op's settable parameters (``torchfg bench --param k=100``) after the
    defaults were filled in; ``extra`` holds every op-specific size derived from them (classes per
    batch, text width, k, crops, ...). The setup functions build their inputs from ``extra`` with
    ``seed``, so that a subprocess given ``(n, d, dtype, device, seed, params)`` rebuilds the same data.
    """

    op: str
    n: int
    m: int
    d: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    size: int = 0

    @property
    def requested_size(self) -> int:
        """The N this problem was made for (``make_problem``'s first argument; ``n`` unless set).

        It differs from ``n`` where N sizes something else: ``xbm``'s N is the memory (``m``),
        its ``n`` the batch.
        """
        return self.size or self.n

    def params_text(self) -> str:
        """``"k=10;metric=euclidean"``: the parameters as stored in the CSV's ``params`` column."""
        return ";".join(f"{key}={value}" for key, value in sorted(self.params.items()))

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def randn(self, *shape: int, requires_grad: bool = False, gen: torch.Generator | None = None) -> torch.Tensor:
        """Standard-normal data drawn on the CPU (reproducible on every device), then moved."""
        t = torch.randn(*shape, generator=gen or self.generator()).to(device=self.device, dtype=self.dtype)
        return t.requires_grad_(requires_grad)


@dataclass(frozen=True)
class Case:
    """One thing to time: a torchfg backend or a baseline.

    Args:
        name: label in tables, CSVs and plots (``"torchfg[triton]"``, ``"torch.cdist"``, ...).
        setup: builds the inputs of a :class:`Problem` and returns a closure doing the work
            (forward + backward where the op is trained through).
        kind: ``"torchfg"`` or ``"baseline"``.
        available: ``(device, dtype) -> (ok, why not)``; checked before ``setup``.
        gpu_kernel: a GPU kernel (listed as skipped on a CPU machine).
        countable: its work runs through PyTorch ops, so :func:`torchfg.bench.profile.profile_step`
            can count its launches (False for faiss, whose work is invisible to PyTorch).
        supports: ``problem -> (ok, why not)``: whether the case computes this problem's
            parameters (e.g. a baseline with one metric only); checked before ``setup``.
        own_thread_pool: on a CPU the case runs on an OpenMP runtime of its own (faiss-cpu
            bundles a second libgomp): it is always measured in a fresh process, because two
            runtimes in one process starve each other's threads (measured on 2 cores: faiss
            and torchfg k-NN at N = 512 took 21 and 10 ms in one process, 2.5 and 3.6 ms apart).
        memory_unmeasured: why this case's peak memory cannot be measured (empty: it can). Its
            rows then record no peak and ``memory_method`` ``"not measured: <why>"``, rather
            than a figure that reads like a measurement.
    """

    name: str
    setup: Callable[[Problem], Callable[[], Any]]
    kind: str = "torchfg"
    available: Callable[[torch.device, torch.dtype], tuple[bool, str]] = lambda device, dtype: (True, "")
    gpu_kernel: bool = False
    countable: bool = True
    supports: Callable[[Problem], tuple[bool, str]] = lambda problem: (True, "")
    own_thread_pool: bool = False
    memory_unmeasured: str = ""


@dataclass(frozen=True)
class OpBench:
    """The benchmark of one op.

    Args:
        name: op name on the command line.
        title: what is timed, e.g. ``"pairwise_distance(x) euclidean, forward + backward"``.
        flop_model: the FLOP count formula in words; ``flops`` evaluates it (None: not compute bound).
        make_problem: ``(n, d, dtype, device, seed, **params) -> Problem``.
        cases: ``() -> list[Case]``.
        default_sizes: N per device type.
        default_dim: D per device type.
        shape: ``Problem -> str`` describing the inputs.
        floor_shape: ``Problem -> (n, m, d)`` of the ``x @ y.T`` floor (default ``(n, m, d)``).
        floor: alternative floor ``Problem -> (label, closure)`` for ops that are not GEMM bound.
        requires: ``() -> (ok, why not)``: whether the op's public API is importable.
        params: the op's settable parameters and their defaults (``torchfg bench --param``);
            ``make_problem`` checks their values.
        smallest_size: ``params -> N``: the smallest size ``make_problem`` accepts with these
            parameters (k-NN's k, cross-batch memory's batch); 2 by default.
    """

    name: str
    title: str
    flop_model: str
    flops: Callable[[Problem], float | None]
    make_problem: Callable[..., Problem]
    cases: Callable[[], list[Case]]
    default_sizes: dict[str, tuple[int, ...]]
    default_dim: dict[str, int]
    shape: Callable[[Problem], str]
    floor_shape: Callable[[Problem], tuple[int, int, int]] | None = None
    floor: Callable[[Problem], tuple[str, Callable[[], Any]]] | None = None
    requires: Callable[[], tuple[bool, str]] = lambda: (True, "")
    params: dict[str, Any] = field(default_factory=dict)
    smallest_size: Callable[[dict[str, Any]], int] = lambda params: 2

    def warm_up_size(self, problem: Problem) -> int:
        """The N of the tiny problem that loads libraries and compiles kernels before ``problem``'s
        measurement: 32, or the smallest size these parameters allow, at most ``problem``'s own."""
        return min(problem.requested_size, max(32, self.smallest_size(problem.params)))

    def floor_label(self, problem: Problem) -> str:
        if self.floor is not None:
            return self.floor(problem)[0]
        n, m, d = self.floor_shape(problem) if self.floor_shape else (problem.n, problem.m, problem.d)
        return f"x @ y.T ({n}x{d} @ {d}x{m})"


@dataclass
class Result:
    """One row: a measurement (``status == "ok"``), a skipped case or a failed one."""

    op: str
    case: str
    kind: str
    n: int
    m: int
    d: int
    dtype: str
    shape: str
    status: str
    measurement: Measurement | None = None
    flops: float | None = None
    flop_model: str = ""
    floor_ms: float | None = None
    floor: str = ""
    isolated: bool = False
    gpu_kernel: bool = False
    env: dict[str, str] = field(default_factory=dict)
    params: str = ""
    launches: int | None = None
    tensor_peak_bytes: int | None = None
    size: int = 0
    kernel_times: list | None = None  # not a CSV column: ``torchfg bench --kernel-times`` writes its own file

    @property
    def tflops(self) -> float | None:
        if self.measurement is None or self.flops is None or self.measurement.median_ms <= 0:
            return None
        return self.flops / (self.measurement.median_ms * 1e-3) / 1e12

    @property
    def floor_ratio(self) -> float | None:
        if self.measurement is None or not self.floor_ms:
            return None
        return self.measurement.median_ms / self.floor_ms

    def csv_row(self) -> dict[str, Any]:
        """The CSV columns (environment first, then shapes, then numbers)."""
        m = self.measurement

        def num(x: float | None, digits: int = 4) -> str:
            return "" if x is None else f"{x:.{digits}g}"

        return {
            **self.env,
            "op": self.op,
            "case": self.case,
            "kind": self.kind,
            "status": self.status,
            "n": self.n,
            "m": self.m,
            "d": self.d,
            "dtype": self.dtype,
            "shape": self.shape,
            "params": self.params,
            "median_ms": num(None if m is None else m.median_ms, 5),
            "p20_ms": num(None if m is None else m.p20_ms, 5),
            "p80_ms": num(None if m is None else m.p80_ms, 5),
            "repeats": "" if m is None else m.repeats,
            "flops": num(self.flops, 6),
            "tflops": num(self.tflops),
            "flop_model": self.flop_model,
            "floor": self.floor,
            "floor_ms": num(self.floor_ms, 5),
            "floor_ratio": num(self.floor_ratio),
            "peak_extra_mib": "" if m is None or m.peak_extra_bytes is None else f"{m.peak_extra_bytes / 2**20:.2f}",
            "memory_method": "" if m is None else m.memory_method,
            "launches": "" if self.launches is None else self.launches,
            "tensor_peak_mib": "" if self.tensor_peak_bytes is None else f"{self.tensor_peak_bytes / 2**20:.2f}",
            "isolated": int(self.isolated),
        }


CSV_COLUMNS = tuple(
    Result("", "", "", 0, 0, 0, "", "", "ok", env=dict.fromkeys(("device", "torchfg", "torch", "triton", "commit", "threads", "load_avg"), "")).csv_row()
)


@contextlib.contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block, restored (or removed) after it."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def with_environment(
    setup: Callable[[Problem], Callable[[], Any]], name: str, value: str
) -> Callable[[Problem], Callable[[], Any]]:
    """A case's setup whose steps run with the environment variable ``name`` set to ``value``
    (an opt-in kernel timed next to the default one)."""

    def wrapped(problem: Problem) -> Callable[[], Any]:
        run = setup(problem)

        def run_with_environment() -> Any:
            with environment_variable(name, value):
                return run()

        return run_with_environment

    return wrapped


def in_cuda_graph(setup: Callable[[Problem], Callable[[], Any]]) -> Callable[[Problem], Callable[[], Any]]:
    """A case's setup whose step is captured once in a CUDA graph, then replayed.

    What a training loop gets by capturing its step (``torch.cuda.graph``): the host's launch work
    is gone, so a small batch's step costs its kernels' time. The step is first run twice on a side
    stream (the autotuner's choices and the kernels' module loads happen there, as the CUDA graph
    documentation asks), then captured with its backward; a replay writes the same output tensors.
    """

    def wrapped(problem: Problem) -> Callable[[], Any]:
        if problem.device.type != "cuda":
            raise NotImplementedError("a CUDA graph needs a CUDA device")
        run = setup(problem)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()

        def replay() -> Any:
            graph.replay()
            return captured

        return replay

    return wrapped


# What a :func:`in_cuda_graph` case's rows say for its memory (:attr:`Case.memory_unmeasured`).
CUDA_GRAPH_MEMORY = "CUDA graph pool allocated at capture"


def cuda_graph_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """A :attr:`Case.available` check for :func:`in_cuda_graph` cases of Triton kernels."""
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    return triton_available(device, dtype)


# How to install what a baseline imports (the bench extra brings them all).
_INSTALL_HINTS = {"pytorch_metric_learning": "pip install pytorch-metric-learning, or torchfg[bench]"}


def module_installed(module: str) -> Callable[[torch.device, torch.dtype], tuple[bool, str]]:
    """A :attr:`Case.available` check: the third-party ``module`` is importable."""

    def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if importlib.util.find_spec(module) is None:
            hint = _INSTALL_HINTS.get(module)
            return False, f"{module} is not installed" + (f" ({hint})" if hint else "")
        return True, ""

    return check


def triton_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """A :attr:`Case.available` check for Triton kernels on ``device``."""
    from torchfg.backends import triton_status

    return triton_status(device)


def api_available(module: str, *names: str) -> Callable[[], tuple[bool, str]]:
    """An :attr:`OpBench.requires` check: ``from module import names`` works (the op has landed)."""

    def check() -> tuple[bool, str]:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            return False, f"{module} does not import: {exc}"
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            return False, f"{module} has no {', '.join(missing)}"
        return True, ""

    return check


def load_op(name: str) -> OpBench:
    """The :class:`OpBench` of ``torchfg.bench.<name>``."""
    if name not in OP_NAMES:
        raise ValueError(f"ops must be among {OP_NAMES}, got {name!r}")
    return importlib.import_module(f"torchfg.bench.{name}").BENCH


def parse_param(text: str) -> tuple[str, Any]:
    """``"k=100"`` -> ``("k", 100)``: ints and floats are converted, anything else stays text.

    Example:
        >>> parse_param("k=100"), parse_param("margin=0.5"), parse_param("metric=cosine")
        (('k', 100), ('margin', 0.5), ('metric', 'cosine'))
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not key.isidentifier():
        raise ValueError(f"params must look like NAME=VALUE, got {text!r}")
    value = value.strip()
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, value


def _find_case(op: OpBench, case_name: str) -> Case:
    for case in op.cases():
        if case.name == case_name:
            return case
    raise ValueError(f"{op.name} has no case {case_name!r}")


def _warm_libraries(op: OpBench, case: Case, problem: Problem) -> None:
    """Run the case once on a tiny problem: loads libraries and compiles kernels outside the window."""
    tiny = op.make_problem(op.warm_up_size(problem), problem.d, problem.dtype, problem.device, problem.seed, **problem.params)
    fn = case.setup(tiny)
    fn()
    del fn


@dataclass
class CaseRun:
    """What :func:`measure_case_and_floor` returns: the case's timing, its floor, and from the
    profiled step (``launches``) its launch count and the peak bytes of its tensors alive at once."""

    measurement: Measurement
    floor_ms: float | None = None
    launches: int | None = None
    tensor_peak_bytes: int | None = None
    kernel_times: list | None = None  # torchfg.bench.profile.KernelTime, with kernel_times=True


def measure_case(
    op: OpBench,
    case: Case,
    problem: Problem,
    *,
    warmup: int,
    repeat: int,
    max_seconds: float | None,
    launches: bool = False,
    kernel_times: bool = False,
) -> CaseRun:
    """Set up ``case`` on ``problem`` and time it (after warming its libraries on a tiny problem).

    With ``launches`` (and a ``countable`` case) one more step runs under
    :func:`torchfg.bench.profile.profile_step` after the timed ones, to count its kernel launches
    and the peak bytes of its tensors alive at once: on a CPU the one exact memory figure (the
    peak-RSS growth also holds the C allocator's retained pages and the libraries' buffers).
    """
    _warm_libraries(op, case, problem)
    fn = case.setup(problem)
    try:
        run = CaseRun(measure(fn, device=problem.device, warmup=warmup, repeat=repeat, max_seconds=max_seconds))
        if case.memory_unmeasured:
            run.measurement = dataclasses.replace(run.measurement, peak_extra_bytes=None,
                                                  memory_method=f"not measured: {case.memory_unmeasured}")
        if launches and case.countable:
            from torchfg.bench.profile import profile_step

            profile = profile_step(fn)
            run.launches, run.tensor_peak_bytes = profile.launches, profile.peak_live_bytes
        if kernel_times and case.countable:
            from torchfg.bench.profile import kernel_times as profile_kernels

            try:
                run.kernel_times = profile_kernels(fn, problem.device)
            except RuntimeError as exc:  # a profiler that cannot start (no CUPTI) must not cost the timing
                print(f"torchfg bench: no kernel times for {case.name}: {exc}".splitlines()[0], file=sys.stderr)
        return run
    finally:
        del fn
        if problem.device.type == "cuda":
            torch.cuda.empty_cache()


def measure_floor(
    op: OpBench, problem: Problem, *, warmup: int, repeat: int, max_seconds: float | None
) -> float | None:
    """Median time (ms) of the op's floor at ``problem``'s size and dtype; None if it cannot run."""
    try:
        if op.floor is not None:
            fn = op.floor(problem)[1]
            return measure(fn, device=problem.device, warmup=warmup, repeat=repeat, max_seconds=max_seconds).median_ms
        n, m, d = op.floor_shape(problem) if op.floor_shape else (problem.n, problem.m, problem.d)
        return matmul_floor(
            n, d, problem.dtype, problem.device, m=m, warmup=warmup, repeat=repeat, max_seconds=max_seconds
        ).median_ms
    except (RuntimeError, MemoryError):
        return None
    finally:
        if problem.device.type == "cuda":
            torch.cuda.empty_cache()


def measure_case_and_floor(
    op: OpBench,
    case: Case,
    problem: Problem,
    *,
    warmup: int,
    repeat: int,
    max_seconds: float | None,
    launches: bool = False,
    kernel_times: bool = False,
) -> CaseRun:
    """:func:`measure_case`, then the floor right after it in the same process.

    The floor is timed next to every case rather than once per size: on a shared machine the
    load drifts, and the ratio of two times taken minutes apart would measure the drift.
    """
    run = measure_case(op, case, problem, warmup=warmup, repeat=repeat, max_seconds=max_seconds, launches=launches,
                       kernel_times=kernel_times)
    run.floor_ms = measure_floor(op, problem, warmup=warmup, repeat=repeat, max_seconds=max_seconds)
    return run


def _limit_memory(limit_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        # RLIMIT_DATA covers the heap and private anonymous mappings (every large tensor) since
        # Linux 4.7: an allocation over the limit fails with an error instead of the OOM killer.
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    return apply


def _measure_isolated(
    op: OpBench,
    case: Case,
    problem: Problem,
    *,
    warmup: int,
    repeat: int,
    max_seconds: float | None,
    launches: bool = False,
    timeout: float | None = None,
    memory_limit_bytes: int | None = None,
) -> CaseRun:
    """:func:`measure_case_and_floor` in a fresh Python process (CPU peak-RSS figures need one).

    ``timeout`` (seconds) and ``memory_limit_bytes`` bound the process; going over either raises
    a RuntimeError that says so (recorded as the case's status).
    """
    request = {
        "op": op.name,
        "case": case.name,
        "n": problem.requested_size,
        "d": problem.d,
        "dtype": dtype_name(problem.dtype),
        "device": str(problem.device),
        "seed": problem.seed,
        "params": problem.params,
        "warmup": warmup,
        "repeat": repeat,
        "max_seconds": max_seconds,
        "launches": launches,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torchfg.bench.worker", json.dumps(request)],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=timeout,
            preexec_fn=_limit_memory(memory_limit_bytes) if memory_limit_bytes else None,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timeout: not done after {timeout:g} s (--case-timeout)") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        # "failed to map segment": the limit is below what loading torch's own libraries needs
        # (a CUDA build of torch maps more than 0.5 GiB of private data before any tensor).
        if memory_limit_bytes and ("memory" in tail[0].lower() or "failed to map segment" in tail[0]
                                   or proc.returncode < 0):
            raise MemoryError(f"over the memory limit of {memory_limit_bytes / 2**30:g} GiB (exit {proc.returncode}): {tail[0]}")
        raise RuntimeError(f"isolated run failed (exit {proc.returncode}): {tail[0]}")
    reply = json.loads(lines[-1])
    if "error" not in reply and reply.get("shape") != [problem.n, problem.m, problem.d]:
        # The worker must rebuild exactly this problem, or its numbers belong to another one.
        raise RuntimeError(f"the isolated run measured shape {reply.get('shape')}, not {[problem.n, problem.m, problem.d]}")
    if "error" in reply:
        error = reply["error"]
        if memory_limit_bytes and ("can't allocate memory" in error or error.startswith("MemoryError")
                                   or "out of memory" in error.lower()):
            raise MemoryError(f"over the memory limit of {memory_limit_bytes / 2**30:g} GiB: {error}")
        raise RuntimeError(error)
    return CaseRun(
        Measurement(**reply["measurement"]), reply.get("floor_ms"), reply.get("launches"), reply.get("tensor_peak_bytes")
    )


def _gpu_or_unavailable_skip(case: Case, device: torch.device, dtype: torch.dtype) -> str | None:
    if case.gpu_kernel and device.type != "cuda":
        return "skipped: GPU kernel (no CUDA device)"
    ok, why = case.available(device, dtype)
    if not ok:
        return f"skipped: {why}"
    return None


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {text[0] if text else ''}"[:240]


def _op_params(op: OpBench, params: dict[str, Any]) -> dict[str, Any]:
    """The op's defaults, overridden by those of ``params`` the op declares."""
    return {**op.params, **{key: value for key, value in params.items() if key in op.params}}


def run_benchmarks(
    ops: Sequence[str] = OP_NAMES,
    *,
    sizes: Sequence[int] | None = None,
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    repeat: int = 10,
    warmup: int | None = None,
    max_seconds: float | None = 5.0,
    isolate: bool = False,
    seed: int = 0,
    progress: bool = False,
    on_result: Callable[[Result], None] | None = None,
    extra_fields: dict[str, str] | None = None,
    cases: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
    launches: bool = False,
    case_timeout: float | None = None,
    memory_limit_bytes: int | None = None,
    kernel_times: bool = False,
) -> list[Result]:
    """Measure every case of every op at every size.

    Args:
        ops: op names among :data:`OP_NAMES`.
        sizes: N values (default: the op's defaults for the device type).
        dim: feature width D (default: the op's default for the device type).
        dtype: input dtype (default: bf16 on CUDA, fp32 on CPU).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a torch.device.
        repeat: timed runs per measurement (fewer once ``max_seconds`` is spent, at least 3).
        warmup: untimed runs first (default 2 on CUDA, 1 on CPU).
        max_seconds: time budget of the timed runs of one measurement.
        isolate: run each measurement in a fresh subprocess (CPU peak-RSS memory figures).
        seed: seed of the random inputs.
        progress: show a tqdm progress bar on stderr (the CLI turns it on).
        on_result: called with each :class:`Result` as soon as it exists (streaming CSV rows).
        extra_fields: columns added to every CSV row (e.g. ``{"note": "laptop on battery"}``).
        cases: only the cases with these names (each must name a case of one of ``ops``).
        params: op parameters, e.g. ``{"k": 100}`` (each must be declared by one of ``ops``).
        launches: also count each case's kernel launches per step (one extra profiled step).
        kernel_times: also profile a few steps of each case and keep its kernels' times per step in
            ``Result.kernel_times`` (:func:`torchfg.bench.profile.kernel_times`; not with ``isolate``).
        case_timeout: seconds one isolated measurement may take (needs ``isolate``).
        memory_limit_bytes: memory one isolated measurement may allocate (needs ``isolate``).

    Returns:
        One :class:`Result` per (op, size, case), in that order; an op whose API is not importable
        gives one ``"skipped: not available"`` result. A case that fails (out of memory, over the
        time limit, an unsupported dtype) gives a result whose status says why.

    Example:
        >>> results = run_benchmarks(["pairwise"], sizes=[16], dim=8, device="cpu", repeat=2, progress=False)
        >>> {"torchfg[torch]", "torch.cdist"} <= {r.case for r in results if r.status == "ok"}
        True
    """
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if sizes is not None and any((not isinstance(s, int)) or s < 2 for s in sizes):
        raise ValueError(f"sizes must be integers >= 2, got {list(sizes)}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        # torch.Generator.manual_seed's range: past it every case would fail with the same error row.
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    if warmup is None:
        warmup = 2 if device.type == "cuda" else 1
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if max_seconds is not None and not 0 < max_seconds < math.inf:
        raise ValueError(f"max_seconds must be finite and > 0 or None, got {max_seconds}")
    if (case_timeout is not None or memory_limit_bytes is not None) and not isolate:
        raise ValueError("case_timeout and memory_limit_bytes need isolate=True (one process per measurement)")
    if case_timeout is not None and not 0 < case_timeout < math.inf:
        raise ValueError(f"case_timeout must be finite and > 0 or None, got {case_timeout}")
    if memory_limit_bytes is not None and memory_limit_bytes <= 0:
        raise ValueError(f"memory_limit_bytes must be > 0 or None, got {memory_limit_bytes}")
    unknown = [name for name in ops if name not in OP_NAMES]
    if unknown:
        raise ValueError(f"ops must be among {OP_NAMES}, got {unknown}")
    benches = [load_op(name) for name in ops]
    params = dict(params or {})
    declared = {key for op in benches for key in op.params}
    if set(params) - declared:
        raise ValueError(
            f"params {sorted(set(params) - declared)} are not parameters of {list(ops)}; "
            f"they take {sorted(declared) or 'none'}"
        )
    if cases is not None:
        known = {case.name for op in benches for case in op.cases()}
        if not cases or set(cases) - known:
            raise ValueError(f"cases must name cases of {list(ops)} ({sorted(known)}), got {list(cases)}")
    env = {**environment_fields(device), **(extra_fields or {})}

    plan: list[tuple[OpBench, Problem | None, Case | None, str]] = []
    results: list[Result] = []
    for op in benches:
        ok, why = op.requires()
        if not ok:
            plan.append((op, None, None, f"skipped: not available ({why})"))
            continue
        d = dim or op.default_dim[device.type]
        selected = [case for case in op.cases() if cases is None or case.name in cases]
        if not selected:
            continue
        op_params = _op_params(op, params)
        for n in sizes or op.default_sizes[device.type]:
            problem = dataclasses.replace(op.make_problem(n, d, dtype, device, seed, **op_params), size=n)
            for case in selected:
                plan.append((op, problem, case, ""))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc="torchfg bench", unit="case", file=sys.stderr, leave=False)
    try:
        with on_device(device):
            for op, planned_problem, planned_case, skip in plan:
                if planned_problem is None or planned_case is None:
                    result = Result(op.name, "-", "-", 0, 0, 0, dtype_name(dtype), "", skip, env=env)
                else:
                    if bar is not None:
                        bar.set_postfix_str(f"{op.name} N={planned_problem.n} {planned_case.name}")
                    result = _run_one(
                        op, planned_problem, planned_case, env, repeat, warmup, max_seconds, isolate,
                        launches=launches, kernel_times=kernel_times, case_timeout=case_timeout,
                        memory_limit_bytes=memory_limit_bytes,
                    )
                results.append(result)
                if on_result is not None:
                    on_result(result)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _run_one(
    op: OpBench,
    problem: Problem,
    case: Case,
    env: dict[str, str],
    repeat: int,
    warmup: int,
    max_seconds: float | None,
    isolate: bool,
    *,
    launches: bool = False,
    kernel_times: bool = False,
    case_timeout: float | None = None,
    memory_limit_bytes: int | None = None,
) -> Result:
    isolate = isolate or (case.own_thread_pool and problem.device.type == "cpu")
    result = Result(
        op=op.name,
        case=case.name,
        kind=case.kind,
        n=problem.n,
        m=problem.m,
        d=problem.d,
        dtype=dtype_name(problem.dtype),
        shape=op.shape(problem),
        status="ok",
        flop_model=op.flop_model,
        isolated=isolate,
        gpu_kernel=case.gpu_kernel,
        env=env,
        params=problem.params_text(),
        size=problem.requested_size,
    )
    skip = _gpu_or_unavailable_skip(case, problem.device, problem.dtype)
    ok, why = case.supports(problem)
    if skip is None and not ok:
        skip = f"skipped: {why}"
    if skip is not None:
        result.status = skip
        return result
    kwargs: dict[str, Any] = {"warmup": warmup, "repeat": repeat, "max_seconds": max_seconds, "launches": launches}
    if isolate:
        kwargs.update(timeout=case_timeout, memory_limit_bytes=memory_limit_bytes)
    else:  # the kernel breakdown is an in-process profile (GPU runs are not isolated)
        kwargs.update(kernel_times=kernel_times)
    run = _measure_isolated if isolate else measure_case_and_floor
    try:
        outcome = run(op, case, problem, **kwargs)
    except Exception as exc:
        # One failing case must not end the run: out of memory, over time, an unsupported dtype in a
        # baseline, Triton's OutOfResources or CompilationError, a baseline whose own dependencies
        # do not import (ImportError). KeyboardInterrupt and SystemExit are not Exceptions: they stop it.
        result.status = _short_error(exc)
        if problem.device.type == "cuda":
            torch.cuda.empty_cache()
        return result
    result.measurement, result.floor_ms = outcome.measurement, outcome.floor_ms
    result.launches, result.tensor_peak_bytes = outcome.launches, outcome.tensor_peak_bytes
    result.kernel_times = outcome.kernel_times
    result.flops = op.flops(problem)
    result.floor = op.floor_label(problem)
    return result


def kernel_time_rows(result: Result) -> list[dict[str, Any]]:
    """The ``--kernel-times`` CSV rows of one result: its environment and case, then one row per
    kernel with its calls and milliseconds per step and its share of the profiled kernels' time."""
    kernels = result.kernel_times or []
    total = sum(k.ms for k in kernels) or 1.0
    row = result.csv_row()  # the case's columns as the main CSV writes them
    case = {key: row[key] for key in (*result.env, "op", "case", "n", "m", "d", "dtype", "params")}
    case["step_ms"] = row["median_ms"]
    return [{**case, "kernel": k.name, "calls_per_step": f"{k.calls:g}", "ms_per_step": f"{k.ms:.5g}",
             "share": f"{k.ms / total:.3f}"} for k in kernels]


def measurement_to_json(m: Measurement) -> dict[str, Any]:
    return dataclasses.asdict(m)


def iter_ok(results: Iterable[Result]) -> Iterable[Result]:
    return (r for r in results if r.status == "ok")
