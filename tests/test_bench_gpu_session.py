"""benchmarks/gpu_session.sh's bookkeeping on a CPU: a benchmark that misses a requested case is a
failed step (and does not stop the steps after it), and the cleanup after the test step stops what
that step left running and nothing else."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                                reason="needs bash and timeout")


def _python3_wrapper(bin_dir: Path, body: str) -> dict[str, str]:
    """An environment whose `python3` is this interpreter, after the shell lines ``body``."""
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/bash\n{body}\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_a_benchmark_missing_a_requested_case_is_a_failed_step(tmp_path: Path) -> None:
    # The k = 10 run also asks for the Triton kernel, which a CPU skips: torchfg bench exits 1, the
    # step is listed as failed, and the k = 100 run of the same step still runs.
    env = _python3_wrapper(tmp_path / "bin", 'if [[ " $* " == *" k=10 "* ]]; then '
                                             'set -- "$@" --cases "torchfg[torch],torchfg[triton]"; fi')
    env.update(OUT=str(tmp_path / "out"), ONLY="bench_knn")
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    session = (tmp_path / "out" / "session.txt").read_text()
    assert done.returncode != 0, session
    assert re.search(r"^bench_knn: exit 1 in \d+s$", session, re.M), session
    assert "failed steps: bench_knn" in session, session
    assert "--cases torchfg[triton] (knn N=128, bfloat16): skipped" in done.stdout + done.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "bench.csv").open()))
    assert {r["params"] for r in rows} == {"k=10;metric=euclidean", "k=100;metric=euclidean"}, rows


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_what_the_test_step_leaves_running_is_stopped_and_nothing_else(tmp_path: Path) -> None:
    script = SCRIPT.read_text()
    functions = [re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", script, re.S | re.M) for name in ("step", "stop_step_leftovers")]
    assert all(functions), "gpu_session.sh defines step and stop_step_leftovers"
    # Another process whose command line says pytest (a test run of someone else's on the same box).
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "pytest"])
    try:
        left = tmp_path / "left.pid"
        driver = "\n".join([
            f'OUT={str(tmp_path)!r}; TOTAL=60; START=$SECONDS; GRACE=1; ONLY=""; FAILED=""; STEP_GROUP=""',
            ': > "$OUT/session.txt"',
            *(f.group(0) for f in functions),
            # A step whose command exits and leaves a child behind, as a killed pytest leaves its workers.
            f'step tests 30 "$OUT/tests.txt" bash -c \'sleep 120 & echo $! > "$0"\' {str(left)!r}',
            "stop_step_leftovers",
        ])
        subprocess.run(["bash", "-c", driver], check=True, timeout=60)
        child = int(left.read_text())
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the step's leftover process still runs"
        assert decoy.poll() is None, "a process the step did not start was killed"
    finally:
        decoy.kill()
        decoy.wait()
