"""torchfg.backends: reading TRITON_INTERPRET as Triton does, no triton import for CPU tensors,
and a fork while another thread imports triton."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from torchfg import backends
from torchfg.errors import BackendUnavailableError


@pytest.mark.parametrize("value", ["1", "true", "True", "ON", "yes", "y", "0", "false", "off", "no", "2", "", " 1"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET=false (or off, no, 2) was read as "on": torchfg launched compiled kernels
    into an interpreter that Triton had not switched on ("0 active drivers")."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    expected = value.lower() in ("1", "true", "on", "yes", "y")
    assert backends.triton_interpreter_enabled() is expected
    libtriton = pytest.importorskip("triton._C.libtriton")
    assert libtriton.getenv_bool("TRITON_INTERPRET", False) is expected


def test_cpu_tensors_do_not_import_triton():
    """Deciding that Triton cannot run on a CPU tensor needs no import of triton (seconds on the
    first call of a process, and a window in which a fork deadlocks the child)."""
    code = (
        "import sys, torch, torchfg\n"
        "torchfg.knn(torch.randn(30, 4), k=2)\n"
        "torchfg.functional.triplet_margin_loss(torch.randn(8, 3), torch.arange(8) // 2)\n"
        "print('triton' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_waits_for_an_import_of_triton_in_another_thread():
    """A DataLoader forking its workers while an evaluation thread imported triton copied Python's
    lock of the half-imported module into the children, whose first import of triton then waited
    forever. The fork waits until the import is done, and the child gets a free lock."""
    importing, release = threading.Event(), threading.Event()

    def import_in_another_thread():
        with backends._import_lock:  # what _probe_triton_import holds while importing
            importing.set()
            release.wait(10)

    importer = threading.Thread(target=import_in_another_thread)
    importer.start()
    importing.wait(10)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if backends._import_lock.acquire(timeout=5) else 1)
        forked_after_release = release.is_set()
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        timer.cancel()
        importer.join()
    assert forked_after_release  # the fork waited for the import
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("name", ["TORCHFG_CPU_KERNELS", "TORCHFG_CUDA_JIT", "TORCHFG_KNN_FILTER", "TORCHFG_SYMMETRIC_MINING"])
def test_on_off_variables_are_read_one_way_and_refuse_other_values(monkeypatch, name):
    """TORCHFG_CPU_KERNELS=disable kept the kernels on, TORCHFG_CUDA_JIT=off allowed the JIT build,
    TORCHFG_KNN_FILTER=true was off: every on/off variable takes the same words, and anything
    else is an error that names it."""
    from torchfg._validation import env_flag

    for value, expected in [("1", True), (" TRUE ", True), ("on", True), ("yes", True),
                            ("0", False), ("False", False), ("OFF", False), ("no", False)]:
        monkeypatch.setenv(name, value)
        assert env_flag(name, not expected) is expected
    monkeypatch.setenv(name, "")
    assert env_flag(name, True) is True and env_flag(name, False) is False
    monkeypatch.setenv(name, "disable")
    with pytest.raises(ValueError, match=name):
        env_flag(name, True)


def test_the_switches_use_it(monkeypatch):
    from torchfg.ops.knn import cpu

    monkeypatch.setenv("TORCHFG_CPU_KERNELS", "off")
    assert cpu.status() == (False, "disabled by TORCHFG_CPU_KERNELS=off")
    monkeypatch.setenv("TORCHFG_CPU_KERNELS", "disabled")
    with pytest.raises(ValueError, match="TORCHFG_CPU_KERNELS"):
        cpu.status()
    pytest.importorskip("triton")
    from torchfg.ops.knn.triton import wants_filter

    monkeypatch.setenv("TORCHFG_KNN_FILTER", "true")
    assert wants_filter()


def test_the_installed_check_of_cpu_calls_is_cached(monkeypatch):
    """Every CPU op call with backend="auto" asks whether triton is installed: find_spec (~40 us,
    and untraceable by torch 2.11's dynamo) runs once per process."""
    import importlib.util

    calls = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: calls.append(name) or real(name, *a))
    backends._probe_triton_installed.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for _ in range(3):
        backends.triton_status(torch.device("cpu"))
    assert calls.count("triton") == 1
    assert backends._triton_installed._dynamo_marked_constant


@pytest.fixture
def triton_version(monkeypatch):
    """Set the installed triton's reported version for one test (the probe's cache is cleared
    before and after)."""
    triton = pytest.importorskip("triton")
    backends._probe_triton_import.cache_clear()

    def set_version(version: str) -> None:
        monkeypatch.setattr(triton, "__version__", version)
        backends._probe_triton_import.cache_clear()

    yield set_version
    monkeypatch.undo()
    backends._probe_triton_import.cache_clear()


def test_a_triton_older_than_the_kernels_need_is_unavailable(triton_version, monkeypatch):
    """triton 3.4 (what torch 2.8's CUDA wheels pin) cannot compile the fp64 kernels: it is
    reported unavailable, naming both versions, and "auto" takes the torch backend, instead of a
    compile error inside a training step."""
    import torchfg

    # Under the interpreter a CUDA device counts as available: "auto" there is the GPU's choice.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda = torch.device("cuda")
    triton_version("3.6.0")
    assert backends.resolve_backend("pairwise_distance", cuda, torch.float64, "auto") == "triton"
    triton_version("3.4.0")
    ok, why = backends.triton_status(torch.device("cpu"))
    assert not ok and "triton 3.4.0 is older than 3.5" in why, why
    assert backends.resolve_backend("pairwise_distance", cuda, torch.float64, "auto") == "torch"
    with pytest.raises(BackendUnavailableError, match="older than 3.5"):
        torchfg.pairwise_distance(torch.randn(6, 3, dtype=torch.float64), backend="triton")
    # Newer ones, and versions that do not say (a source build), are taken.
    for version in ("3.5.0", "3.5.1+git8a1e2f", "3.7rc1", "3.10.0", "unknown", ""):
        triton_version(version)
        assert backends.triton_status(torch.device("cpu")) == (True, f"triton {version} (interpreter, TRITON_INTERPRET=1)")
    assert [backends._parse_triton_version(v) for v in ("3.6.0.post1", "3", " 3.6", "v3.5")] == [(3, 6), (3, 0), (3, 6), None]


def test_constructors_refuse_a_backend_their_op_lacks():
    """A backend name the op does not implement fails where it is written, not at the first call
    (after the model is built and the data loaded); "auto" and the op's own backends pass."""
    from torchfg.errors import BackendUnavailableError
    from torchfg.heads import PrototypicalHead
    from torchfg.losses import AdaptiveTripletLoss, DINOLoss, TripletMarginLoss
    from torchfg.miners import BatchHardMiner

    makers = {
        "PrototypicalHead": lambda b: PrototypicalHead(backend=b),
        "DINOLoss": lambda b: DINOLoss(8, 4, backend=b),
        "TripletMarginLoss": lambda b: TripletMarginLoss(backend=b),
        "AdaptiveTripletLoss": lambda b: AdaptiveTripletLoss(backend=b),
        "BatchHardMiner": lambda b: BatchHardMiner(backend=b),
    }
    for name, make in makers.items():
        with pytest.raises(BackendUnavailableError, match="backend='cuda' is not implemented"):
            make("cuda")
        with pytest.raises(ValueError, match="backend must be one of"):
            make("cuda:0")
        for backend in ("auto", "torch", "triton"):
            assert make(backend).backend == backend, name
    assert backends.check_backend("cuda", "knn") == "cuda"


def test_memoised_environment_readings_follow_every_change(monkeypatch):
    """TRITON_INTERPRET, TORCHFG_BACKEND and TORCHFG_SYMMETRIC_MINING are read on every op call
    through a memo per value of the variable (os.environ.get cost ~1.4 us a read): a change made
    at any time, back and forth, is seen at the next call, an invalid value raises at every call,
    and an os.environ replaced by another mapping is read as it is."""
    for value, expected in [("1", True), ("0", False), ("1", True), ("yes", True), ("off", False)]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backends.triton_interpreter_enabled() is expected, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backends.triton_interpreter_enabled() is False

    cpu = torch.device("cpu")
    for _ in range(2):  # an invalid value is never kept: it raises again
        monkeypatch.setenv("TORCHFG_BACKEND", "bogus")
        with pytest.raises(ValueError, match="TORCHFG_BACKEND must be one of"):
            backends.resolve_backend("pairwise_distance", cpu, torch.float32, "auto")
        monkeypatch.setenv("TORCHFG_BACKEND", "torch")
        assert backends.resolve_backend("pairwise_distance", cpu, torch.float32, "auto") == "torch"
        assert backends.backend_is_forced("auto")
        monkeypatch.delenv("TORCHFG_BACKEND")
        assert not backends.backend_is_forced("auto")

    pytest.importorskip("triton")
    from torchfg.ops.triplet import triton as mining

    for value, expected in [("1", True), ("", False), ("on", True), ("no", False)]:
        monkeypatch.setenv("TORCHFG_SYMMETRIC_MINING", value)
        assert mining._wants_symmetric(None) is expected, value
    monkeypatch.setenv("TORCHFG_SYMMETRIC_MINING", "maybe")
    with pytest.raises(ValueError, match="TORCHFG_SYMMETRIC_MINING"):
        mining._wants_symmetric(None)

    monkeypatch.setattr(os, "environ", {"TRITON_INTERPRET": "1"})  # not os._Environ: no memo
    assert backends.triton_interpreter_enabled() is True
    os.environ["TRITON_INTERPRET"] = "0"
    assert backends.triton_interpreter_enabled() is False


def test_an_environment_reading_keeps_each_answer_under_the_value_it_parsed(monkeypatch):
    """The answer memoised under a raw value is parsed from that value: a write by another thread
    while the variable is parsed (simulated by the parse itself) cannot be kept under the old value."""
    monkeypatch.setenv("TORCHFG_TEST_SWITCH", "a")

    def parse(value):
        os.environ["TORCHFG_TEST_SWITCH"] = "b"  # another thread's write, meanwhile
        return value

    reading = backends.EnvironReading("TORCHFG_TEST_SWITCH", parse)
    assert reading() == "a"
    assert reading() == "b"
    os.environ["TORCHFG_TEST_SWITCH"] = "a"
    assert reading() == "a"  # the memo's answer for "a" is "a"
    monkeypatch.delenv("TORCHFG_TEST_SWITCH")
    assert backends.EnvironReading("TORCHFG_TEST_SWITCH", lambda value: value)() == ""


def test_environment_readings_compile_into_one_graph():
    """Under torch.compile the memo is not traced (dynamo guarded on it, and the first trace's
    entry cost a recompile at the second call): one frame, as with os.environ.get."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def fn(x):
        scale = 2.0 if backends.triton_interpreter_enabled() else 3.0
        return x * scale if backends._environment_backend() is None else x

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for _ in range(3):
        assert torch.equal(compiled(torch.ones(2)), fn(torch.ones(2)))
    assert counter.frame_count == 1
