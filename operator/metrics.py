"""The operator's own Prometheus metrics (prometheus-client), on their own registry.

A registry per operator instance rather than the global one: tests and the benchmark run
several operators in one process, and a metric registered twice in one registry raises.

Per-endpoint gauges (labels namespace, name) carry what the operator predicts for the active
plan, so a dashboard can draw it beside what the engines measure
(charts/trilemma/dashboards/trilemma-endpoint.json); they are removed with the endpoint, so
their cardinality is the number of endpoints. The configuration info gauge holds one series per
endpoint whose `hash` label changes at each new configuration: the dashboard's annotations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Searches take seconds to a minute; finer buckets below a second catch reused plans.
OPTIMIZATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


@dataclass(frozen=True)
class EndpointFigures:
    """What the per-endpoint gauges show, read from the endpoint's status (None: unset)."""

    cost_per_hour: float | None = None
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    capacity_rps: float | None = None
    replicas: int | None = None
    replica_capacity_rps: float | None = None
    config_hash: str | None = None
    config_summary: str = ""

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> EndpointFigures:
        """From the status's wire form: costPerHour, predictions, activeConfiguration."""
        predictions = status.get("predictions") or {}
        active = status.get("activeConfiguration") or {}
        replicas = active.get("replicas")
        config_hash = active.get("hash")
        return cls(cost_per_hour=_number(status.get("costPerHour")),
                   ttft_p90_s=_ms_to_s(predictions.get("ttftP90Ms")),
                   tpot_p90_s=_ms_to_s(predictions.get("tpotP90Ms")),
                   capacity_rps=_number(predictions.get("capacityRps")),
                   replicas=replicas if isinstance(replicas, int) else None,
                   replica_capacity_rps=_number(
                       (status.get("scaling") or {}).get("replicaCapacityRps")),
                   config_hash=config_hash if isinstance(config_hash, str) else None,
                   config_summary=str(active.get("summary") or ""))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, float | int) and not isinstance(value, bool) else None


def _ms_to_s(value: object) -> float | None:
    ms = _number(value)
    return None if ms is None else ms / 1000.0


class OperatorMetrics:
    """Reconciles, optimization durations, errors by reason, endpoints by phase, and per
    endpoint its predicted cost, latencies and capacity, replicas and configuration."""

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
        self._ttft = Gauge("trilemma_endpoint_predicted_ttft_p90_seconds",
                           "Predicted p90 time to first token of the active plan.",
                           ["namespace", "name"], registry=self.registry)
        self._tpot = Gauge("trilemma_endpoint_predicted_tpot_p90_seconds",
                           "Predicted p90 time per output token of the active plan.",
                           ["namespace", "name"], registry=self.registry)
        self._capacity = Gauge("trilemma_endpoint_predicted_capacity_requests_per_second",
                               "Requests/s the active plan sustains within the SLO.",
                               ["namespace", "name"], registry=self.registry)
        self._replicas = Gauge("trilemma_endpoint_replicas",
                               "Replicas of the active configuration.",
                               ["namespace", "name"], registry=self.registry)
        # What a KEDA or HPA target divides the observed rate by (keda.py's sample does).
        self._replica_capacity = Gauge(
            "trilemma_endpoint_replica_capacity_requests_per_second",
            "Requests/s one replica of the active configuration sustains within the SLO.",
            ["namespace", "name"], registry=self.registry)
        self._config = Gauge("trilemma_endpoint_configuration_info",
                             "1 for the endpoint's active configuration (hash, summary).",
                             ["namespace", "name", "hash", "summary"], registry=self.registry)
        self._per_endpoint = (self._cost, self._ttft, self._tpot, self._capacity,
                              self._replicas, self._replica_capacity)
        self._phase_of: dict[str, str] = {}
        self._config_of: dict[str, tuple[str, str]] = {}  # key -> its info series' labels

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

    def endpoint_status(self, key: str, status: Mapping[str, Any]) -> None:
        """The per-endpoint gauges from the endpoint's status; an unset figure removes its
        series (no plan yet, or it failed) rather than leaving a stale value."""
        self.endpoint_figures(key, EndpointFigures.from_status(status))

    def endpoint_figures(self, key: str, figures: EndpointFigures) -> None:
        namespace, name = key.split("/", 1)
        values = (figures.cost_per_hour, figures.ttft_p90_s, figures.tpot_p90_s,
                  figures.capacity_rps, figures.replicas, figures.replica_capacity_rps)
        for gauge, value in zip(self._per_endpoint, values, strict=True):
            if value is None:
                _remove(gauge, namespace, name)
            else:
                gauge.labels(namespace=namespace, name=name).set(value)
        config = None if figures.config_hash is None else (figures.config_hash,
                                                           figures.config_summary)
        if config != self._config_of.get(key):
            # One series per endpoint: the old hash goes as the new one comes, which is
            # what the dashboard's annotation query detects.
            self._forget_config(key)
            if config is not None:
                self._config.labels(namespace, name, *config).set(1)
                self._config_of[key] = config

    def forget(self, key: str) -> None:
        self._phase_of.pop(key, None)
        self._recount()
        namespace, name = key.split("/", 1)
        for gauge in self._per_endpoint:
            _remove(gauge, namespace, name)
        self._forget_config(key)

    def _forget_config(self, key: str) -> None:
        old = self._config_of.pop(key, None)
        if old is not None:
            _remove(self._config, *key.split("/", 1), *old)

    def _recount(self) -> None:
        counts: dict[str, int] = {}
        for phase in self._phase_of.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in ("Pending", "Optimizing", "Deploying", "Ready", "Infeasible", "Failed"):
            self._phases.labels(phase=phase).set(counts.get(phase, 0))

    def serve(self, port: int, addr: str = "0.0.0.0") -> WSGIServer:
        """Serve /metrics from a thread; the server's shutdown() stops it."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
