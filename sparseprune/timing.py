"""Timing helpers shared by conversion-time kernel choice and the benchmarks.

Candidates are timed round-robin after a warm-up, so that a noisy neighbour slows all of them
alike, and summarised by the median and the 90th percentile. Each turn of a candidate is one
untimed call followed by a few timed ones: a model serving requests runs back to back with its
own weights in cache, and timing single calls right after another candidate's would measure
its cache misses instead (a dense BERT layer evicts the sparse one's weights from L2).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping

import numpy as np


@dataclass(frozen=True)
class Timing:
    median_s: float
    p90_s: float
    runs: int
    min_s: float = 0.0  # the best run: what the code can do when nothing else interferes

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def p90_ms(self) -> float:
        return self.p90_s * 1e3


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    calls_per_turn: int = 3,
) -> Dict[str, Timing]:
    """Median and p90 wall time of each zero-argument callable, measured round-robin.

    Runs at least `repeats` rounds, and more (up to 10x) until `min_time_s` has passed, so fast
    kernels get enough samples for a stable median. In each round every candidate gets one
    untimed call, then `calls_per_turn` timed calls.
    """
    if calls_per_turn < 1:
        raise ValueError(f"calls_per_turn must be >= 1, got {calls_per_turn}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for _ in range(max(warmup, 0)):
        for name in names:
            candidates[name]()
    samples: Dict[str, list] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time_s and rounds < 10 * repeats):
        for name in names:
            fn = candidates[name]
            fn()  # back in cache after the other candidates ran
            for _ in range(calls_per_turn):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {
        name: Timing(float(np.median(s)), float(np.percentile(s, 90)), len(s), float(np.min(s)))
        for name, s in samples.items()
    }
