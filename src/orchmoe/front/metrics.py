"""The front's Prometheus metrics, served at ``/metrics`` after vLLM's own: requests per endpoint and route,
refusals per reason, and routing time (tokenizing and the Task Router)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class FrontMetrics:
    """A registry of the front's own (not the process-global one, so that several fronts in a process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "orchmoe_front_requests",
            "Requests answered, by endpoint and route (the adapter, or none for a pass-through)",
            ["endpoint", "route"],
            registry=self.registry,
        )
        self.refusals = Counter("orchmoe_front_refusals", "Requests refused, by reason", ["reason"],
                                registry=self.registry)  # fmt: skip
        self.routing = Histogram(
            "orchmoe_front_routing_seconds",
            "Tokenizing and routing one prompt",
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0),
            registry=self.registry,
        )

    def render(self, upstream: bytes = b"") -> bytes:
        """vLLM's metrics (``upstream``, Prometheus text), then the front's."""
        ours = generate_latest(self.registry)
        return upstream + (b"" if not upstream or upstream.endswith(b"\n") else b"\n") + ours
