"""sparseprune.serve.ray (issue 13): a Ray Serve deployment of the executables on a local Ray
instance (2 CPUs), reached over HTTP on 127.0.0.1 with the same protocol; Ray is shut down after."""
from __future__ import annotations

import concurrent.futures
import socket
import warnings

import httpx
import numpy as np
import pytest

from sparseprune.runtime import load

with warnings.catch_warnings():  # Ray's own deprecation warnings at import (pydantic v1 idioms)
    warnings.simplefilter("ignore")
    ray = pytest.importorskip("ray")
    from ray import serve
    import sparseprune.serve.ray  # noqa: F401

from test_serve import TIMEOUT, _histogram, infer_json, output_of  # noqa: E402  (tests/test_serve.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(served_models):
    from sparseprune.serve.ray import deployment

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(served_models, num_replicas=1, num_cpus=1, threads=1, max_batch=16, max_wait_ms=50)
        serve.run(app, route_prefix="/", name="sparseprune", blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_speaks_the_protocol_and_batches(ray_server, served_models, rng):
    client = ray_server
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/tagger").json()["parameters"]["dims"] == {"seq": {"min": 2, "max": 32}}
    exes = {name: load(path, n_threads=1) for name, path in served_models.items()}
    xs = [rng.standard_normal((1 + i % 3, 6)).astype(np.float32) for i in range(16)]
    ids = [rng.integers(0, 30, (1 + i % 2, 3 + 4 * (i % 2))) for i in range(8)]
    calls = [lambda x=x: client.post("/v2/models/mlp/infer", json=infer_json(x)) for x in xs]
    calls += [lambda i=i: client.post("/v2/models/tagger/infer", json=infer_json(i, "ids", "INT64")) for i in ids]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = [f.result(timeout=60) for f in [pool.submit(c) for c in calls]]
    for x, r in zip(xs, responses):
        np.testing.assert_allclose(output_of(r), exes["mlp"].run(x), rtol=1e-5, atol=1e-6)
    for i, r in zip(ids, responses[len(xs):]):
        np.testing.assert_allclose(output_of(r), exes["tagger"].run(i), rtol=1e-5, atol=1e-6)
    metrics = client.get("/metrics").text  # the one replica's
    assert _histogram(metrics, "sparseprune_batch_rows", "mlp")["sum"] == sum(len(x) for x in xs)
    assert _histogram(metrics, "sparseprune_batch_requests", "mlp")["count"] < len(xs), "no batch formed"
    bad = client.post("/v2/models/mlp/infer", json=infer_json(np.ones((1, 5), np.float32)))
    assert bad.status_code == 400 and "input 'input' (FP32, shape (batch, 6))" in bad.json()["error"]
    too_big = client.post("/v2/models/mlp/infer", json=infer_json(np.ones((17, 6), np.float32)))
    assert too_big.status_code == 413
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_allclose(output_of(client.post("/v2/models/mlp/infer", json=infer_json(x))),
                               exes["mlp"].run(x), rtol=1e-5, atol=1e-6)


def test_deployment_checks_its_arguments(served_models):
    from sparseprune.serve.ray import deployment

    with pytest.raises(ValueError, match="num_replicas must be a positive int"):
        deployment(served_models, num_replicas=0)
    with pytest.raises(ValueError, match="num_cpus must be a positive number"):
        deployment(served_models, num_cpus=0)
    with pytest.raises(TypeError, match="Ray replicas load executables from paths"):
        deployment({"m": 3})
