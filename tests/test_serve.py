"""sparseprune.serve (issue 13): the Open Inference Protocol over a real uvicorn server on
127.0.0.1, dynamic batching, limits, errors, metrics and graceful shutdown.

Executables come from tests/serving.py (compiled once per session): `mlp` (float32 [batch, 6] ->
[batch, 3]) and `tagger` (int64 ids [batch, seq], seq 2..32 -> [batch, seq, 5]).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from serving import serving  # tests/serving.py
from sparseprune.runtime import load
from sparseprune.serve import create_app

TIMEOUT = 20.0  # seconds, every HTTP call


def infer_json(x: np.ndarray, name: str = "input", datatype: str = "FP32", **extra) -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
            **extra}


def binary_body(tensors, outputs_binary: bool = True):
    """(body, headers) of the binary-tensor extension for [(name, datatype, array)]."""
    head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": t,
                        "parameters": {"binary_data_size": a.nbytes}} for n, t, a in tensors],
            "parameters": {"binary_data_output": outputs_binary}}
    text = json.dumps(head).encode()
    return text + b"".join(a.tobytes() for _, _, a in tensors), {"Inference-Header-Content-Length": str(len(text))}


def output_of(response: httpx.Response, name: str = "output") -> np.ndarray:
    """An output tensor from a JSON or binary response."""
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    raw = response.content
    head = json.loads(raw if length is None else raw[:int(length)])
    offset = int(length or 0)
    for t in head["outputs"]:
        size = t.get("parameters", {}).get("binary_data_size")
        if t["name"] == name:
            if size is None:
                return np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            return np.frombuffer(raw, dtype="<f4", count=size // 4, offset=offset).reshape(t["shape"])
        offset += size or 0
    raise AssertionError(f"no output {name!r} in {head}")


@pytest.fixture(scope="module")
def exes(served_models):
    return {name: load(path, n_threads=1) for name, path in served_models.items()}


@pytest.fixture(scope="module")
def server(served_models):
    """Batching off: every request is its own executable call (bit for bit with run())."""
    with serving(create_app(served_models, batching=False, threads=1)) as url:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            yield client


# ------------------------------------------------------------------------------------- import
def test_importing_the_server_does_not_import_torch():
    code = ("import sys, sparseprune.serve, sparseprune.serve.app, sparseprune.serve.cli; "
            "from sparseprune.serve import create_app; import sparseprune.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------------------- the protocol
def test_health_and_metadata(server):
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.get("/v2/health/ready").status_code == 200
    assert server.get("/v2/models/mlp/ready").status_code == 200
    assert "binary_tensor_data" in server.get("/v2").json()["extensions"]
    meta = server.get("/v2/models/tagger").json()
    assert meta["name"] == "tagger"
    assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1],
                               "parameters": {"sample_shape": ["seq"]}}]
    assert meta["outputs"][0]["shape"] == [-1, -1, 5] and meta["outputs"][0]["datatype"] == "FP32"
    assert meta["parameters"]["dims"] == {"seq": {"min": 2, "max": 32}}
    assert server.get("/v2/models/mlp/versions/1").json()["inputs"][0]["shape"] == [-1, 6]
    missing = server.get("/v2/models/nope")
    assert missing.status_code == 404 and "mlp" in missing.json()["error"]


def test_json_and_binary_infer_equal_run_bit_for_bit(server, exes, rng):
    x = rng.standard_normal((3, 6)).astype(np.float32)
    want = exes["mlp"].run(x)
    r = server.post("/v2/models/mlp/infer", json=infer_json(x, id="req-1"))
    assert r.json()["id"] == "req-1" and r.headers["content-type"] == "application/json"
    np.testing.assert_array_equal(output_of(r), want)
    body, headers = binary_body([("input", "FP32", x)])
    r = server.post("/v2/models/mlp/versions/1/infer", content=body, headers=headers)
    assert r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(output_of(r), want)
    ids = rng.integers(0, 30, (2, 9))
    body, headers = binary_body([("ids", "INT32", ids.astype(np.int32))], outputs_binary=False)
    r = server.post("/v2/models/tagger/infer", content=body, headers=headers)
    np.testing.assert_array_equal(output_of(r), exes["tagger"].run(ids))
    # outputs asked by name, one as binary
    r = server.post("/v2/models/mlp/infer",
                    json=infer_json(x, outputs=[{"name": "output", "parameters": {"binary_data": True}}]))
    np.testing.assert_array_equal(output_of(r), want)


def test_tritonclient_http_works_unchanged(server, exes, rng):
    httpclient = pytest.importorskip("tritonclient.http")
    url = str(server.base_url).removeprefix("http://")
    client = httpclient.InferenceServerClient(url=url, connection_timeout=TIMEOUT, network_timeout=TIMEOUT)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tagger")
        meta = client.get_model_metadata("tagger")
        assert meta["inputs"][0]["name"] == "ids" and meta["inputs"][0]["datatype"] == "INT64"
        ids = rng.integers(0, 30, (3, 11)).astype(np.int64)
        for binary in (True, False):
            tensor = httpclient.InferInput("ids", list(ids.shape), "INT64")
            tensor.set_data_from_numpy(ids, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("output", binary_data=binary)]
            result = client.infer("tagger", [tensor], outputs=outputs)
            np.testing.assert_array_equal(result.as_numpy("output"), exes["tagger"].run(ids))
        x = rng.standard_normal((2, 6)).astype(np.float32)
        tensor = httpclient.InferInput("input", [2, 6], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor])  # no outputs named: all of them, binary
        np.testing.assert_array_equal(result.as_numpy("output"), exes["mlp"].run(x))
        bad = httpclient.InferInput("input", [2, 5], "FP32")
        bad.set_data_from_numpy(x[:, :5].copy())
        with pytest.raises(Exception, match=r"input 'input' \(FP32, shape \(batch, 6\)\)"):
            client.infer("mlp", [bad])
    finally:
        client.close()


# ------------------------------------------------------------------------------------ bad input
X = [[0.5] * 6]


def _header_json(head: dict, tail: bytes = b"") -> tuple:
    text = json.dumps(head).encode()
    return text + tail, {"Inference-Header-Content-Length": str(len(text))}


BAD = {
    "wrong datatype": (lambda: {"json": infer_json(np.ones((1, 6)), datatype="FP64")},
                       r"input 'input' \(FP32, shape \(batch, 6\)\): datatype 'FP64' given, expected FP32"),
    "wrong rank": (lambda: {"json": {"inputs": [{"name": "input", "shape": [6], "datatype": "FP32", "data": X[0]}]}},
                   r"input 'input' \(FP32, shape \(batch, 6\)\): input 0 \('input'\) must have shape \(batch, 6\), got \(6,\)"),
    "wrong size": (lambda: {"json": infer_json(np.ones((1, 5), np.float32))}, r"got \(1, 5\)"),
    "unknown name": (lambda: {"json": infer_json(np.ones((1, 6), np.float32), name="x")},
                     r"unknown input 'x': the inputs are input 'input' \(FP32, shape \(batch, 6\)\)"),
    "too many tensors": (lambda: {"json": {"inputs": infer_json(np.ones((1, 6)))["inputs"] * 2}},
                         r"expected 1 input tensor\(s\) \[input 'input' \(FP32, shape \(batch, 6\)\)\], got 2"),
    "no tensors": (lambda: {"json": {"inputs": []}}, r"expected 1 input tensor\(s\)"),
    "not JSON": (lambda: {"content": b"{inputs: nope"}, r"the request is not valid JSON"),
    "not UTF-8": (lambda: {"content": b"\xff\xfe{}"}, r"the request is not valid JSON"),
    "not an object": (lambda: {"json": [1, 2]}, r"the request must be a JSON object, got list"),
    "NaN": (lambda: {"content": b'{"inputs":[{"name":"input","shape":[1,6],"datatype":"FP32",'
                                b'"data":[NaN,0,0,0,0,0]}]}'}, r"holds NaN: JSON numbers must be finite"),
    "Infinity": (lambda: {"content": b'{"inputs":[{"name":"input","shape":[1,6],"datatype":"FP32",'
                                     b'"data":[-Infinity,0,0,0,0,0]}]}'}, r"holds -Infinity"),
    "beyond float32": (lambda: {"json": {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32",
                                                     "data": [1e39, 0, 0, 0, 0, 0]}]}}, r"beyond float32's range"),
    "count of values": (lambda: {"json": {"inputs": [{"name": "input", "shape": [2, 6], "datatype": "FP32",
                                                      "data": X[0]}]}}, r"data holds 6 values, the shape needs 12"),
    "ragged data": (lambda: {"json": {"inputs": [{"name": "input", "shape": [2, 6], "datatype": "FP32",
                                                  "data": [X[0], [1, 2]]}]}}, r"not a regular array"),
    "strings": (lambda: {"json": {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32",
                                              "data": ["1"] * 6}]}}, r"data holds <U1 values, not FP32"),
    "negative dim": (lambda: {"json": {"inputs": [{"name": "input", "shape": [-1, 6], "datatype": "FP32",
                                                   "data": X[0]}]}}, r"shape must be a list of non-negative ints"),
    "enormous inner dim": (lambda: {"json": {"inputs": [{"name": "input", "shape": [1, 10 ** 15],
                                                         "datatype": "FP32", "data": []}]}}, r"got \(1, 1000000000000000\)"),
    "truncated binary": (lambda: dict(zip(("content", "headers"), _header_json(
        {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]},
        b"\0" * 10))), r"the binary part ends after 10 bytes, this tensor needs bytes 0 to 24: the body is truncated"),
    "binary size mismatch": (lambda: dict(zip(("content", "headers"), _header_json(
        {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 20}}]},
        b"\0" * 20))), r"binary_data_size 20 given, a FP32 tensor of shape \[1, 6\] takes 24 bytes"),
    "extra binary bytes": (lambda: dict(zip(("content", "headers"), _header_json(
        {"inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]},
        b"\0" * 30))), r"the body holds 30 bytes after the JSON part"),
    "bad header length": (lambda: {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}},
                          r"Inference-Header-Content-Length is '99'"),
    "unknown output": (lambda: {"json": infer_json(np.ones((1, 6)), outputs=[{"name": "logits"}])},
                       r"unknown output 'logits': the outputs are output"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_400_naming_the_tensor_and_the_server_goes_on(server, exes, case):
    make, message = BAD[case]
    r = server.post("/v2/models/mlp/infer", **make())
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert re.search(message, r.json()["error"]), r.json()["error"]
    good = server.post("/v2/models/mlp/infer", json=infer_json(np.ones((1, 6), np.float32)))
    np.testing.assert_array_equal(output_of(good), exes["mlp"].run(np.ones((1, 6), np.float32)))


@pytest.mark.parametrize("ids, message", [
    ([[1, 2, 99]], r"input 0 \('ids'\) holds 99 at \(0, 2\), not a row of embedding 'emb'"),  # the executable's own check
    ([[1]], r"input 'ids' \(INT64, shape \(batch, seq\)\): input 0 \('ids'\) has size 1 along axis 1 \(dim 'seq' = 1\), allowed 2..32"),
    ([[1.5, 2]], r"data holds float64 values, not INT64"),
])
def test_bad_token_ids(server, ids, message):
    r = server.post("/v2/models/tagger/infer", json={"inputs": [
        {"name": "ids", "shape": [len(ids), len(ids[0])], "datatype": "INT64", "data": ids}]})
    assert r.status_code == 400 and re.search(message, r.json()["error"]), r.text


def test_enormous_batch_in_the_header_is_a_413(server):
    r = server.post("/v2/models/mlp/infer",
                    json={"inputs": [{"name": "input", "shape": [10 ** 15, 6], "datatype": "FP32", "data": []}]})
    assert r.status_code == 413 and "--max-batch 32" in r.json()["error"], r.text


# ------------------------------------------------------------------------------------- batching
def _concurrently(fns, workers=16):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(f) for f in fns]
        return [f.result(timeout=60) for f in futures]


def test_dynamic_batching_gives_each_caller_its_rows(served_models, exes, rng):
    """Concurrent requests of 1..4 rows and of different sequence lengths form batches (the
    metrics show calls of several requests); each caller gets exactly its rows."""
    xs = [rng.standard_normal((1 + i % 4, 6)).astype(np.float32) for i in range(24)]
    ids = [rng.integers(0, 30, (1 + i % 3, 4 + 5 * (i % 2))) for i in range(12)]
    # each call 50 ms longer: requests pile up while a batch runs, however fast the machine
    app = create_app({name: slowed(path, 0.05) for name, path in served_models.items()}, max_batch=16,
                     max_wait_ms=50)
    with serving(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT,
                                           limits=httpx.Limits(max_connections=40)) as client:
        calls = [lambda x=x: client.post("/v2/models/mlp/infer", json=infer_json(x)) for x in xs]
        calls += [lambda i=i: client.post("/v2/models/tagger/infer", json=infer_json(i, "ids", "INT64")) for i in ids]
        responses = _concurrently(calls, workers=36)
        metrics = client.get("/metrics").text
    for x, r in zip(xs, responses):
        np.testing.assert_allclose(output_of(r), exes["mlp"].run(x), rtol=1e-5, atol=1e-6)
    for i, r in zip(ids, responses[len(xs):]):
        np.testing.assert_allclose(output_of(r), exes["tagger"].run(i), rtol=1e-5, atol=1e-6)
    requests = _histogram(metrics, "sparseprune_batch_requests", "mlp")
    assert requests["count"] < len(xs), f"no batch held two requests: {requests}"
    assert _histogram(metrics, "sparseprune_batch_rows", "mlp")["sum"] == sum(len(x) for x in xs)
    assert _histogram(metrics, "sparseprune_batch_rows", "tagger")["sum"] == sum(len(i) for i in ids)


def test_batching_off_is_bit_for_bit_under_concurrency(server, exes, rng):
    xs = [rng.standard_normal((1 + i % 3, 6)).astype(np.float32) for i in range(16)]
    responses = _concurrently([lambda x=x: server.post("/v2/models/mlp/infer", json=infer_json(x)) for x in xs])
    for x, r in zip(xs, responses):
        np.testing.assert_array_equal(output_of(r), exes["mlp"].run(x))


def _histogram(text: str, name: str, model: str) -> dict:
    values = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            prefix = f'{name}_{part}{{model="{model}"}} '
            if line.startswith(prefix):
                values[part] = float(line[len(prefix):])
    assert set(values) == {"count", "sum"}, f"{name} for {model} not in the metrics"
    return values


# --------------------------------------------------------------------------------------- limits
def test_body_limit_is_a_413(served_models):
    with serving(create_app(served_models, max_body_bytes=200)) as url, httpx.Client(base_url=url,
                                                                                     timeout=TIMEOUT) as c:
        r = c.post("/v2/models/mlp/infer", json=infer_json(np.ones((8, 6), np.float32)))
        assert r.status_code == 413 and "above the server's limit of 200" in r.json()["error"]

        def chunks():  # no Content-Length: refused while it streams in
            yield b"{" + b" " * 150
            yield b" " * 150 + b"}"

        r = c.post("/v2/models/mlp/infer", content=chunks())
        assert r.status_code == 413 and "over 200 bytes" in r.json()["error"]
        ok = c.post("/v2/models/mlp/infer", json=infer_json(np.ones((1, 6), np.float32)))
        assert ok.status_code == 200


def slowed(path, seconds: float):
    """The executable at `path` with every run() taking `seconds` longer (requests pile up)."""
    exe = load(path, n_threads=1)
    run = exe.run

    def slow(*inputs, **kwargs):
        time.sleep(seconds)
        return run(*inputs, **kwargs)

    exe.run = slow
    return exe


def gated(path):
    """The executable at `path` with every run() first waiting for the returned Event (a batch
    held running while requests queue behind it), at most TIMEOUT seconds."""
    import threading

    exe = load(path, n_threads=1)
    run = exe.run
    gate = threading.Event()

    def held(*inputs, **kwargs):
        gate.wait(TIMEOUT)
        return run(*inputs, **kwargs)

    exe.run = held
    return exe, gate


def _wait_for_queue(client, model: str, depth: int) -> None:
    deadline = time.monotonic() + 10
    while f'sparseprune_queue_depth{{model="{model}"}} {depth:.1f}' not in client.get("/metrics").text:
        assert time.monotonic() < deadline, f"the queue never held {depth} requests"
        time.sleep(0.01)


def test_rows_limit_queue_limit_and_executable_limits(served_models):
    from sparseprune.runtime import Limits

    tagger = load(served_models["tagger"])
    tagger.limits = Limits(max_work=2e5)  # one sample at seq 32 takes 345,568 FLOP
    mlp, gate = gated(served_models["mlp"])
    app = create_app({"mlp": mlp, "tagger": tagger}, max_batch=4, max_queue=2, max_wait_ms=1)
    with serving(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        r = c.post("/v2/models/mlp/infer", json=infer_json(np.ones((5, 6), np.float32)))
        assert r.status_code == 413 and "5 rows, above the server's --max-batch 4" in r.json()["error"]
        long = np.ones((1, 32), np.int64)
        r = c.post("/v2/models/tagger/infer", json=infer_json(long, "ids", "INT64"))
        assert r.status_code == 413 and "Limits.max_work" in r.json()["error"], r.text
        # one request runs (held at the gate), two wait in the queue; the fourth finds it full
        one = infer_json(np.ones((1, 6), np.float32))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(c.post, "/v2/models/mlp/infer", json=one)
            _wait_for_queue(c, "mlp", 0)  # taken from the queue: running
            waiting = [pool.submit(c.post, "/v2/models/mlp/infer", json=one) for _ in range(2)]
            _wait_for_queue(c, "mlp", 2)
            full = c.post("/v2/models/mlp/infer", json=one)
            gate.set()
            assert full.status_code == 429 and "--max-queue" in full.json()["error"]
            assert full.headers["retry-after"] == "1"
            assert [f.result(timeout=TIMEOUT).status_code for f in [first, *waiting]] == [200, 200, 200]


def test_a_lone_request_does_not_wait_for_company(served_models):
    """max_wait_ms bounds the wait for requests on their way; with none arriving, none is paid."""
    with serving(create_app(served_models, max_wait_ms=5000)) as url, httpx.Client(base_url=url,
                                                                                   timeout=TIMEOUT) as c:
        t0 = time.monotonic()
        for _ in range(3):
            assert c.post("/v2/models/mlp/infer", json=infer_json(np.ones((1, 6), np.float32))).status_code == 200
        assert time.monotonic() - t0 < 3


def test_executable_error_is_a_500_for_that_request_only(served_models, rng):
    exe = load(served_models["mlp"], n_threads=1)
    run = exe.run

    def faulty(*inputs, **kwargs):  # fails on any batch holding a row starting with 123
        if (inputs[0][:, 0] == 123).any():
            raise RuntimeError("kernel exploded")
        return run(*inputs, **kwargs)

    exe.run = faulty
    xs = [rng.standard_normal((1, 6)).astype(np.float32) for _ in range(6)]
    xs[2][0, 0] = 123
    with serving(create_app({"mlp": exe}, max_wait_ms=100)) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        responses = _concurrently([lambda x=x: c.post("/v2/models/mlp/infer", json=infer_json(x)) for x in xs])
        assert [r.status_code for r in responses] == [200, 200, 500, 200, 200, 200]
        assert responses[2].json()["error"] == "the executable failed: RuntimeError: kernel exploded"
        for x, r in zip(xs, responses):
            if r.status_code == 200:
                np.testing.assert_allclose(output_of(r), run(x), rtol=1e-5, atol=1e-6)
        assert c.post("/v2/models/mlp/infer", json=infer_json(xs[0])).status_code == 200
        assert 'sparseprune_request_errors_total{model="mlp",status="500"} 1.0' in c.get("/metrics").text


# ------------------------------------------------------------------------------ metrics, shutdown
def test_metrics_count_requests_errors_latency_batches_and_queue(server):
    server.post("/v2/models/mlp/infer", json=infer_json(np.ones((2, 6), np.float32)))
    server.post("/v2/models/mlp/infer", content=b"nope")
    text = server.get("/metrics").text
    assert server.get("/metrics").headers["content-type"].startswith("text/plain")
    for line in ('sparseprune_requests_total{model="mlp",status="200"}',
                 'sparseprune_request_errors_total{model="mlp",status="400"}',
                 'sparseprune_queue_depth{model="mlp"} 0.0',
                 'sparseprune_request_seconds_count{model="mlp"}',
                 'sparseprune_run_seconds_count{model="mlp"}',
                 'sparseprune_batch_rows_bucket{le="2.0",model="mlp"}'):
        assert line in text, line
    assert _histogram(text, "sparseprune_batch_requests", "mlp")["count"] >= 1


def test_shutdown_answers_every_accepted_request(served_models, rng):
    """Stopping the server (as on SIGTERM) while one batch runs and seven requests wait in the
    queue: all of them are answered; afterwards the server is gone."""
    import threading

    xs = [rng.standard_normal((1, 6)).astype(np.float32) for _ in range(8)]
    exe, gate = gated(served_models["mlp"])
    app = create_app({"mlp": exe}, max_batch=1)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with serving(app) as url:
            client = httpx.Client(base_url=url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=10))
            futures = [pool.submit(client.post, "/v2/models/mlp/infer", json=infer_json(x)) for x in xs]
            _wait_for_queue(client, "mlp", 7)  # one held running, seven queued
            threading.Timer(0.5, gate.set).start()  # released once the shutdown below has begun
        # leaving serving() stopped uvicorn: it waited for the 8 accepted requests
        responses = [f.result(timeout=TIMEOUT) for f in futures]
        client.close()
    for x, r in zip(xs, responses):
        np.testing.assert_array_equal(output_of(r), load(served_models["mlp"]).run(x))
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=2) as c:
        c.get(url + "/v2/health/live")


def test_submit_after_close_is_refused_and_readiness_drops(served_models):
    import asyncio

    from sparseprune.serve.batching import Batcher, ShuttingDown

    exe = load(served_models["mlp"])

    async def scenario():
        b = Batcher(exe, max_batch=8, max_wait_ms=1, max_queue=4)
        b.start()
        out = await b.submit([np.ones((1, 6), np.float32)], ())
        await b.close()
        with pytest.raises(ShuttingDown):
            await b.submit([np.ones((1, 6), np.float32)], ())
        return out

    out = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    np.testing.assert_array_equal(out[0], exe.run(np.ones((1, 6), np.float32)))


def test_after_shutdown_the_app_answers_503(served_models):
    """Once the lifespan has ended (shutdown began), readiness and infer say 503 with a JSON error."""
    import asyncio

    app = create_app(served_models)

    async def scenario():
        async with app.router.lifespan_context(app):
            pass  # started, then shut down (queues drained)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return (await c.get("/v2/health/ready"),
                    await c.post("/v2/models/mlp/infer", json=infer_json(np.ones((1, 6), np.float32))))

    ready, r = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert ready.status_code == 503 and ready.json() == {"ready": False}
    assert r.status_code == 503 and r.json() == {"error": "the server is shutting down"}


def test_create_app_checks_its_arguments(served_models, exes):
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        create_app(served_models, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms must be a number"):
        create_app(served_models, max_wait_ms=math.inf)
    with pytest.raises(ValueError, match="give at least one executable"):
        create_app([])
    with pytest.raises(TypeError, match=r"models\['m'\] must be a path or an Executable"):
        create_app({"m": 3})
    with pytest.raises(ValueError, match="two models are named 'mlp'"):
        create_app([served_models["mlp"], served_models["mlp"]])
    with pytest.raises(FileNotFoundError):
        create_app(["/nonexistent/model.safetensors"])


def test_the_command_serves_and_stops_on_sigterm(served_models, exes):
    """`sparseprune serve NAME=PATH ...` in a subprocess: it answers, and SIGTERM stops it (uvicorn
    drains, then re-raises the signal: exit status 0 or -SIGTERM)."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sparseprune", "serve", f"m={served_models['mlp']}", "--port", str(port),
           "--threads", "1", "--max-wait-ms", "1"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 60
            while not _ready(url):
                assert proc.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not get ready in 60 s"
                time.sleep(0.1)
            x = np.ones((2, 6), np.float32)
            r = httpx.post(f"{url}/v2/models/m/infer", json=infer_json(x), timeout=TIMEOUT)
            np.testing.assert_array_equal(output_of(r), exes["mlp"].run(x))
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode in (0, -signal.SIGTERM), err
            assert "sparseprune serve: m on http://127.0.0.1" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
