"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Queue depth, running rows, batch sizes, latency, generated tokens and tokens/s (`/metrics`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "kosmos2_queue_depth", "Requests waiting for a place in the batch", registry=r
        )
        self.running = Gauge("kosmos2_running_requests", "Requests in the running batch", registry=r)
        self.batch_size = Histogram(
            "kosmos2_batch_size",
            "Rows in the batch at each decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.tokens = Counter("kosmos2_generated_tokens", "Tokens generated, all requests", registry=r)
        self.finished = Counter(
            "kosmos2_generations",
            "Generations ended, by reason (stop, length, cancelled)",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "kosmos2_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "kosmos2_rejected", "Requests refused with 503: the queue was full", registry=r
        )
        self.latency = Histogram(
            "kosmos2_request_latency_seconds",
            "Time from arrival to the last byte of a generation request",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "kosmos2_tokens_per_second", "Generated tokens per second over the last 10 s", registry=r
        )
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def count_tokens(self, n: int) -> None:
        self.tokens.inc(n)
        self._recent.append((time.monotonic(), n))

    def render(self) -> bytes:
        """The Prometheus text format; tokens/s is the count of the last 10 s over 10 s."""
        cutoff = time.monotonic() - 10.0
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        self.tokens_per_second.set(sum(n for _, n in list(self._recent)) / 10.0)
        return generate_latest(self.registry)
