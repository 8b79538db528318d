"""The ASGI app: the Open Inference Protocol's REST endpoints and /metrics, over one batcher per
model. Starlette (not FastAPI): the protocol's checks live in protocol.py with the messages the
issue asks for, so a framework's own validation layer would only add a second one.

    GET  /v2/health/live, /v2/health/ready, /v2           server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}][/ready]          model metadata, readiness
    POST /v2/models/{name}[/versions/{v}]/infer            inference (JSON or binary tensors)
    GET  /metrics                                          Prometheus text format

Errors are JSON {"error": message}: 400 malformed request, 404 unknown model, 413 body or batch
too large (or beyond the executable's Limits), 429 queue full, 500 the executable failed (the
server keeps serving), 503 shutting down. Shutdown (the lifespan's end) answers every request
already accepted before it stops.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Union

try:
    import prometheus_client  # noqa: F401  (metrics.py)
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f'sparseprune.serve needs the serve extra: pip install "sparseprune[serve]" ({exc})') from exc

import sparseprune
from sparseprune.runtime import Executable, LimitExceeded, Limits, load
from sparseprune.serve import protocol
from sparseprune.serve.batching import Batcher, QueueFull, ShuttingDown
from sparseprune.serve.defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS
from sparseprune.serve.metrics import CONTENT_TYPE_LATEST, Metrics




def _json(status: int, payload: Any) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type=protocol.JSON_TYPE)


def _error(status: int, message: str, headers: Optional[Dict[str, str]] = None) -> Response:
    return Response(protocol.error_body(message), status_code=status, media_type=protocol.JSON_TYPE,
                    headers=headers)


def model_name(path: Union[str, "os.PathLike[str]"]) -> str:
    """A model's default name: its file name without the extension (resnet.safetensors -> resnet)."""
    base = os.path.basename(os.fspath(path))
    return base.split(".", 1)[0] or base


def load_models(models: Union[Mapping[str, Any], Sequence[Any]], *, threads: Optional[int],
                limits: Limits) -> Dict[str, Executable]:
    """{name: Executable} from paths (named after their files) or a {name: path or Executable}."""
    items = list(models.items()) if isinstance(models, Mapping) else [(model_name(p), p) for p in models]
    if not items:
        raise ValueError("models: give at least one executable (a path or an Executable)")
    loaded: Dict[str, Executable] = {}
    for name, model in items:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"models: a model name must be a non-empty string without '/', got {name!r}")
        if name in loaded:
            raise ValueError(f"models: two models are named {name!r} (name them with {{name: path}})")
        if isinstance(model, Executable):
            if threads is not None:
                model.n_threads = threads
        elif isinstance(model, (str, os.PathLike)):
            model = load(model, n_threads=threads, limits=limits)
        else:
            raise TypeError(f"models[{name!r}] must be a path or an Executable, got {type(model).__name__}")
        loaded[name] = model
    return loaded


def create_app(models: Union[Mapping[str, Any], Sequence[Any]], *, max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY, batching: bool = True, threads: Optional[int] = None,
               limits: Optional[Limits] = None) -> Starlette:
    """An ASGI app serving `models`: executable paths (each named after its file), or a mapping
    {name: path or Executable}. Paths are loaded with `limits` (default Limits(max_batch=max_batch));
    `threads` sets each model's n_threads. See the module doc for the endpoints and errors.

    Mount it in another Starlette/FastAPI app, or run it with any ASGI server (uvicorn); its
    lifespan starts the batchers and, at shutdown, drains them."""
    for value, name in ((max_batch, "max_batch"), (max_queue, "max_queue"), (max_body_bytes, "max_body_bytes")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not 0 <= max_wait_ms <= 60_000:
        raise ValueError(f"max_wait_ms must be a number in [0, 60000], got {max_wait_ms!r}")
    limits = Limits(max_batch=max(max_batch, Limits().max_batch)) if limits is None else limits
    metrics = Metrics()
    batchers = {
        name: Batcher(exe, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, batching=batching,
                      on_batch=lambda stats, n=name: metrics.batch(n, stats),
                      on_queue=lambda depth, n=name: metrics.queue(n, depth))
        for name, exe in load_models(models, threads=threads, limits=limits).items()
    }
    return build_app(batchers, metrics, max_batch=max_batch, max_body_bytes=max_body_bytes)


def build_app(runners: Mapping[str, Any], metrics: Metrics, *, max_batch: int, max_body_bytes: int) -> Starlette:
    """The app over ready-made runners (name -> an object with .exe, start(), arriving() (a context
    around reading a request), async submit(inputs, dims) and async close()): Batcher here, the Ray
    Serve replica's @serve.batch runner there."""
    state = {"ready": True}  # until shutdown begins (a mounted app without lifespan starts on use)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for runner in runners.values():
            runner.start()
        try:
            yield
        finally:
            state["ready"] = False  # readiness fails first: balancers stop sending
            for runner in runners.values():
                await runner.close()

    def runner_for(request: Request):
        name = request.path_params["name"]
        runner = runners.get(name)
        if runner is None:
            return None, _error(404, f"unknown model {name!r}: this server has {', '.join(sorted(runners))}")
        return runner, None

    async def live(request: Request) -> Response:
        return _json(200, {"live": True})

    async def ready(request: Request) -> Response:
        return _json(200 if state["ready"] else 503, {"ready": state["ready"]})

    async def server_metadata(request: Request) -> Response:
        return _json(200, {"name": "sparseprune", "version": sparseprune.__version__,
                           "extensions": ["binary_tensor_data"]})

    async def model_metadata(request: Request) -> Response:
        runner, error = runner_for(request)
        if error is not None:
            return error
        return _json(200, protocol.model_metadata(request.path_params["name"], runner.exe, max_batch))

    async def model_ready(request: Request) -> Response:
        runner, error = runner_for(request)
        if error is not None:
            return error
        return _json(200 if state["ready"] else 503, {"name": request.path_params["name"], "ready": state["ready"]})

    async def infer(request: Request) -> Response:
        t0 = time.perf_counter()
        runner, response = runner_for(request)
        name = request.path_params["name"]
        if runner is not None:
            response = await _infer(request, name, runner)
        metrics.answered(name if runner is not None else "", response.status_code, time.perf_counter() - t0)
        return response

    async def _infer(request: Request, name: str, runner: Any) -> Response:
        try:
            with runner.arriving():  # a batch being formed may wait for this request
                body = await _read_body(request, max_body_bytes)
                parsed = protocol.parse_infer(runner.exe, body, request.headers.get(protocol.HEADER_LENGTH),
                                              max_batch)
            outputs = await runner.submit(parsed.inputs, parsed.dims)
        except protocol.ProtocolError as exc:
            return _error(exc.status, str(exc))
        except QueueFull as exc:
            return _error(429, str(exc), headers={"retry-after": "1"})
        except ShuttingDown as exc:
            return _error(503, str(exc))
        except LimitExceeded as exc:
            return _error(413, str(exc))
        except (ValueError, TypeError) as exc:  # run()'s checks of the values (a token id out of range)
            return _error(400, str(exc))
        except Exception as exc:  # the executable failed: this request's answer, the server goes on
            return _error(500, f"the executable failed: {type(exc).__name__}: {exc}")
        body, headers = protocol.encode_infer(name, parsed, dict(zip(runner.exe.output_names, outputs)))
        return Response(body, status_code=200, headers=headers)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics_text),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.runners = dict(runners)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes: from Content-Length before reading anything,
    else while it streams in (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.ProtocolError(413, f"the body is {int(declared)} bytes, above the server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.ProtocolError(413, f"the body is over {limit} bytes, the server's limit")
        chunks.append(chunk)
    return b"".join(chunks)
