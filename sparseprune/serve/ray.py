"""Scale out on Ray Serve: the same protocol, endpoints and errors as `sparseprune serve`, served
by replicas spread over a Ray cluster, batching through Ray Serve's own `@serve.batch`.

    import ray
    from ray import serve
    from sparseprune.serve.ray import deployment

    ray.init(address="auto")                        # a running cluster (or ray.init() locally)
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(deployment(["/models/resnet.safetensors"], num_replicas=4, num_cpus=2, threads=2),
              route_prefix="/")

Each replica loads every executable (the paths must exist on every node: a shared file system or
the same files copied), runs the app of sparseprune.serve.app over them, and hands infer requests
to one `@serve.batch` method: up to max_batch rows (counted by rows, not requests) waiting at most
max_wait_ms, grouped by model and sequence length, each caller getting its rows. Ray Serve routes
requests to replicas and restarts failed ones; num_cpus reserves the cores of each replica, threads
sets its executables' threads (give both the same number).

Needs the ray extra: pip install "sparseprune[ray]". Nothing here imports torch.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f'sparseprune.serve.ray needs the ray extra: pip install "sparseprune[ray]" ({exc})') from exc

from sparseprune.runtime import Limits
from sparseprune.serve.app import build_app, load_models
from sparseprune.serve.batching import BatchStats, run_each
from sparseprune.serve.defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, DEFAULT_MAX_WAIT_MS
from sparseprune.serve.metrics import Metrics

# One request waiting for @serve.batch: (model name, dims, inputs).
_Item = Tuple[str, Tuple[int, ...], List[Any]]


def _rows(items: Sequence[_Item]) -> int:
    """@serve.batch's batch size: rows, as --max-batch counts them in sparseprune serve."""
    return sum(inputs[0].shape[0] for _, _, inputs in items)


class _ReplicaRunner:
    """One model of a replica as build_app wants it: submit() goes through the replica's batch method."""

    def __init__(self, name: str, exe, replica: "ExecutableReplica"):
        self.name, self.exe, self._replica = name, exe, replica

    def start(self) -> None:
        pass

    def arriving(self):  # @serve.batch waits its batch_wait_timeout_s regardless
        return contextlib.nullcontext()

    async def close(self) -> None:  # Ray Serve drains a replica's requests before stopping it
        pass

    async def submit(self, inputs: List[Any], dims: Tuple[int, ...]) -> List[Any]:
        result = await self._replica.run_batch((self.name, dims, inputs))
        if isinstance(result, Exception):
            raise result
        return result


@serve.ingress()
class ExecutableReplica:
    """A Ray Serve replica serving executables with the Open Inference Protocol (see the module doc)."""

    def __init__(self, models: Dict[str, str], threads: Optional[int], max_batch: int, max_wait_ms: float,
                 max_body_bytes: int):
        limits = Limits(max_batch=max(max_batch, Limits().max_batch))
        self.exes = load_models(models, threads=threads, limits=limits)
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.metrics = Metrics()
        self.run_batch.set_max_batch_size(max_batch)
        self.run_batch.set_batch_wait_timeout_s(max_wait_ms / 1000.0)

    def __serve_build_asgi_app__(self):
        runners = {name: _ReplicaRunner(name, exe, self) for name, exe in self.exes.items()}
        return build_app(runners, self.metrics, max_batch=self.max_batch, max_body_bytes=self.max_body_bytes)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_MAX_WAIT_MS / 1000.0,
                 batch_size_fn=_rows)
    async def run_batch(self, items: List[_Item]) -> List[Any]:
        """Per item its outputs or its exception: one executable call per (model, dims) group."""
        groups: Dict[Tuple[str, Tuple[int, ...]], List[int]] = collections.defaultdict(list)
        for i, (name, dims, _) in enumerate(items):
            groups[(name, dims)].append(i)
        results: List[Any] = [None] * len(items)
        for (name, _), members in groups.items():
            t0 = time.perf_counter()
            try:  # on a thread: the replica's event loop keeps taking requests meanwhile
                out = await asyncio.to_thread(run_each, self.exes[name], [items[i][2] for i in members])
            except Exception as exc:  # one request alone failed
                out = [exc]
            rows = sum(items[i][2][0].shape[0] for i in members)
            self.metrics.batch(name, BatchStats(len(members), rows, time.perf_counter() - t0))
            for i, result in zip(members, out):
                results[i] = result
        return results


def deployment(models: Union[Mapping[str, Any], Sequence[Any]], *, num_replicas: int = 1, num_cpus: float = 1,
               threads: Optional[int] = None, max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_body_bytes: int = DEFAULT_MAX_BODY,
               name: str = "sparseprune"):
    """A Ray Serve application serving `models` (executable paths, each named after its file, or
    {name: path}) on `num_replicas` replicas of `num_cpus` CPUs each, every executable running
    `threads` threads. Pass it to serve.run(app, route_prefix="/")."""
    for value, what in ((num_replicas, "num_replicas"), (max_batch, "max_batch")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    if not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or not num_cpus > 0:
        raise ValueError(f"num_cpus must be a positive number, got {num_cpus!r}")
    items = list(models.items()) if isinstance(models, Mapping) else [(None, p) for p in models]
    from sparseprune.serve.app import model_name

    paths = {}
    for key, path in items:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"models: Ray replicas load executables from paths, got {type(path).__name__}")
        key = key if key is not None else model_name(path)
        if key in paths:
            raise ValueError(f"models: two models are named {key!r} (name them with {{name: path}})")
        paths[key] = os.path.abspath(os.fspath(path))
    if not paths:
        raise ValueError("models: give at least one executable path")
    replica = serve.deployment(
        ExecutableReplica, name=name, num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus},
        # enough requests in flight per replica to fill a batch twice over (Ray's default is 5)
        max_ongoing_requests=2 * max_batch + 8)
    return replica.bind(paths, threads, max_batch, max_wait_ms, max_body_bytes)
