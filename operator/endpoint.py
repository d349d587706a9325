"""One OptimizedEndpoint as a reconcile sees it, and what every step of it shares.

The operator's settings (`OperatorConfig`: the platform team's, never a spec's), the handlers'
shared `Runtime`, the custom resource read at the start of a reconcile with the status being
built (`Endpoint`, written back with `commit`), and the ways a reconcile ends early: `Outcome`
(phase Failed or Infeasible, the cause in status) and `RetryLater` (reported, retried with
backoff). Failures of the periodic timer are written here too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pydantic

from trilemma.operator import apply as applying
from trilemma.operator import children, health, naming, pool, status
from trilemma.operator.kube import Kube, KubeError, Ref
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import (
    Optimizer,
)
from trilemma.operator.resources import (
    ConditionType,
    EndpointPhase,
    OptimizedEndpointSpec,
    OptimizedEndpointStatus,
    RolloutStatus,
    status_field_names,
)
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import canonical_json

Obj = dict[str, Any]
# (body, type, reason, message): posts a Kubernetes Event about the endpoint.
EventSink = Callable[[Obj, str, str, str], None]


@dataclass(frozen=True)
class OperatorConfig:
    """The platform team's settings (the chart's values): what no endpoint spec can change."""

    prometheus_url: str | None = None
    max_concurrent_optimizations: int = 2
    cache_dir: str = "/tmp/trilemma"
    # Further Prometheus base URLs an endpoint's spec.prometheus.url may name.
    prometheus_urls: tuple[str, ...] = ()
    # Secret names (in an endpoint's own namespace) that spec.prometheus.authSecret may name.
    prometheus_secret_names: tuple[str, ...] = ()

    def allows_prometheus_url(self, url: str) -> bool:
        # Exact match (bar a trailing slash): a prefix test would let "http://prom@evil" or
        # "http://prom.evil" through.
        allowed = {u.rstrip("/") for u in (self.prometheus_url, *self.prometheus_urls) if u}
        return url.rstrip("/") in allowed


@dataclass
class Runtime:
    """Everything the handlers share: clients, the plan pool, the GPU ledger, metrics."""

    kube: Kube
    optimizer: Optimizer
    config: OperatorConfig
    metrics: OperatorMetrics
    events: EventSink
    ledger: pool.Ledger = field(default_factory=pool.Ledger)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, key: str) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())


class Outcome(Exception):
    """Ends a reconcile early in phase Failed or Infeasible: the cause goes to status.
    `retry`: the cause may go away without a spec change (a refusal by the API server, a
    conflicting object); the handler tries again with exponential backoff."""

    def __init__(self, phase: EndpointPhase, condition: ConditionType, reason: str,
                 message: str, *, retry: bool = False) -> None:
        self.phase = phase
        self.condition = condition
        self.reason = reason
        self.message = message
        self.retry = retry
        super().__init__(f"{reason}: {message}")


class RetryLater(Exception):
    """The reconcile reported a failure in status that may clear by itself: try again later
    (the handler backs off exponentially). Carries the reported reason and message."""


# A Kubernetes Status reason ("Forbidden", "Invalid") as a condition reason (CamelCase, no
# spaces); the HTTP reason phrase when the answer was no Status.
def _api_reason(err: KubeError) -> str:
    words = re.findall(r"[A-Za-z0-9]+", err.api_reason or err.reason or f"HTTP{err.status}")
    return "Api" + "".join(w[:1].upper() + w[1:] for w in words)[:60]


def api_refusal(err: KubeError) -> Outcome:
    """A permanent API error (403 RBAC or quota, 400, 422) as a Failed outcome that retries
    with backoff: the operator's rights, a quota or an admission policy may change."""
    return Outcome(EndpointPhase.FAILED, ConditionType.DEPLOYED, _api_reason(err),
                   f"the API server refused a request: {err}", retry=True)


def failed(reason: str, message: str, condition: ConditionType = ConditionType.VALIDATED
           ) -> Outcome:
    return Outcome(EndpointPhase.FAILED, condition, reason, message)


def input_message(err: InputError) -> str:
    return str(err) if getattr(err, "problems", None) else f"{err.field}={err.value!r}: {err.why}"


@dataclass
class Endpoint:
    """The custom resource as read at the start of a reconcile, and the status being built."""

    body: Obj
    status: Obj  # desired status (operator-owned keys), edited in place
    written: Obj  # what the API server holds, to patch only differences
    # Children read during this reconcile, by "Kind/name" (None: absent): not read twice.
    seen: dict[str, Obj | None] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Obj) -> Endpoint:
        live = {k: v for k, v in (body.get("status") or {}).items()
                if k in status_field_names()}
        return cls(body=body, status=json.loads(json.dumps(live)),
                   written=json.loads(json.dumps(live)))

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"].get("namespace") or "default")

    @property
    def key(self) -> str:
        return pool.key(self.namespace, self.name)

    @property
    def generation(self) -> int | None:
        gen = self.body["metadata"].get("generation")
        return int(gen) if gen is not None else None

    @property
    def ref(self) -> Ref:
        return Ref(naming.API_VERSION, "OptimizedEndpoint", self.namespace, self.name)

    @property
    def owner(self) -> children.Owner:
        return children.Owner(self.name, self.namespace,
                              str(self.body["metadata"].get("uid") or ""))

    def put(self, **fields: Any) -> None:
        """Write status fields through the status models: each value (a model, a list of
        them, a plain value) is validated as the OptimizedEndpointStatus field its snake_case
        name names, and kept in its wire form; None removes the field. A value the models
        refuse is a bug, raised here at its writer rather than at commit."""
        for name, value in fields.items():
            key, adapter = _status_field(name)
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = adapter.dump_python(
                    adapter.validate_python(value), by_alias=True, mode="json",
                    exclude_none=True)

    def rollout(self) -> RolloutStatus | None:
        """status.rollout as its model (as being built)."""
        found = self.status.get("rollout")
        return RolloutStatus.model_validate(found) if found else None

    def update_rollout(self, **changes: Any) -> None:
        """Change fields (snake_case) of the rollout in progress; there must be one."""
        current = self.rollout()
        assert current is not None, "no rollout to update"
        self.put(rollout=RolloutStatus.model_validate(
            {**current.model_dump(), **changes}))

    def gpus_of(self, config_hash: str | None) -> dict[str, int]:
        """The GPUs the configuration `config_hash` holds as last written: the source of a
        rollout in progress (rollout.fromGpus), else the serving one's (allocatedGpus)."""
        rollout = self.written.get("rollout") or {}
        if rollout.get("state") == "Progressing" and rollout.get("fromHash") == config_hash:
            return dict(rollout.get("fromGpus") or {})
        if config_hash is not None and self.written.get("servingHash") == config_hash:
            return dict(self.written.get("allocatedGpus") or {})
        return {}

    def condition(self, kind: ConditionType, ok: bool | None, reason: str,
                  message: str = "") -> None:
        self.put(conditions=status.set_condition(
            self.status.get("conditions", []), kind, ok, reason, message,
            generation=self.generation, now=status.now_rfc3339()))

    def phase(self, phase: EndpointPhase, message: str = "") -> None:
        self.put(phase=phase, message=message)

    @property
    def pool_name(self) -> str:
        return _pool_name(self.body)

    async def commit(self, kube: Kube) -> bool:
        """Write what changed in status; False when nothing did (no request is sent)."""
        # kstatus's Reconciling and Stalled follow from the rest of status: derived at the one
        # place status is written, so that no write can leave them disagreeing with the phase.
        self.put(conditions=health.with_kstatus(self.status, generation=self.generation,
                                                now=status.now_rfc3339()))
        patch = status.patch_for(self.written, self.status, status_field_names())
        if not patch:
            return False
        # The one place status is written: it must be what the status models (and so the CRD,
        # generated from them) declare, or the API server would prune the difference silently
        # (as it once did status.rollout.fromGpus). A mismatch is a bug: fail loudly here.
        OptimizedEndpointStatus.model_validate(self.status)
        await kube.patch(self.ref, {"status": patch}, subresource="status")
        self.written = json.loads(json.dumps(self.status))
        return True


@functools.cache
def _status_field(name: str) -> tuple[str, pydantic.TypeAdapter[Any]]:
    """(camelCase key, validator of the field's type) of a status field."""
    info = OptimizedEndpointStatus.model_fields[name]
    # Every status field is annotated; pydantic's stubs type the annotation as optional.
    annotation: Any = info.annotation
    return info.alias or name, pydantic.TypeAdapter(annotation)


async def commit(rt: Runtime, ep: Endpoint) -> None:
    """Write the status, and mirror what the endpoint now holds into the GPU ledger."""
    await ep.commit(rt.kube)
    rt.ledger.record(ep.pool_name, ep.key, ep.written.get("allocatedGpus") or {})


def live_spec(body: Obj) -> OptimizedEndpointSpec | None:
    """The spec of an endpoint a periodic check may act on: None while it is being deleted
    or when its spec does not validate (the reconciler reports that)."""
    if body.get("metadata", {}).get("deletionTimestamp"):
        return None
    try:
        return OptimizedEndpointSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        return None


def spec_digest(body: Obj) -> str:
    """The spec's digest, less replicas.count: the scale subresource's field, which an HPA
    writes every few seconds. It changes how many replicas run, never the plan, so it must not
    drop the closed loop's tuned workload, which is tied to this digest (the reconciler
    compares the count itself: scale.count_changed)."""
    spec = dict(body.get("spec") or {})
    if isinstance(spec.get("replicas"), dict):
        spec["replicas"] = {k: v for k, v in spec["replicas"].items() if k != "count"}
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


def _pool_name(body: Obj) -> str:
    return str(((body.get("spec") or {}).get("hardwarePoolRef") or {}).get("name", ""))


async def record_timer_failure(rt: Runtime, namespace: str, name: str, what: str,
                               err: Exception) -> None:
    """A periodic step (rollout advance, traffic check) raised: say so in status, on the
    condition that step feeds (Ready for the rollout, MetricsAvailable for the traffic)."""
    ref = Ref(naming.API_VERSION, "OptimizedEndpoint", namespace, name)
    async with rt.lock(pool.key(namespace, name)):
        body = await rt.kube.get(ref)
        if body is None:
            return
        ep = Endpoint.of(body)
        kind = (ConditionType.METRICS_AVAILABLE if what == "retune" else ConditionType.READY)
        reason = "RetuneCheckFailed" if what == "retune" else "ResyncFailed"
        # The exception's type and a bounded message; never more (status is tenant-readable,
        # and the operator's own failures are for its log).
        ep.condition(kind, False if what == "retune" else None, reason,
                     f"{what} failed ({type(err).__name__}): {str(err)[:300]}; retried at the "
                     "next resync")
        await ep.commit(rt.kube)


def is_transient(err: Exception) -> bool:
    """API errors worth retrying: the server or the network, not our request."""
    return isinstance(err, KubeError) and (err.status >= 500 or err.status in (0, 409, 429))


def owns(ep: Endpoint, obj: Obj) -> bool:
    """Whether `obj` is this endpoint's child (apply's ownership test)."""
    return applying.owner_problem(obj, ep.owner.reference()) is None


T = TypeVar("T")


async def together(*calls: Awaitable[T]) -> list[T]:
    """Runs API calls side by side. All of them finish before the first failure is raised,
    so none is left running once the endpoint's lock is released."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)
