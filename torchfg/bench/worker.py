"""One measurement in a fresh process: ``python -m torchfg.bench.worker '<json request>'``.

Used by ``torchfg bench --isolate``: the peak resident set size of a CPU process only says
something about one measurement when nothing else ran in that process before it. Prints one JSON
line, ``{"measurement": {...}, "floor_ms": ..., "launches": ..., "tensor_peak_bytes": ...}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import sys

import torch

from torchfg.bench.core import _find_case, load_op, measure_case_and_floor, measurement_to_json, on_device, parse_dtype


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(json.dumps({"error": "usage: python -m torchfg.bench.worker '<json request>'"}))
        return 2
    request = json.loads(argv[0])
    try:
        op = load_op(request["op"])
        case = _find_case(op, request["case"])
        problem = op.make_problem(
            request["n"],
            request["d"],
            parse_dtype(request["dtype"]),
            torch.device(request["device"]),
            request["seed"],
            **request.get("params", {}),
        )
        with on_device(problem.device):
            run = measure_case_and_floor(
                op,
                case,
                problem,
                warmup=request["warmup"],
                repeat=request["repeat"],
                max_seconds=request["max_seconds"],
                launches=request.get("launches", False),
            )
    except Exception as exc:  # reported to the parent, which records the case as failed
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}))
        return 0
    print(json.dumps({"measurement": measurement_to_json(run.measurement), "floor_ms": run.floor_ms,
                      "launches": run.launches, "tensor_peak_bytes": run.tensor_peak_bytes,
                      "shape": [problem.n, problem.m, problem.d]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
