"""Concurrency soak (issue 12): one executable called by 8 threads x 1,000 calls of mixed batch
sizes and thread counts gives bit-identical results to serial calls, also while another thread
loads and drops executables. Bounded: a few seconds on a shared 2-core machine."""
import threading

import numpy as np
import pytest
from concurrency import run_in_threads  # tests/concurrency.py
from test_executable import every_op_spec  # conv, pools, bsr and csr linear, layernorm, softmax

from sparseprune.runtime import Executable, load

THREADS = 8
CALLS = 1000
BATCHES = (0, 1, 2, 3, 5, 8, 13)


@pytest.fixture
def soak_case(rng, tmp_path):
    spec, arrays = every_op_spec(rng)
    exe = Executable.from_spec(spec, arrays)
    path = tmp_path / "every_op.safetensors"
    exe.save(path)
    # 28 calls: every batch size, at 1 and 2 intra-op threads; serial results are the reference
    cases = [(rng.standard_normal((b, 3, 10, 10)).astype(np.float32), t) for b in BATCHES for t in (1, 2)] * 2
    serial = [exe.run(x, n_threads=t) for x, t in cases]
    return exe, path, cases, serial


def _hammer(exe, cases, serial, failures):
    def worker(k):
        order = np.random.default_rng(k).integers(0, len(cases), CALLS)
        for i in order:
            x, t = cases[i]
            got = exe.run(x, n_threads=t)
            for g, want in zip(got, serial[i]):
                if not np.array_equal(g, want):
                    failures.append((k, int(i)))
                    return

    run_in_threads(worker, THREADS)


def test_eight_threads_on_one_executable_match_serial_calls(soak_case):
    exe, _, cases, serial = soak_case
    failures = []
    _hammer(exe, cases, serial, failures)
    assert failures == []


def test_soak_while_another_thread_loads_and_drops_executables(soak_case):
    exe, path, cases, serial = soak_case
    failures, loads = [], []
    stop = threading.Event()

    def churn():
        x, t = cases[5]
        while not stop.is_set():
            other = load(path, n_threads=1)
            if not all(np.array_equal(g, w) for g, w in zip(other.run(x, n_threads=t), serial[5])):
                failures.append("loaded")
            loads.append(1)
            del other

    loader = threading.Thread(target=churn)
    loader.start()
    try:
        _hammer(exe, cases, serial, failures)
    finally:
        stop.set()
        loader.join()
    assert failures == []
    assert len(loads) >= 1
