"""The server's Prometheus metrics (GET /metrics), in a registry of its own per app, so that
several apps in one process (tests, an app embedding two servers) keep separate counts.

numpy only: this module must not import torch.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 0.5 ms (a small model at batch 1) to 10 s (a large batch of a big model).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batch sizes in rows, powers of two up to the largest --max-batch people use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparseprune_requests", "Infer requests answered, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.errors = Counter("sparseprune_request_errors", "Infer requests answered with an error (status >= 400)",
                              ["model", "status"], registry=r)
        self.latency = Histogram("sparseprune_request_seconds",
                                 "Infer request latency in the server, from its handler starting to its response",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("sparseprune_batch_rows", "Rows per executable call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("sparseprune_batch_requests", "Requests per executable call", ["model"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.run_seconds = Histogram("sparseprune_run_seconds", "Executable.run time per batch", ["model"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sparseprune_queue_depth", "Requests waiting for a batch", ["model"], registry=r)

    def answered(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        if status >= 400:
            self.errors.labels(model, str(status)).inc()
        self.latency.labels(model).observe(seconds)

    def batch(self, model: str, stats) -> None:
        self.batch_rows.labels(model).observe(stats.rows)
        self.batch_requests.labels(model).observe(stats.requests)
        self.run_seconds.labels(model).observe(stats.seconds)

    def queue(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def text(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]
