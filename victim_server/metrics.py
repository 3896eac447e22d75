"""Prometheus metrics of one app, in a registry of its own (never the global one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Requests, images, errors by status and code, batch sizes, latencies, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "stealsim_requests", "Inference requests answered, by model and HTTP status.",
            ["model", "status"], registry=self.registry,
        )
        self.images = Counter(
            "stealsim_images_served", "Images served (charged) by model.", ["model"],
            registry=self.registry,
        )
        self.errors = Counter(
            "stealsim_errors", "Error responses by HTTP status and error code.",
            ["status", "code"], registry=self.registry,
        )
        self.batch_size = Histogram(
            "stealsim_batch_images", "Images per forward pass.", ["model"],
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "stealsim_forward_seconds", "Duration of one forward pass.", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "stealsim_request_seconds", "Inference request latency (decode to encode).", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "stealsim_queue_images", "Images waiting for a forward pass.", ["model"],
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "stealsim_backend_up", "1 when the state store and batching backend (Redis) answered the last scrape.",
            registry=self.registry,
        )
        self.stream_entries = Gauge(
            "stealsim_stream_entries", "Requests in the model's Redis stream (not yet answered).",
            ["model"], registry=self.registry,
        )
        self.stream_pending = Gauge(
            "stealsim_stream_pending", "Requests read by a worker and not yet acknowledged.",
            ["model"], registry=self.registry,
        )
        self.workers_live = Gauge(
            "stealsim_workers_live", "Workers of the model seen within worker_seen_s.",
            ["model"], registry=self.registry,
        )
        self.flagged = Counter(
            "stealsim_keys_flagged", "Keys flagged by a detector.", ["detector"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, images: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(images)
        self.forward_seconds.labels(model).observe(seconds)

    def track_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model).set_function(lambda: float(depth()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
