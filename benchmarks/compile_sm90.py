"""Compile every Triton kernel torchfg can launch for Hopper (sm_90a), with no GPU.

Two phases, so that the compile phase runs under a Triton that has no torch next to it (the GPU
machines' triton 3.6 is checked from a small venv that holds only triton and numpy):

1. **trace** (needs torch and torchfg): calls the real launchers (``pairwise_distance_triton``,
   ``knn_triton``, ``mine_hardest_triton_tiled``, ...) on small CPU tensors over the
   specialisation axes (dtype fp16/bf16/fp32 ieee/fp32 tf32/fp64, metric, text on/off and its
   dtype (fp32 or fp64 text next to other embeddings), flatten, even/uneven D, row/column-major
   inputs, row-major inputs that are not 16-byte aligned (a column slice of a wider matrix),
   splits, ...). Kernel launches are intercepted: every
   ``kernel[grid](...)`` is bound with Triton's own binder for an sm_90 target (so the signature,
   constexprs and 16-divisibility attributes are exactly those a launch on an H100 would compile),
   autotuned kernels expand to every config in their list, and the few helpers that size grids
   from the device see an H100 (132 SMs). Nothing runs; the result is a list of JSON specs. Tile
   sizes therefore come from the launchers themselves (``_block_sizes``, ``default_config``, the
   autotune lists, ``TileConfig``), never from a copy here.
2. **compile** (torch-free): loads the ``@triton.jit`` functions of each kernel file without
   importing torch (the file's triton imports, constants and jit functions are executed from the
   real file, so sources and line numbers are the real ones), compiles each spec with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, runs the ptxas that Triton
   uses for sm_90 with ``-v`` on the PTX, and writes one CSV row per kernel x specialisation:
   registers, spills, shared memory, CTAs per SM on an H100, wgmma / cp.async / TMA use, errors.

Usage::

    python benchmarks/compile_sm90.py                      # trace + compile with this triton
    python benchmarks/compile_sm90.py --python /work/venv36/bin/python   # ... and with that one too
    python benchmarks/compile_sm90.py --level smoke        # every axis value once (the CI test)
    python benchmarks/compile_sm90.py --specs specs.json --out x.csv     # compile only, no torch

The CSVs go to ``benchmarks/results/sm90_compile_triton<major.minor>.csv`` unless ``--out`` says
otherwise. The exit status is 1 when any spec failed to compile (the error is in its row).
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

# The kernels must be real JITFunctions, not the interpreter's stand-ins.
os.environ.pop("TRITON_INTERPRET", None)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# H100 SXM (compute capability 9.0) per-SM limits, for the CTAs-per-SM column.
H100 = SimpleNamespace(
    sms=132, regs_per_sm=65536, reg_alloc_unit=256, smem_per_sm=228 * 1024, smem_per_cta_max=227 * 1024,
    smem_reserved_per_cta=1024, smem_alloc_unit=128, threads_per_sm=2048, ctas_per_sm=32,
)

CSV_FIELDS = (
    "triton", "ptxas", "kernel", "config", "specialisation", "case", "num_warps", "num_stages", "maxnreg",
    "registers", "spill_stores", "spill_loads", "stack_frame", "smem_static", "smem_dynamic", "ctas_per_sm",
    "limited_by", "wgmma", "cp_async", "tma", "compile_s", "error",
)
# Constexprs that name the tiling (the "config" column); every other constexpr is specialisation.
_CONFIG_CONSTEXPR = re.compile(r"^(BLOCK(_[A-Z]+)?|FLATTEN|K_PAD)$")


# --------------------------------------------------------------------------------------------
# Specs: what one launch compiles, in a form any Triton version (and JSON) can carry.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """One kernel specialisation: enough to rebuild ``ASTSource`` and the compile options."""

    kernel: str  # "<repo-relative file>:<function>"
    signature: dict[str, str]  # parameter -> "*fp16", "i32", "constexpr", ...
    constexprs: dict[str, Any]  # parameter -> JSON-encoded value (see _encode)
    attrs: dict[str, str]  # parameter -> Triton's specialisation string ("D": divisible by 16)
    options: dict[str, Any]  # num_warps, num_stages, maxnreg, ...
    case: str  # the launcher call that produced it

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.attrs, self.options], sort_keys=True)

    def config_label(self) -> str:
        tiles = [f"{k}={v}" for k, v in self.constexprs.items() if _CONFIG_CONSTEXPR.match(k)]
        opts = [f"{k}={v}" for k, v in sorted(self.options.items())]
        return " ".join(tiles + opts)

    def specialisation_label(self) -> str:
        consts = [f"{k}={_show(v)}" for k, v in self.constexprs.items() if not _CONFIG_CONSTEXPR.match(k)]
        ptrs = [f"{k}:{t[1:]}" for k, t in self.signature.items() if t.startswith("*")]
        ints = [f"{k}%16" for k, a in self.attrs.items() if "D" in a and not self.signature[k].startswith("*")]
        return " ".join(consts + ptrs + ints)


def _show(v: Any) -> str:
    return v["dtype"] if isinstance(v, dict) and "dtype" in v else str(v)


def _encode(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    if isinstance(value, tl.constexpr):
        return _encode(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r} ({type(value).__name__})")


def _decode(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        return tl.dtype(value["dtype"])
    return value


# --------------------------------------------------------------------------------------------
# Phase 1: trace the launchers (torch + torchfg).
# --------------------------------------------------------------------------------------------


class _Recorder:
    """Intercepts kernel launches and turns each into a :class:`Spec` with Triton's own binder."""

    def __init__(self) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.specs: list[Spec] = []
        self.case = ""
        # Which surviving config an autotuned launch reports as the winner (modulo their count), and
        # the most configs any autotuned launch of the current case had: a launcher that reads the
        # winner (e.g. the mining kernel's BLOCK_M for its second pass) is rerun once per winner.
        self.winner = 0
        self.most_configs = 1

    def record(self, fn: Any, args: tuple, kwargs: dict) -> None:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, opts = binder(*args, **kwargs)
        options, signature, constexprs, _attrs = fn._pack_args(self.backend, kwargs, bound, specialization, opts)
        names = fn.arg_names
        raw_attrs = {
            names[i]: spec[1] for i, spec in enumerate(specialization)
            if spec[0] != "constexpr" and isinstance(spec[1], str)
        }
        explicit = {k: v for k, v in kwargs.items() if k not in names and k in options.__dict__}
        launch = {"num_warps": options.num_warps, "num_stages": options.num_stages, **explicit}
        source = Path(fn.fn.__code__.co_filename).resolve()
        self.specs.append(Spec(
            kernel=f"{source.relative_to(ROOT)}:{fn.fn.__name__}",
            signature=dict(signature),
            constexprs={names[path[0]]: _encode(v) for path, v in constexprs.items()},
            attrs=raw_attrs,
            options={k: v for k, v in launch.items() if v is not None},
            case=self.case,
        ))

    def __enter__(self) -> "_Recorder":
        from triton.runtime import autotuner, jit

        recorder = self
        self._saved = (jit.JITFunction.run, autotuner.Autotuner.run)

        def jit_run(fn, *args, grid, warmup, **kwargs):  # noqa: ARG001 - nothing is launched
            recorder.record(fn, args, kwargs)

        def autotune_run(tuner, *args, **kwargs):
            # Every config that survives the launcher's own pruning may win on some GPU and
            # shape: compile them all. The launcher may read the winner afterwards; it sees the
            # one `recorder.winner` names, and trace() reruns the case for each of them.
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if tuner.early_config_prune else tuner.configs
            for config in configs:
                tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})
            tuner.best_config = configs[recorder.winner % len(configs)]
            recorder.most_configs = max(recorder.most_configs, len(configs))

        jit.JITFunction.run = jit_run
        autotuner.Autotuner.run = autotune_run
        return self

    def __exit__(self, *exc: Any) -> None:
        from triton.runtime import autotuner, jit

        jit.JITFunction.run, autotuner.Autotuner.run = self._saved


class _EmulatedH100:
    """Makes the launchers' grid-sizing helpers see an H100, as on the GPU machines.

    They take a ``device`` and read ``device.type`` and the SM count; on the CPU they would pick
    one split, which hides the split/merge specialisations a GPU launch produces.
    """

    HELPERS = {
        "torchfg.ops.knn.triton": ("_num_splits",),
        "torchfg.ops.triplet.triton": ("_default_candidates_per_split", "_symmetric_splits"),
        "torchfg.ops.dino.triton": ("_num_splits",),
    }

    def __enter__(self) -> "_EmulatedH100":
        import importlib

        import torch

        device = SimpleNamespace(type="cuda", index=0)
        self._saved: list[tuple[Any, str, Any]] = [(torch.cuda, "get_device_properties", torch.cuda.get_device_properties)]
        torch.cuda.get_device_properties = lambda *_: SimpleNamespace(
            multi_processor_count=H100.sms, name="NVIDIA H100 (emulated)", major=9, minor=0,
        )
        for module_name, helpers in self.HELPERS.items():
            module = importlib.import_module(module_name)
            for name in helpers:
                original = getattr(module, name)  # AttributeError: the launcher changed, update HELPERS

                def on_h100(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                    args = tuple(device if hasattr(a, "type") and getattr(a, "type", None) in ("cpu", "meta") else a
                                 for a in args)
                    kwargs = {k: device if k == "device" else v for k, v in kwargs.items()}
                    return _original(*args, **kwargs)

                self._saved.append((module, name, original))
                setattr(module, name, on_h100)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)


DTYPES = ("fp16", "bf16", "fp32", "tf32", "fp64")


def _torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32,
            "fp64": torch.float64}[name]


class _Precision:
    """fp32 matmul precision for one launch: "tf32" is fp32 inputs with TF32 allowed."""

    def __init__(self, dtype_name: str) -> None:
        self.value = "tf32" if dtype_name == "tf32" else "ieee"

    def __enter__(self) -> None:
        import torch

        self._saved = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = self.value

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.backends.cuda.matmul.fp32_precision = self._saved


def _matrix(rows: int, cols: int, dtype_name: str, layout: str, seed: int = 0) -> Any:
    """A (rows, cols) input: row-major, column-major (a transposed view, any strides are allowed),
    or "slice": row-major with unit feature stride but not 16-byte aligned, the column slice
    ``big[:, 1:cols + 1]`` of a (rows, cols + 1) matrix (base pointer one element in, row stride
    cols + 1: Triton specialises neither as divisible by 16)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = _torch_dtype(dtype_name)
    if layout == "colmajor":
        return torch.randn(cols, rows, generator=g).to(dtype).t()
    if layout == "slice":
        return torch.randn(rows, cols + 1, generator=g).to(dtype)[:, 1:]
    return torch.randn(rows, cols, generator=g).to(dtype)


def all_pairs(axes: dict[str, tuple]) -> list[dict[str, Any]]:
    """A small set of combinations in which every pair of values of two axes appears (greedy)."""
    names = list(axes)
    product = [dict(zip(names, values)) for values in itertools.product(*axes.values())]

    def pairs(combo: dict[str, Any]) -> set:
        return {(a, combo[a], b, combo[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in product)) if product else set()
    chosen = []
    while uncovered:
        best = max(product, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def each_value(axes: dict[str, tuple]) -> list[dict[str, Any]]:
    """The fewest combinations in which every value of every axis appears at least once."""
    width = max(len(values) for values in axes.values())
    return [{name: values[i % len(values)] for name, values in axes.items()} for i in range(width)]


def _combos(axes: dict[str, tuple], primary: tuple[str, ...], level: str) -> list[dict[str, Any]]:
    """smoke: every axis value once (CI). quick: every pair of axis values. full: that, plus the
    full product of the primary axes (the ones that decide registers and shared memory) with the
    other axes at their first value."""
    if level == "smoke":
        return each_value(axes)
    chosen = all_pairs(axes)
    if level == "full":
        rest = {name: values[0] for name, values in axes.items() if name not in primary}
        for values in itertools.product(*(axes[name] for name in primary)):
            chosen.append({**rest, **dict(zip(primary, values))})
    return chosen


def _label(op: str, combo: dict[str, Any]) -> str:
    return op + " " + " ".join(f"{k}={v}" for k, v in combo.items())


def _trace_pairwise(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    from torchfg.ops.pairwise.triton import pairwise_distance_backward_triton, pairwise_distance_triton

    axes = {"dtype": DTYPES, "metric": ("euclidean", "sqeuclidean", "cosine", "dot"),
            "pass": ("forward", "backward"), "symmetric": (False, True), "layout": ("D512", "D100", "colmajor")}
    for c in _combos(axes, ("dtype", "pass"), level):
        def run(c: dict = c) -> None:
            d = 100 if c["layout"] == "D100" else 512
            layout = "colmajor" if c["layout"] == "colmajor" else "row"
            x = _matrix(300, d, c["dtype"], layout).unsqueeze(0)
            y = x if c["symmetric"] else _matrix(200, d, c["dtype"], layout, seed=1).unsqueeze(0)
            with _Precision(c["dtype"]):
                out = pairwise_distance_triton(x, y, c["metric"], c["symmetric"])
                if c["pass"] == "backward":
                    grad = out.clone().normal_()
                    pairwise_distance_backward_triton(grad, x, y, out, c["metric"])
                    if x.dtype in (torch.float16, torch.bfloat16):
                        # 16-bit takes the W + GEMM path, whose element-wise W map runs for
                        # euclidean only, whatever this combination's metric; deterministic mode
                        # keeps the fused kernel.
                        pairwise_distance_backward_triton(grad, x, y, out, "euclidean")
                        torch.use_deterministic_algorithms(True)
                        try:
                            pairwise_distance_backward_triton(grad, x, y, out, c["metric"])
                        finally:
                            torch.use_deterministic_algorithms(False)
        yield _label("pairwise", c), run


def _trace_knn(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    from torchfg.ops.knn.triton import MAX_K, knn_triton

    axes = {"dtype": ("fp16", "bf16", "fp32", "tf32"), "k": (1, 10, 32, 50, MAX_K),
            "metric": ("euclidean", "sqeuclidean", "cosine", "dot"), "mode": ("cross", "symmetric", "exclude_self"),
            "layout": ("D512", "D100", "colmajor")}
    for c in _combos(axes, ("dtype", "k"), level):
        def run(c: dict = c) -> None:
            with _Precision(c["dtype"]):
                knn_triton(*_knn_search_args(c))
        yield _label("knn", c), run


def _knn_search_args(c: dict[str, Any]) -> tuple[Any, ...]:
    """(query, gallery, k, metric, symmetric, self_offset) of a k-NN combo: a 4096-row gallery,
    searched by itself or by 300 other rows."""
    d = 100 if c["layout"] == "D100" else 512
    layout = "colmajor" if c["layout"] == "colmajor" else "row"
    gallery = _matrix(4096, d, c["dtype"], layout)
    query = gallery if c["mode"] != "cross" else _matrix(300, d, c["dtype"], layout, seed=1)
    return query, gallery, c["k"], c["metric"], c["mode"] != "cross", 0 if c["mode"] == "exclude_self" else -1



def _trace_knn_filter(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    from torchfg.ops.knn.triton import knn_filter_triton

    axes = {"dtype": ("fp16", "bf16", "fp32", "tf32"), "metric": ("euclidean", "sqeuclidean", "cosine", "dot"),
            "mode": ("cross", "symmetric", "exclude_self"), "layout": ("D512", "D100", "colmajor"), "k": (10, 100)}
    for c in _combos(axes, ("dtype",), level):
        def run(c: dict = c) -> None:
            with _Precision(c["dtype"]):
                knn_filter_triton(*_knn_search_args(c))
        yield _label("knn_filter", c), run

    def one_group() -> None:
        # A one-row sample (32 rows, every 32nd): the bound kernel's groups == 1, an integer
        # argument Triton compiles as the constant 1.
        from torchfg.ops.knn.triton import FilterConfig

        x = _matrix(32, 512, "bf16", "row")
        knn_filter_triton(x, x, 1, "euclidean", config=FilterConfig(sample_stride=32, groups_per_k=1, capacity=16))
    yield "knn_filter groups=1", one_group


def _trace_triplet(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    from torchfg.bench.triplet import symmetric_mining
    from torchfg.ops.triplet import triton as triplet

    # "auto": the public path (autotuned on a GPU; fp64 takes its fixed tiles). The others pass a
    # TileConfig as tests and benchmarks do: the default tiles, flattened loops, and a small
    # split so that the per-split workspace and the merge kernel are compiled.
    axes = {"dtype": DTYPES, "tiles": ("auto", "default", "flatten", "split", "symmetric"),
            "text": ("none", "margin", "threshold", "margin+threshold"), "text_dtype": ("same", "fp32", "fp64"),
            "metric": ("euclidean", "sqeuclidean", "cosine", "dot"), "anchors": ("self", "other"),
            "layout": ("D512", "D100", "colmajor", "slice"), "T": (384, 100), "labels": ("int64", "int32"),
            "text_layout": ("row", "colmajor", "slice")}
    for c in _combos(axes, ("dtype", "tiles", "text"), level):
        def run(c: dict = c) -> None:
            d = 100 if c["layout"] == "D100" else 512
            layout = c["layout"] if c["layout"] in ("colmajor", "slice") else "row"
            n = 700
            symmetric = c["tiles"] == "symmetric"
            # The symmetric kernel takes no fp64: its case compiles bf16 instead.
            dtype = "bf16" if symmetric and c["dtype"] == "fp64" else c["dtype"]
            x = _matrix(n, d, dtype, layout)
            label_dtype = getattr(torch, c["labels"])
            labels = (torch.arange(n) % 50).to(label_dtype)
            text_dtype = dtype if c["text_dtype"] == "same" or (symmetric and c["text_dtype"] == "fp64") else (
                c["text_dtype"])
            text = _matrix(n, c["T"], text_dtype, c["text_layout"], seed=2) if c["text"] != "none" else None
            # The symmetric kernel serves a batch mined against itself only.
            if c["anchors"] == "self" or c["tiles"] == "symmetric":
                anchors, anchor_labels, anchor_text, self_offset = x, labels, text, 0
            else:
                anchors, anchor_labels = _matrix(257, d, dtype, layout, seed=3), (torch.arange(257) % 50).to(label_dtype)
                anchor_text = _matrix(257, c["T"], text_dtype, c["text_layout"], seed=4) if text is not None else None
                self_offset = -1
            base = triplet._FP64_CONFIG if dtype == "fp64" else triplet.TileConfig()
            # "symmetric": the autotuned symmetric kernel (a batch against itself); explicit tiles
            # where the call has an IEEE fp32 dot, which the autotuned path keeps off it.
            fma = dtype == "fp32" or (c["text"] != "none" and text_dtype == "fp32")
            tiles = {"auto": None, "default": base, "flatten": dataclasses.replace(base, flatten=True),
                     "split": dataclasses.replace(base, candidates_per_split=256),
                     "symmetric": dataclasses.replace(base, symmetric=True) if fma else None}[c["tiles"]]
            with _Precision(dtype), symmetric_mining(symmetric):
                triplet.mine_hardest_triton_tiled(
                    anchors, x, anchor_labels, labels, anchor_text, text if anchor_text is not None else None,
                    metric=c["metric"], base_margin=0.2, margin_scale=0.5 if "margin" in c["text"] else 0.0,
                    text_positive_threshold=0.9 if "threshold" in c["text"] else None,
                    self_offset=self_offset, tiles=tiles,
                )
        yield _label("triplet", c), run

    def one_anchor() -> None:
        # One anchor against 700 candidates in 3 splits: the merge gets N == 1, an integer
        # argument Triton compiles as the constant 1.
        x = _matrix(700, 512, "bf16", "row")
        labels = torch.arange(700) % 50
        with _Precision("bf16"):
            triplet.mine_hardest_triton_tiled(
                x[:1].clone(), x, labels[:1].clone(), labels, None, None, metric="euclidean", base_margin=0.2,
                margin_scale=0.0, text_positive_threshold=None, self_offset=-1,
                tiles=dataclasses.replace(triplet.TileConfig(), candidates_per_split=256),
            )
    yield "triplet anchors=1", one_anchor


def _trace_pair_distances(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    from torchfg.ops.pair_distances.triton import anchor_pair_distances_backward_triton, anchor_pair_distances_triton

    axes = {"dtype": ("fp16", "bf16", "fp32", "fp64"), "metric": ("euclidean", "sqeuclidean", "cosine", "dot"),
            "pass": ("forward", "backward_y_is_x", "backward_y", "backward_y_detached"),
            "D": (64, 100, 512, 4096), "layout": ("row", "colmajor")}
    for c in _combos(axes, ("dtype", "D", "pass"), level):
        def run(c: dict = c) -> None:
            x = _matrix(300, c["D"], c["dtype"], c["layout"])
            y_is_x = c["pass"] in ("forward", "backward_y_is_x")
            y = x if y_is_x else _matrix(200, c["D"], c["dtype"], c["layout"], seed=1)
            idx = torch.randint(0, y.shape[0], (300, 3))
            out = anchor_pair_distances_triton(x, y, idx, c["metric"])
            if c["pass"] != "forward":
                anchor_pair_distances_backward_triton(
                    out.clone().normal_(), x, y, idx, out, c["metric"], y_is_x,
                    needs_grad_y=c["pass"] != "backward_y_detached",
                )
        yield _label("pair_distances", c), run


def _trace_hardest_loss(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    from torchfg.bench.triplet import symmetric_mining
    from torchfg.ops.hardest_triplet_loss.triton import (
        hardest_triplet_loss_backward_triton,
        hardest_triplet_loss_triton,
    )

    # The fused loss's forward and backward (and the mining launches they make). 700 candidates
    # on an emulated H100 are two mining splits (the forward merges them), 300 are one.
    axes = {"dtype": DTYPES, "metric": ("euclidean", "sqeuclidean", "cosine", "dot"),
            "text": ("none", "margin"), "reduction": ("mean", "none", "sum", "mean_nonzero"),
            "smooth": (False, True), "N": (700, 300), "candidates": ("self", "other_grad", "other_detached"),
            "layout": ("D512", "D100", "colmajor", "slice"), "text_dtype": ("same", "fp32", "fp64"),
            "mining": ("default", "symmetric")}
    for c in _combos(axes, ("dtype", "candidates", "text"), level):
        def run(c: dict = c) -> None:
            d = 100 if c["layout"] == "D100" else 512
            layout = c["layout"] if c["layout"] in ("colmajor", "slice") else "row"
            n = c["N"]
            x = _matrix(n, d, c["dtype"], layout)
            labels = torch.arange(n) % 50
            # The text follows the embeddings' layout when it is a row slice (else row-major).
            text_dtype = c["dtype"] if c["text_dtype"] == "same" else c["text_dtype"]
            text_layout = "slice" if layout == "slice" else "row"
            text = _matrix(n, 384, text_dtype, text_layout, seed=2) if c["text"] != "none" else None
            self_mode = c["candidates"] == "self"
            y = x if self_mode else _matrix(n + 64, d, c["dtype"], layout, seed=3)
            y_labels = labels if self_mode else torch.arange(n + 64) % 50
            y_text = text if self_mode or text is None else _matrix(n + 64, 384, text_dtype, text_layout, seed=4)
            with _Precision(c["dtype"]), symmetric_mining(c["mining"] == "symmetric"):
                loss, pairs, terms, count, links, y_inv, x_inv = hardest_triplet_loss_triton(
                    x, y, labels, y_labels, text, y_text, metric=c["metric"], base_margin=0.2,
                    margin_scale=0.5 if text is not None else 0.0, text_positive_threshold=None,
                    self_offset=0 if self_mode else -1, smooth=c["smooth"], reduction=c["reduction"],
                    link=c["candidates"] != "other_detached",
                )
                hardest_triplet_loss_backward_triton(
                    torch.ones_like(loss), x, y, pairs, terms, count, links, y_inv, x_inv, metric=c["metric"],
                    reduction=c["reduction"], candidates_are_anchors=self_mode,
                    needs_candidate_grad=c["candidates"] == "other_grad",
                )
        yield _label("hardest_loss", c), run


def _trace_dino(level: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    from torchfg.ops.dino.triton import dino_loss_backward_triton, dino_loss_triton

    axes = {"dtype": ("fp16", "bf16", "fp32", "fp64"), "teacher": ("same", "fp32"),
            "crops": ("2+0", "2+6", "2+10"), "K": (65536, 1000), "pass": ("forward", "backward")}
    for c in _combos(axes, ("dtype", "crops"), level):
        def run(c: dict = c) -> None:
            n_global, n_local = (int(v) for v in c["crops"].split("+"))
            n_crops, batch = n_global + n_local, 8
            student = _matrix(n_crops * batch, c["K"], c["dtype"], "row")
            teacher = _matrix(n_global * batch, c["K"], c["dtype"] if c["teacher"] == "same" else "fp32", "row", 1)
            center = torch.zeros(c["K"], dtype=teacher.dtype)
            loss, s_lse, t_lse = dino_loss_triton(student, teacher, center, n_crops, n_global, 0.1, 0.04)
            if c["pass"] == "backward":
                dino_loss_backward_triton(torch.ones((), dtype=loss.dtype), student, teacher, center, s_lse, t_lse,
                                          n_crops, n_global, 0.1, 0.04)
        yield _label("dino", c), run


TRACERS = {
    "pairwise": _trace_pairwise,
    "knn": _trace_knn,
    "knn_filter": _trace_knn_filter,
    "triplet": _trace_triplet,
    "pair_distances": _trace_pair_distances,
    "hardest_loss": _trace_hardest_loss,
    "dino": _trace_dino,
}


def trace(level: str, ops: Iterable[str] = tuple(TRACERS)) -> list[Spec]:
    """Run the launchers over the specialisation axes; return the distinct specs they launch."""
    sys.path.insert(0, str(ROOT))
    unique: dict[str, Spec] = {}
    with _Recorder() as recorder, _EmulatedH100():
        for op in ops:
            for label, run in TRACERS[op](level):
                recorder.case = label
                before = len(recorder.specs)
                recorder.winner, recorder.most_configs = 0, 1
                run()
                if len(recorder.specs) == before:
                    raise RuntimeError(f"{label}: the launcher launched no kernel")
                # Every autotune winner once (duplicate specs are dropped below).
                for winner in range(1, recorder.most_configs):
                    recorder.winner = winner
                    run()
        for spec in recorder.specs:
            unique.setdefault(spec.key(), spec)
    return list(unique.values())


# --------------------------------------------------------------------------------------------
# Phase 2: compile (no torch).
# --------------------------------------------------------------------------------------------


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("triton.jit", "jit")


def load_kernels(relative_path: str) -> dict[str, Any]:
    """The module's namespace with its triton imports, constants and ``@triton.jit`` functions only.

    Executed from the real file (line numbers kept), so Triton sees the true sources; statements
    that need torch or the rest of torchfg (launchers, autotune wrappers) are left out. A jit
    function that depends on something left out fails to compile, naming it.
    """
    path = ROOT / relative_path
    tree = ast.parse(path.read_text(), str(path))
    namespace: dict[str, Any] = {"__name__": relative_path[:-3].replace("/", "."), "__file__": str(path)}

    def run(node: ast.stmt) -> None:
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)

    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchfg.") and node.module.endswith(".triton"):
            # Another kernel file's jit helpers (e.g. a shared merge or distance epilogue): loaded
            # the same way, without torch.
            helpers = load_kernels(node.module.replace(".", "/") + ".py")
            namespace.update({a.asname or a.name: helpers[a.name] for a in node.names if a.name in helpers})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(m == "__future__" or m.split(".")[0] in ("triton", "math", "dataclasses") for m in modules):
                run(node)
        elif isinstance(node, ast.FunctionDef) and any(_is_triton_jit(d) for d in node.decorator_list):
            run(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            try:  # constants the kernels read (e.g. tl.constexpr sentinels); the rest needs torch
                run(node)
            except Exception:  # noqa: BLE001 - left out, as documented
                pass
    return namespace


def _ptxas_path() -> str:
    """The ptxas Triton itself runs for sm_90 (3.9: the 13.x "blackwell" one; 3.6: bin/ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older layouts
        import triton

        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas_flags() -> list[str]:
    """The flags Triton's make_cubin passes that change register allocation."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    source = inspect.getsource(CUDABackend.make_cubin)
    return ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in source else []


def ptxas_report(ptx: str, ptxas: str, flags: list[str]) -> dict[str, int]:
    """Registers, spills, stack and static shared memory from ``ptxas -v`` on sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", *flags, "--gpu-name=sm_90a", str(src), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {log.strip()[-2000:]}")

    def grab(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "smem_static": grab(r"(\d+) bytes smem"),
    }


def ctas_per_sm(registers: int, smem: int, num_warps: int) -> tuple[int, str]:
    """Resident CTAs per H100 SM and the resource that limits them."""
    per_warp = math.ceil(registers * 32 / H100.reg_alloc_unit) * H100.reg_alloc_unit
    by_regs = (H100.regs_per_sm // per_warp) // num_warps if per_warp else H100.ctas_per_sm
    cta_smem = math.ceil((smem + H100.smem_reserved_per_cta) / H100.smem_alloc_unit) * H100.smem_alloc_unit
    by_smem = 0 if smem > H100.smem_per_cta_max else H100.smem_per_sm // cta_smem
    by_threads = H100.threads_per_sm // (32 * num_warps)
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": by_threads, "CTA slots": H100.ctas_per_sm}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def compile_specs(specs: list[Spec], ir_dir: Path | None = None) -> list[dict[str, Any]]:
    """Compile every spec for sm_90a with the installed Triton; one CSV row each. With ``ir_dir``,
    each spec's TTIR is written there as ``<index>.ttir`` next to ``<index>.json`` (the spec)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    ptxas = _ptxas_path()
    flags = _ptxas_flags()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    ptxas_version = (re.findall(r"release ([\d.]+)", version) or ["?"])[0]
    modules: dict[str, dict[str, Any]] = {}
    rows = []
    for index, spec in enumerate(specs):
        path, name = spec.kernel.split(":")
        row: dict[str, Any] = {
            "triton": triton.__version__, "ptxas": ptxas_version, "kernel": spec.kernel,
            "config": spec.config_label(), "specialisation": spec.specialisation_label(), "case": spec.case,
            "num_warps": spec.options.get("num_warps"), "num_stages": spec.options.get("num_stages"),
            "maxnreg": spec.options.get("maxnreg", ""), "error": "",
        }
        start = time.perf_counter()
        try:
            if path not in modules:
                modules[path] = load_kernels(path)
            fn = modules[path][name]
            constexprs = {k: _decode(v) for k, v in spec.constexprs.items()}
            attrs = {(fn.arg_names.index(k),): backend.parse_attr(v) for k, v in spec.attrs.items()}
            kernel = triton.compile(ASTSource(fn, dict(spec.signature), constexprs, attrs), target=target,
                                    options=dict(spec.options))
            ptx = kernel.asm["ptx"]
            if ir_dir is not None:
                ir_dir.mkdir(parents=True, exist_ok=True)
                (ir_dir / f"{index}.ttir").write_text(kernel.asm["ttir"])
                (ir_dir / f"{index}.ptx").write_text(ptx)
                (ir_dir / f"{index}.json").write_text(json.dumps(dataclasses.asdict(spec)))
            report = ptxas_report(ptx, ptxas, flags)
            smem_dynamic = int(kernel.metadata.shared)
            ctas, limiter = ctas_per_sm(report["registers"], report["smem_static"] + smem_dynamic,
                                        int(kernel.metadata.num_warps))
            row.update(report, smem_dynamic=smem_dynamic, ctas_per_sm=ctas, limited_by=limiter,
                       wgmma="yes" if "wgmma.mma_async" in ptx else "no",
                       cp_async="yes" if re.search(r"cp\.async(?!\.bulk)", ptx) else "no",
                       tma="yes" if "cp.async.bulk" in ptx else "no")
        except Exception as exc:  # noqa: BLE001 - recorded in the row; the exit status reports it
            row["error"] = f"{type(exc).__name__}: {str(exc).strip()}"[-1500:].replace("\n", " | ")
        row["compile_s"] = f"{time.perf_counter() - start:.2f}"
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["kernel"], r["config"], r["specialisation"]))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})


def default_csv(version: str) -> Path:
    major_minor = ".".join(version.split(".")[:2])
    return RESULTS / f"sm90_compile_triton{major_minor}.csv"


def _compile_in_chunks(specs: list[Spec], jobs: int, ir_dir: Path | None) -> list[dict[str, Any]]:
    if jobs <= 1 or len(specs) < 2 or ir_dir is not None:
        return compile_specs(specs, ir_dir)
    import multiprocessing

    chunks = [specs[i::jobs] for i in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return [row for part in pool.map(compile_specs, chunks) for row in part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=("smoke", "quick", "full"), default="full",
                        help="smoke: every axis value once (CI); quick: every pair of values; full: + products")
    parser.add_argument("--ops", default=",".join(TRACERS), help="ops to trace (comma-separated)")
    parser.add_argument("--specs", type=Path, help="compile these specs (JSON) instead of tracing: no torch needed")
    parser.add_argument("--specs-out", type=Path, help="also write the traced specs here")
    parser.add_argument("--trace-only", action="store_true", help="stop after writing --specs-out")
    parser.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/sm90_compile_triton<v>.csv)")
    parser.add_argument("--python", action="append", default=[],
                        help="another interpreter (e.g. a triton 3.6 venv) that compiles the same specs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="directory of the --python CSVs")
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--ir-dir", type=Path, help="write each spec's TTIR and PTX here (<index>.ttir, <index>.ptx, <index>.json)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.specs:
        specs = [Spec(**s) for s in json.loads(args.specs.read_text())]
    else:
        specs = trace(args.level, [op for op in args.ops.split(",") if op])
        print(f"traced {len(specs)} distinct kernel specialisations in {time.perf_counter() - start:.1f}s", flush=True)
    if args.specs_out:
        args.specs_out.parent.mkdir(parents=True, exist_ok=True)
        args.specs_out.write_text(json.dumps([dataclasses.asdict(s) for s in specs], indent=1))
    if args.trace_only:
        return 0

    import triton

    status = 0
    rows = _compile_in_chunks(specs, args.jobs, args.ir_dir)
    out = args.out or default_csv(triton.__version__)
    write_csv(rows, out)
    errors = [r for r in rows if r["error"]]
    print(f"triton {triton.__version__}: {len(rows)} compiled, {len(errors)} errors -> {out} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)
    for r in errors:
        print(f"  ERROR {r['kernel']} [{r['config']}] {r['case']}: {r['error'][:400]}", flush=True)
    status |= bool(errors)

    for python in args.python:
        with tempfile.TemporaryDirectory() as tmp:
            spec_file = Path(tmp) / "specs.json"
            spec_file.write_text(json.dumps([dataclasses.asdict(s) for s in specs]))
            version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            other_out = args.out_dir / default_csv(version).name
            done = subprocess.run([python, __file__, "--specs", str(spec_file), "--out", str(other_out),
                                   "--jobs", str(args.jobs)])
            status |= done.returncode != 0
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
