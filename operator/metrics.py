"""The operator's own Prometheus metrics (prometheus-client), on their own registry.

A registry per operator instance rather than the global one: tests and the benchmark run
several operators in one process, and a metric registered twice in one registry raises.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Searches take seconds to a minute; finer buckets below a second catch reused plans.
OPTIMIZATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class OperatorMetrics:
    """Reconciles, optimization durations, errors by reason, endpoints by phase, cost."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._reconciles = Counter(
            "trilemma_reconciles", "Endpoint reconciles, by result.", ["result"],
            registry=self.registry)
        self._optimization = Histogram(
            "trilemma_optimization_duration_seconds", "Wall time of one search.",
            buckets=OPTIMIZATION_BUCKETS, registry=self.registry)
        self._optimization_failures = Counter(
            "trilemma_optimization_failures", "Searches that found no plan.",
            registry=self.registry)
        self._errors = Counter("trilemma_errors", "Endpoint errors, by reason.", ["reason"],
                               registry=self.registry)
        self._phases = Gauge("trilemma_endpoints", "Endpoints, by phase.", ["phase"],
                             registry=self.registry)
        self._cost = Gauge("trilemma_endpoint_predicted_cost_dollars_per_hour",
                           "Predicted cost of each endpoint's active plan.",
                           ["namespace", "name"], registry=self.registry)
        self._phase_of: dict[str, str] = {}

    def reconciled(self, result: str) -> None:
        self._reconciles.labels(result=result).inc()

    def optimized(self, seconds: float) -> None:
        self._optimization.observe(seconds)

    def optimization_failed(self) -> None:
        self._optimization_failures.inc()

    def error(self, reason: str) -> None:
        self._errors.labels(reason=reason).inc()

    def endpoint_phase(self, key: str, phase: str | None) -> None:
        if phase is None:
            return
        self._phase_of[key] = phase
        self._recount()

    def endpoint_cost(self, key: str, dollars_per_hour: float | None) -> None:
        namespace, name = key.split("/", 1)
        if dollars_per_hour is None:
            self._remove_cost(namespace, name)
        else:
            self._cost.labels(namespace=namespace, name=name).set(dollars_per_hour)

    def forget(self, key: str) -> None:
        self._phase_of.pop(key, None)
        self._recount()
        self._remove_cost(*key.split("/", 1))

    def _remove_cost(self, namespace: str, name: str) -> None:
        with contextlib.suppress(KeyError):  # never set
            self._cost.remove(namespace, name)

    def _recount(self) -> None:
        counts: dict[str, int] = {}
        for phase in self._phase_of.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in ("Pending", "Optimizing", "Deploying", "Ready", "Infeasible", "Failed"):
            self._phases.labels(phase=phase).set(counts.get(phase, 0))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
