"""What a user's type checker sees of torchfg (PEP 561: the package ships ``torchfg/py.typed``).

mypy checks tests/typecheck/user_code.py, a user's code over the public API with ``assert_type``
on the return types that matter, and must report no error. torchfg is found the way a user's mypy
finds an installed package: on the interpreter's path (here the checkout, put first on
PYTHONPATH), so its ``py.typed`` marker is required (without it every torchfg name is Any and mypy
reports the imports) and errors inside torchfg itself are not reported; torch is analysed as the
typed package it is. ``--strict`` as many projects run it, less the untyped-call check for torch's
own untyped functions (``Tensor.backward``). A cold run (no cache) takes about 15 CPU-seconds,
nearly all of it reading torch's annotations.

torchfg's own code is checked too, with the ``[tool.mypy]`` configuration of pyproject.toml (the
one a contributor's ``mypy`` picks up in the checkout), and must report no error either.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_CODE = ROOT / "tests" / "typecheck" / "user_code.py"


def test_user_code_type_checks_against_the_shipped_annotations(tmp_path):
    pytest.importorskip("mypy")
    assert (ROOT / "torchfg" / "py.typed").is_file()
    env = {key: value for key, value in os.environ.items() if key != "MYPYPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [
        sys.executable, "-m", "mypy",
        "--config-file=",  # no mypy.ini / pyproject.toml / user configuration: these options only
        "--cache-dir", str(tmp_path / "mypy_cache"),
        "--strict", "--untyped-calls-exclude=torch", "--warn-unreachable",
        "--show-error-codes", "--no-pretty", "--no-color-output",
        str(USER_CODE),
    ]
    # Run outside the checkout: mypy puts its working directory first on its search path, as the
    # user's own code, which would check torchfg's internals instead of reading it as installed.
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Success: no issues found in 1 source file" in output, output


def test_user_code_runs():
    """The same code runs (CPU, small sizes): every type it pins is the one torchfg returns."""
    runpy.run_path(str(USER_CODE), run_name="__user_code__")


def test_torchfg_type_checks_clean(tmp_path):
    """mypy over torchfg's own code, as pyproject.toml's ``[tool.mypy]`` configures it: no error.

    Keeps the internals checked, which the test above cannot see (errors inside an installed
    package are not reported to its user). A cold run takes about 20 CPU-seconds, most of it
    reading torch's annotations.
    """
    pytest.importorskip("mypy")
    env = {key: value for key, value in os.environ.items() if key != "MYPYPATH"}
    command = [
        sys.executable, "-m", "mypy",
        "--config-file", str(ROOT / "pyproject.toml"),  # also keeps a user's own configuration out
        "--cache-dir", str(tmp_path / "mypy_cache"),
        "--no-pretty", "--no-color-output",
    ]
    # From the checkout: the configuration's files = ["torchfg"] is relative to it.
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Success: no issues found" in output, output
