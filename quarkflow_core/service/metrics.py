"""The API's Prometheus metrics (one registry per service, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qf_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "qf_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "qf_batch_size",
            "Images per model batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.model_version = Gauge("qf_model_version", "Served model version", registry=r)
        self.outbox_depth = Gauge("qf_outbox_depth", "Records waiting in the outbox", registry=r)
        self.dead_letters = Gauge(
            "qf_outbox_dead_letters",
            "Records the database kept refusing (see `quarkflow outbox list`)",
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "qf_outbox_oldest_seconds", "Age of the oldest record not yet written", registry=r
        )
        self.outbox_outage = Gauge(
            "qf_outbox_outage",
            "1 while the flusher cannot reach the database or storage",
            registry=r,
        )
        self.predictions = Counter("qf_predictions", "Images predicted", registry=r)
        self.reviews = Counter("qf_review_enqueued", "Predictions sent to review", registry=r)
        self.swaps = Counter("qf_model_swaps", "Model hot swaps", registry=r)
        self.rejected = Counter("qf_rejected_uploads", "Rejected uploads", ["error"], registry=r)
