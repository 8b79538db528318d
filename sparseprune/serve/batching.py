"""Dynamic batching: concurrent requests for one model run as one Executable.run call.

A model's requests wait in one queue. Its batcher takes the oldest request, waits up to
max_wait_ms for more requests of the same dims (sequence lengths: requests of other lengths form
their own batches, so nothing is padded), up to max_batch rows, runs them as one call on its own
thread and hands each caller exactly its rows. One batch runs at a time per model: the
executable's own threads (--threads) use the cores, and the next batch fills meanwhile.

It waits only while company is on its way: while other requests for the model are being read
and checked (the app marks them with arriving()). A lone client then pays no wait at all, and
under load batches still form, from what queued while the previous batch ran and what is arriving.

With batching off every request is its own call, through the same queue.

numpy only: this module must not import torch.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sparseprune.runtime import Executable, LimitExceeded


class QueueFull(Exception):
    """The model's queue holds max_queue requests already (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining: it answers what it accepted and takes nothing new (HTTP 503)."""


def flat_outputs(exe: Executable, result: Any) -> List[np.ndarray]:
    """run()'s outputs (an array, a tuple, a list or a dict) as a list in output_names' order."""
    if isinstance(result, dict):
        return [result[n] for n in exe.output_names]
    if isinstance(result, (tuple, list)):
        return list(result)
    return [result]


def run_rows(exe: Executable, requests: Sequence[Sequence[np.ndarray]]) -> List[List[np.ndarray]]:
    """Run requests of the same dims as one call; each gets its own rows of every output. A
    single request runs on its own arrays (no copy): bit for bit what Executable.run gives."""
    if len(requests) == 1:
        return [flat_outputs(exe, exe.run(*requests[0]))]
    inputs = [np.concatenate(parts) for parts in zip(*requests)]
    outputs = flat_outputs(exe, exe.run(*inputs))
    ends = np.cumsum([r[0].shape[0] for r in requests])
    return [[y[end - r[0].shape[0]:end] for y in outputs] for r, end in zip(requests, ends)]


def run_each(exe: Executable, requests: Sequence[Sequence[np.ndarray]]) -> List[Any]:
    """run_rows, and when the batch fails, each request alone so that only the request at fault
    gets the error: per request its outputs or its exception."""
    try:
        return run_rows(exe, requests)
    except Exception:
        if len(requests) == 1:
            raise
    results: List[Any] = []
    for r in requests:
        try:
            results.append(run_rows(exe, [r])[0])
        except Exception as exc:  # given to that request's caller
            results.append(exc)
    return results


@dataclass
class _Pending:
    inputs: List[np.ndarray]
    rows: int
    future: "asyncio.Future[List[np.ndarray]]"
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What one batch was: for the metrics."""

    requests: int
    rows: int
    seconds: float


class Batcher:
    """The queue and batch loop of one model (start() inside the event loop, then submit()).

    max_batch: rows per call; max_wait_ms: how long the oldest request waits for company;
    max_queue: requests waiting at most (beyond: QueueFull); batching False: one request per call.
    on_batch(stats) and on_queue(depth) report to the metrics."""

    def __init__(self, exe: Executable, *, max_batch: int, max_wait_ms: float, max_queue: int, batching: bool = True,
                 on_batch: Callable[[BatchStats], None] = lambda s: None,
                 on_queue: Callable[[int], None] = lambda n: None):
        self.exe = exe
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue, self.batching = max_queue, batching
        self._on_batch, self._on_queue = on_batch, on_queue
        self._groups: Dict[Tuple[int, ...], Deque[_Pending]] = {}  # dims -> requests, oldest first
        self._queued = 0
        self._arriving = 0  # requests of this model being read and checked (see arriving())
        self._closing = False
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        # The thread running the executable (the event loop never blocks on a batch).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparseprune-batch")

    @property
    def queued(self) -> int:
        return self._queued

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request being read and checked for this model: a batch being formed waits for
        it (up to max_wait_ms); the batcher looks again when it leaves, queued or refused."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._wakeup is not None:
                self._wakeup.set()

    def start(self) -> None:
        """Start the batch loop in the running event loop (the app's lifespan calls it; the first
        request does when the app is mounted where no lifespan runs)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, inputs: List[np.ndarray], dims: Tuple[int, ...]) -> List[np.ndarray]:
        """This request's outputs (output_names' order); raises QueueFull, ShuttingDown, or the
        executable's error for this request."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        self.start()
        if self._queued >= self.max_queue:
            raise QueueFull(f"the queue holds {self._queued} requests, the server's --max-queue")
        pending = _Pending(inputs, inputs[0].shape[0], asyncio.get_running_loop().create_future())
        self._groups.setdefault(dims, collections.deque()).append(pending)
        self._queued += 1
        self._on_queue(self._queued)
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Take no new request, answer every queued one, then stop."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._pool.shutdown(wait=True)

    async def _loop(self) -> None:
        while True:
            if not self._groups:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            dims, group = min(self._groups.items(), key=lambda item: item[1][0].arrived)
            await self._fill(group)
            batch = self._take(dims, group)
            try:
                await self._run(batch)
            except Exception as exc:  # a bug of ours: fail this batch's callers, never hang them or the loop
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _fill(self, group: Deque[_Pending]) -> None:
        """Wait for the oldest request's company while some is arriving: until max_batch rows or
        its max_wait is up."""
        deadline = group[0].arrived + self.max_wait
        while (self.batching and self._arriving and not self._closing
               and sum(p.rows for p in group) < self.max_batch):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self, dims: Tuple[int, ...], group: Deque[_Pending]) -> List[_Pending]:
        """Whole requests from the front of the group, up to max_batch rows and the limits."""
        batch: List[_Pending] = []
        rows = 0
        limits = self.exe.limits
        cost = self.exe.cost(**dict(zip(self.exe.dims, dims))) if limits is not None else None
        while group:
            p = group[0]
            if batch and (not self.batching or rows + p.rows > self.max_batch or not _fits(limits, cost, rows + p.rows)):
                break
            group.popleft()
            self._queued -= 1
            if not p.future.done():  # its caller went away (cancelled): skip it
                batch.append(p)
                rows += p.rows
        if not group:
            del self._groups[dims]
        self._on_queue(self._queued)
        return batch

    async def _run(self, batch: List[_Pending]) -> None:
        if not batch:  # every request taken had been cancelled
            return
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._pool, run_each, self.exe, [p.inputs for p in batch])
        except Exception as exc:  # one request alone failed
            results = [exc]
        self._on_batch(BatchStats(len(batch), sum(p.rows for p in batch), time.perf_counter() - t0))
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)


def _fits(limits, cost, rows: int) -> bool:
    if limits is None:
        return True
    try:
        limits.check(cost, rows)
    except LimitExceeded:
        return False
    return True
