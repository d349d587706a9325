"""The reconciler: one OptimizedEndpoint from spec to running children and written status.

validate -> resolve the pool (minus GPUs other endpoints hold) -> plan (in a worker thread,
or reuse the stored plan for the same input) -> render -> apply the children -> status.
Rollouts: a new configuration gets its own hashed Deployment; the Service moves to it only
when it is available, then the old one goes (`advance`). Bad input ends in phase Failed or
Infeasible with the cause in status and an Event, never in an exception loop.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pydantic

from trilemma.operator import apply as applying
from trilemma.operator import calibration, children, naming, pool, status
from trilemma.operator.kube import Kube, KubeError, Ref
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import (
    Models,
    Optimizer,
    model_choice,
    plan_request,
    request_digest,
)
from trilemma.operator.resources import (
    ConditionType,
    HardwarePoolSpec,
    OptimizedEndpointSpec,
    Phase,
    RolloutState,
    RolloutStatus,
    status_field_names,
    to_wire,
)
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import InfeasibleSLO, ServingConfig, canonical_json
from trilemma.optimizer.spec import HardwarePool, Objective, Workload
from trilemma.optimizer.spec.loading import spec_error_to_input_error

Obj = dict[str, Any]
T = TypeVar("T")
# (body, type, reason, message): posts a Kubernetes Event about the endpoint.
EventSink = Callable[[Obj, str, str, str], None]
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
PLAN_ATTEMPTS = 3  # re-plans when another endpoint took the GPUs while this one searched
OPTIMIZING_NOTICE_S = 0.5  # a search still running after this is reported in status


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

    def __init__(self, phase: Phase, condition: ConditionType, reason: str,
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
    return Outcome(Phase.FAILED, ConditionType.DEPLOYED, _api_reason(err),
                   f"the API server refused a request: {err}", retry=True)


def _failed(reason: str, message: str, condition: ConditionType = ConditionType.VALIDATED
            ) -> Outcome:
    return Outcome(Phase.FAILED, condition, reason, message)


def _input_message(err: InputError) -> str:
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

    def condition(self, kind: ConditionType, ok: bool | None, reason: str,
                  message: str = "") -> None:
        self.status["conditions"] = status.set_condition(
            self.status.get("conditions", []), kind, ok, reason, message,
            generation=self.generation, now=status.now_rfc3339())

    def phase(self, phase: Phase, message: str = "") -> None:
        self.status["phase"] = phase.value
        self.status["message"] = message

    @property
    def pool_name(self) -> str:
        return _pool_name(self.body)

    async def commit(self, kube: Kube) -> bool:
        """Write what changed in status; False when nothing did (no request is sent)."""
        patch = status.patch_for(self.written, self.status, status_field_names())
        if not patch:
            return False
        await kube.patch(self.ref, {"status": patch}, subresource="status")
        self.written = json.loads(json.dumps(self.status))
        return True


async def commit(rt: Runtime, ep: Endpoint) -> None:
    """Write the status, and mirror what the endpoint now holds into the GPU ledger."""
    await ep.commit(rt.kube)
    rt.ledger.record(ep.pool_name, ep.key, ep.written.get("allocatedGpus") or {})


# ---- reconcile -----------------------------------------------------------------------------


def spec_digest(body: Obj) -> str:
    return hashlib.sha256(canonical_json(body.get("spec") or {}).encode()).hexdigest()[:16]


async def reconcile(rt: Runtime, body: Obj, *, force: bool = True) -> None:
    """Bring one endpoint to its spec. Raises only for transient API errors (Kopf retries).

    `force=False` (create and update events) returns at once when the status already
    describes this exact spec: an event replayed after the work is done changes nothing.
    """
    ep = Endpoint.of(body)
    async with rt.lock(ep.key):
        await reconcile_locked(rt, ep.ref, force=force)


async def reconcile_locked(rt: Runtime, ref: Ref, *, force: bool = True) -> None:
    """`reconcile`, for a caller that holds the endpoint's lock already."""
    # The event's body may predate this operator's own status writes (made by another
    # handler while this one waited for the lock): work from the object as it is now.
    fresh = await rt.kube.get(ref)
    if fresh is None or fresh.get("metadata", {}).get("deletionTimestamp"):
        return
    ep = Endpoint.of(fresh)
    digest = spec_digest(fresh)
    if not force and ep.written.get("specDigest") == digest:
        return
    ep.status["specDigest"] = digest
    try:
        try:
            await _reconcile(rt, ep)
        except KubeError as err:
            if is_transient(err):
                raise
            raise api_refusal(err) from None
        except applying.NotOwned as err:
            raise Outcome(Phase.FAILED, ConditionType.DEPLOYED, "Conflict",
                          f"{err}: the operator neither changes nor adopts it; rename or "
                          "remove it, or rename the endpoint", retry=True) from None
        rt.metrics.reconciled("ok")
    except Outcome as out:
        ep.phase(out.phase, out.message)
        ep.condition(out.condition, False, out.reason, out.message)
        ep.status["observedGeneration"] = ep.generation
        if out.retry:
            # Not "done for this spec": the retry (or a replayed event) must do the work.
            ep.status.pop("specDigest", None)
        # Whatever was reserved for this attempt is free again: a refused endpoint holds
        # no GPUs that another one could use.
        rt.ledger.release(ep.pool_name, ep.key)
        await commit(rt, ep)
        rt.events(ep.body, "Warning", out.reason, out.message)
        rt.metrics.reconciled(out.phase.value.lower())
        rt.metrics.error(out.reason)
        if out.retry:
            raise RetryLater(f"{out.reason}: {out.message}") from None
    finally:
        rt.metrics.endpoint_phase(ep.key, ep.status.get("phase"))
        cost = ep.status.get("costPerHour")
        rt.metrics.endpoint_cost(ep.key, cost if isinstance(cost, float | int) else None)


def _pool_name(body: Obj) -> str:
    return str(((body.get("spec") or {}).get("hardwarePoolRef") or {}).get("name", ""))


def tuned(ep: Endpoint, spec: OptimizedEndpointSpec) -> OptimizedEndpointSpec:
    """The spec with the workload the closed loop re-planned for, while the spec it was
    observed under stands (a spec change drops it: the user's word is newer)."""
    found = ep.written.get("tunedWorkload") or {}
    if found.get("specDigest") != ep.status.get("specDigest") or not found.get("workload"):
        ep.status.pop("tunedWorkload", None)
        return spec
    try:
        workload = Workload.model_validate(found["workload"])
    except pydantic.ValidationError:
        ep.status.pop("tunedWorkload", None)  # unreadable: plan for the spec's own workload
        return spec
    return spec.model_copy(update={"workload": workload})


def calibrated(ep: Endpoint, spec: OptimizedEndpointSpec) -> OptimizedEndpointSpec:
    """The spec with its latency targets divided by the fitted correction factors: planning
    against them with the model's predictions is planning against corrected predictions."""
    # The status being built: the closed loop may have just updated the factors, and the
    # re-plan it judged must be the plan this reconcile finds.
    cal = calibration.Calibration.from_status(ep.status.get("calibration"))
    return spec.model_copy(update={"slo": calibration.apply(spec.slo, cal)})


async def store_plan(rt: Runtime, ep: Endpoint, plan: Obj, digest: str) -> None:
    """The plan ConfigMap for `plan`, made for the request named by `digest`."""
    await applying.apply(rt.kube, children.plan_config_map(
        ep.owner, plan, request_digest=digest, config_hash=plan["recommended"]["hash"]))


async def _reconcile(rt: Runtime, ep: Endpoint) -> None:
    spec = _validate_spec(ep)
    spec = calibrated(ep, tuned(ep, spec))
    full_pool = await read_pool(rt.kube, spec.hardware_pool_ref.name)
    _check_host_path(spec, full_pool)
    models = await resolve_models(rt, ep, spec)
    # Rules that only the whole document can check (bounds vs pool) first against the whole
    # pool: breaking them is the spec's fault, not the other endpoints'.
    try:
        plan_request(spec, models, full_pool)
    except InputError as err:
        raise _failed("InvalidSpec", _input_message(err)) from None
    ep.condition(ConditionType.VALIDATED, True, "Valid", "spec, pool and models check out")

    plan, digest, optimization = await _plan(rt, ep, spec, models, full_pool)
    choice = plan["recommended"]
    config = ServingConfig.from_dict(choice["config"])
    served = models.checkpoints.get(config.model, config.model)
    group = full_pool.group(config.worker.gpu)
    try:
        kids = children.build(config, spec, ep.owner, group, served_model=served)
    except InputError as err:
        raise _failed("RenderFailed", _input_message(err), ConditionType.OPTIMIZED) from None
    target = kids.config_hash
    engine_args = next(c["args"] for w in kids.workloads for c in _containers(w)
                       if c["name"] == "engine")
    plan_map = children.plan_config_map(ep.owner, plan, request_digest=digest,
                                        config_hash=target)
    key = f"ConfigMap/{plan_map['metadata']['name']}"
    # A new endpoint: no plan ConfigMap (read while planning) and no status about children.
    # Its children are then created side by side, none of them read first.
    new = key in ep.seen and ep.seen[key] is None and not any(
        ep.written.get(k) for k in ("servingHash", "rollout", "activeConfiguration"))

    async def write_plan() -> None:
        if key in ep.seen:
            await applying.apply(rt.kube, plan_map, current=ep.seen[key])
        else:
            await applying.apply(rt.kube, plan_map)

    ep.status["lastOptimization"] = optimization
    ep.status["predictions"] = status.predictions(choice, plan["request"]["design_rate_rps"])
    ep.status["paretoFront"] = status.pareto_front(plan)
    ep.status["observedGeneration"] = ep.generation
    ep.condition(ConditionType.OPTIMIZED, True,
                 "PlanReused" if optimization.get("reused") else "Planned",
                 f"{choice['summary']}: {optimization['candidates']} configurations "
                 f"searched")
    applied = spec.rollout.auto_apply
    ep.status["activeConfiguration"] = status.active_configuration(
        choice, config_hash=target, served_model=served, engine_args=list(engine_args),
        applied=applied)
    ep.status["costPerHour"] = round(float(choice["prediction"]["cost_per_hour"]), 4)
    gpus = status.config_gpus(choice["config"])

    if not applied:
        ep.phase(Phase.PENDING, f"recommend-only (autoApply false): {choice['summary']}; the "
                                f"plan is in ConfigMap {ep.name}-plan")
        ep.condition(ConditionType.DEPLOYED, False, "RecommendOnly",
                     "autoApply is false: nothing was deployed or changed")
        await write_plan()
        await _finish(rt, ep, spec)
        return

    rollout = ep.status.get("rollout") or {}
    if (rollout.get("state") == RolloutState.FAILED.value and rollout.get("toHash") == target
            and (ep.written.get("lastOptimization") or {}).get("requestDigest") == digest):
        # This exact plan already failed to become ready; retrying it would fail the same way.
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed", rollout.get("message", ""))
        await write_plan()
        await _finish(rt, ep, spec)
        return

    if new:
        try:
            await _together(write_plan(), _deploy(rt, ep, spec, kids, gpus, new=True))
        except (applying.NotOwned, KubeError) as err:
            if isinstance(err, KubeError) and is_transient(err):
                raise
            # Created side by side, so one child's conflict or refusal may come after the
            # others exist: a new endpoint that failed keeps nothing it made (no GPUs held).
            await _delete_owned(rt.kube, ep, [*kids.workloads, *kids.services])
            raise
    else:
        await write_plan()
        await _deploy(rt, ep, spec, kids, gpus)
    await _finish(rt, ep, spec)


async def _delete_owned(kube: Kube, ep: Endpoint, objects: list[Obj]) -> None:
    for obj in objects:
        live = await kube.get(Ref.of(obj))
        if live is not None and _owned_by(live, ep) and _managed(live):
            await kube.delete(Ref.of(obj))


async def _together(*calls: Awaitable[T]) -> list[T]:
    """Runs API calls side by side. All of them finish before the first failure is raised,
    so none is left running once the endpoint's lock is released."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


async def _finish(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec) -> None:
    await commit(rt, ep)
    # The status now records what this endpoint holds; the reservation has done its job.
    rt.ledger.release(spec.hardware_pool_ref.name, ep.key)


def _containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]
    if workload["kind"] == "Deployment":
        return list(spec["template"]["spec"]["containers"])
    return list(spec["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"])


def _validate_spec(ep: Endpoint) -> OptimizedEndpointSpec:
    if len(ep.name) > children.MAX_NAME or not _DNS_LABEL.match(ep.name):
        raise _failed("InvalidName", f"metadata.name={ep.name!r}: must be a DNS label of at "
                                     f"most {children.MAX_NAME} characters, because the "
                                     "children's names and labels append to it")
    raw = ep.body.get("spec") or {}
    try:
        return OptimizedEndpointSpec.model_validate(raw)
    except pydantic.ValidationError as err:
        raise _failed("InvalidSpec", str(spec_error_to_input_error(err, raw))) from None


def _check_host_path(spec: OptimizedEndpointSpec, pool_spec: HardwarePoolSpec) -> None:
    """A hostPath model cache mounts a node directory into a pod: only where the platform team
    allows it, in the (cluster-scoped, admin-owned) pool the endpoint draws from."""
    cache = spec.serving.model_cache
    if cache is None or cache.host_path is None or pool_spec.allows_host_path(cache.host_path):
        return
    allowed = ", ".join(pool_spec.model_cache_host_paths) or "none"
    raise _failed("HostPathNotAllowed",
                  f"serving.modelCache.hostPath={cache.host_path!r}: not under a directory "
                  f"HardwarePool {spec.hardware_pool_ref.name} allows in "
                  f"modelCacheHostPaths (allowed: {allowed}); use claimName (a PVC) instead")


async def read_pool(kube: Kube, name: str) -> HardwarePoolSpec:
    found = await kube.get(Ref(naming.API_VERSION, "HardwarePool", None, name))
    if found is None:
        pools = await kube.list(naming.API_VERSION, "HardwarePool")
        known = ", ".join(sorted(p["metadata"]["name"] for p in pools)) or "none"
        raise _failed("HardwarePoolNotFound",
                      f"hardwarePoolRef.name={name!r}: no HardwarePool of that name "
                      f"(existing: {known})")
    raw = found.get("spec") or {}
    try:
        return HardwarePoolSpec.model_validate(raw)
    except pydantic.ValidationError as err:
        problems = spec_error_to_input_error(err, raw)
        raise _failed("InvalidHardwarePool", f"HardwarePool {name}: {problems}") from None


async def resolve_models(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec) -> Models:
    choices, checkpoints = [], {}
    indexed = spec.model is not None
    for i, ref in enumerate(spec.candidates):
        text = None
        where = "model" if indexed else f"models.{i}"
        if ref.config_map is not None:
            cm = await rt.kube.get(Ref("v1", "ConfigMap", ep.namespace, ref.config_map.name))
            if cm is None:
                raise _failed("ModelConfigMapNotFound",
                              f"{where}.configMap.name={ref.config_map.name!r}: no such "
                              f"ConfigMap in namespace {ep.namespace}")
            text = (cm.get("data") or {}).get(ref.config_map.key)
            if text is None:
                raise _failed("ModelConfigMapNotFound",
                              f"{where}.configMap.key={ref.config_map.key!r}: ConfigMap "
                              f"{ref.config_map.name} has no such key")
        try:
            # Off the event loop: a config.json of up to 1 MiB is parsed and written.
            choice, served = await asyncio.to_thread(model_choice, ref, None if indexed else i,
                                                     text, Path(rt.config.cache_dir))
        except InputError as err:
            raise _failed("UnknownModel", _input_message(err)) from None
        choices.append(choice)
        checkpoints[choice.id] = served
    return Models(choices=choices, checkpoints=checkpoints)


async def availability(rt: Runtime, ep: Endpoint, pool_name: str,
                        full_pool: HardwarePool) -> pool.Availability:
    """Called under the ledger's lock."""
    if not rt.ledger.seeded:
        rt.ledger.seed(await rt.kube.list(naming.API_VERSION, "OptimizedEndpoint"))
    return pool.available(full_pool, rt.ledger.others(pool_name, ep.key))


async def _plan(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, models: Models,
                full_pool: HardwarePool) -> tuple[Obj, str, Obj]:
    """The plan for the endpoint, its request digest and the lastOptimization status.

    Plans against what the pool has left, then reserves the plan's GPUs; if another endpoint
    reserved them meanwhile, plans again (a few times) with what is left then.
    """
    pool_name = spec.hardware_pool_ref.name
    for _ in range(PLAN_ATTEMPTS):
        async with rt.ledger.lock:
            avail = await availability(rt, ep, pool_name, full_pool)
        if avail.pool is None:
            raise Outcome(Phase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolExhausted",
                          avail.exhausted_message())
        try:
            request = plan_request(spec, models, avail.pool)
        except InputError as err:
            raise Outcome(Phase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolExhausted",
                          f"{_input_message(err)} (other endpoints hold the rest of the pool: "
                          f"{', '.join(sorted(avail.held)) or 'none'})") from None
        digest = request_digest(request, models)
        plan, optimization = await _stored_plan(rt, ep, digest)
        if plan is None:
            plan, optimization = await _search(rt, ep, request, digest, avail)
        gpus = status.config_gpus(plan["recommended"]["config"])
        async with rt.ledger.lock:
            now = await availability(rt, ep, pool_name, full_pool)
            if pool.fits(gpus, now):
                rt.ledger.reserve(pool_name, ep.key, gpus)
                return plan, digest, optimization
    raise Outcome(Phase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolContention",
                  f"other endpoints took the planned GPUs {PLAN_ATTEMPTS} times in a row; "
                  "will retry on the next change")


async def _stored_plan(rt: Runtime, ep: Endpoint, digest: str) -> tuple[Obj | None, Obj]:
    cm = await rt.kube.get(Ref("v1", "ConfigMap", ep.namespace, f"{ep.name}-plan"))
    ep.seen[f"ConfigMap/{ep.name}-plan"] = cm
    if cm is None or not (_owned_by(cm, ep) and _managed(cm)):
        return None, {}  # not ours: never read (and applying the plan reports the conflict)
    notes = cm.get("metadata", {}).get("annotations") or {}
    if notes.get(naming.ANNOTATION_REQUEST_DIGEST) != digest:
        return None, {}
    try:
        plan = json.loads((cm.get("data") or {})["plan.json"])
    except (KeyError, ValueError):
        return None, {}
    previous = ep.written.get("lastOptimization") or {}
    if previous.get("requestDigest") == digest:
        return plan, previous
    return plan, {"time": status.now_rfc3339(), "durationSeconds": 0.0,
                  "candidates": int(plan.get("counts", {}).get("enumerated", 0)),
                  "requestDigest": digest, "reused": True}


async def _search(rt: Runtime, ep: Endpoint, request: Any, digest: str,
                  avail: pool.Availability) -> tuple[Obj, Obj]:
    search = asyncio.ensure_future(rt.optimizer.run(request))
    # Say "Optimizing" only when the search takes long enough to be seen doing so: a quick
    # one (a small space, a warm cache) goes straight to its result, one write instead of two.
    done, _ = await asyncio.wait({search}, timeout=OPTIMIZING_NOTICE_S)
    if not done:
        ep.phase(Phase.OPTIMIZING, "searching the configuration space")
        ep.condition(ConditionType.OPTIMIZED, None, "Optimizing", "search running")
        # Not the spec digest yet: it marks a finished reconcile.
        done_marker = ep.status.pop("specDigest", None)
        await ep.commit(rt.kube)
        if done_marker is not None:
            ep.status["specDigest"] = done_marker
    try:
        run = await search
    except InfeasibleSLO as err:
        rt.metrics.optimization_failed()
        others = ", ".join(sorted(avail.held))
        held = f" Other endpoints hold part of the pool: {others}." if others else ""
        nearest = await _nearest_with_more_gpus(rt, request) if err.binding == "pool" else ""
        raise Outcome(Phase.INFEASIBLE, ConditionType.OPTIMIZED,
                      "PoolTooSmall" if err.binding in ("pool", "budget") else "SLOUnreachable",
                      err.why + held + nearest) from None
    except InputError as err:
        rt.metrics.optimization_failed()
        raise _failed("OptimizationFailed", _input_message(err),
                      ConditionType.OPTIMIZED) from None
    rt.metrics.optimized(run.seconds)
    plan = run.plan
    rec = plan["recommended"]
    rt.events(ep.body, "Normal", "Planned",
              f"{rec['summary']}: ${rec['prediction']['cost_per_hour']:.2f}/h, TTFT p90 "
              f"{rec['prediction']['ttft_p90_ms']:.0f} ms, TPOT p90 "
              f"{rec['prediction']['tpot_p90_ms']:.1f} ms ({run.seconds:.1f} s search)")
    return plan, {"time": status.now_rfc3339(), "durationSeconds": round(run.seconds, 3),
                  "candidates": int(plan.get("counts", {}).get("enumerated", 0)),
                  "requestDigest": digest, "reused": False}


# How much larger than the available pool the "nearest feasible" search may look.
NEAREST_POOL_FACTOR = 8


async def _nearest_with_more_gpus(rt: Runtime, request: Any) -> str:
    """For a pool too small: the cheapest configuration that would meet the SLO with more
    GPUs of the same types, and how many it needs (one more search), as a sentence."""
    bigger = request.hardware.model_copy(update={"gpus": [
        g.model_copy(update={"count": g.count * NEAREST_POOL_FACTOR})
        for g in request.hardware.gpus]})
    try:
        run = await rt.optimizer.run(request.model_copy(update={
            "hardware": bigger, "objective": Objective.MIN_COST}))
    except InputError:
        return (f" Even {NEAREST_POOL_FACTOR}x the available GPUs would not meet it.")
    rec = run.plan["recommended"]
    needed = status.config_gpus(rec["config"])
    (gpu, count), = needed.items()
    offered = next((g.count for g in request.hardware.gpus if g.gpu == gpu), 0)
    return (f" Nearest feasible: {rec['summary']} (${rec['prediction']['cost_per_hour']:.2f}/h)"
            f" needs {count} {gpu}; {offered} available.")


# ---- deploy and roll out -------------------------------------------------------------------


LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"
LWS_API = "leaderworkerset.x-k8s.io/v1"


async def _workloads(kube: Kube, ep: Endpoint, config_hash: str | None = None) -> list[Obj]:
    """The endpoint's Deployments and LeaderWorkerSets: of one configuration hash (read by
    name: the renderer names them <name>[-role]-<hash>), or all of them (listed)."""
    lws = await kube.crd_exists(LWS_CRD)
    kinds = [("apps/v1", "Deployment")] + ([(LWS_API, "LeaderWorkerSet")] if lws else [])
    if config_hash is not None:
        found = []
        for middle in ("", "-prefill", "-decode", "-router"):
            for api_version, kind in kinds:
                obj = await kube.get(Ref(api_version, kind, ep.namespace,
                                         f"{ep.name}{middle}-{config_hash}"))
                if obj is not None:
                    found.append(obj)
            if found and not middle:
                break  # aggregated: one workload, no roles to look for
        return [w for w in found if _owned_by(w, ep)]
    labels = {naming.LABEL_ENDPOINT: ep.name, "app.kubernetes.io/managed-by": naming.MANAGED_BY}
    found = []
    for api_version, kind in kinds:
        found += await kube.list(api_version, kind, ep.namespace, labels=labels)
    # Only the ones this endpoint owns: a same-named endpoint's leftovers are not ours.
    return [w for w in found if _owned_by(w, ep)]


def _managed(obj: Obj) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return labels.get("app.kubernetes.io/managed-by") == naming.MANAGED_BY


def _owned_by(obj: Obj, ep: Endpoint) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    uid = ep.owner.uid
    return not uid or any(r.get("uid") == uid for r in refs)


async def _available(kube: Kube, ep: Endpoint, config_hash: str) -> bool:
    live = await _workloads(kube, ep, config_hash)
    return bool(live) and all(applying.is_available(w) for w in live)


async def _delete_all(kube: Kube, objects: list[Obj]) -> None:
    for obj in objects:
        await kube.delete(Ref.of(obj))


async def _deploy(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                  kids: children.Children, gpus: dict[str, int], *, new: bool = False) -> None:
    """`new`: nothing of the endpoint is thought to exist yet (see _reconcile)."""
    kube = rt.kube
    target = kids.config_hash
    made: list[applying.Applied] = []
    if new:
        made = await _together(*(applying.apply(kube, obj, current=None)
                                 for obj in [*kids.workloads, *kids.services]))
    # All created: the endpoint was as new as it looked, so there is no Service serving
    # another configuration. Anything already there (a run cut short): the full pass below
    # reads the live objects (and writes nothing more, they are up to date now).
    new = bool(made) and all(r is applying.Applied.CREATED for r in made)
    live_services: list[Obj | None] = [None] * len(kids.services)
    if new:
        fresh = True
    else:
        # The Services' names are stable and guessable: a user's object of that name means
        # a conflict, found before anything is created (nothing half-applied, no GPUs taken).
        live_services = [await kube.get(Ref.of(s)) for s in kids.services]
        for desired, live in zip(kids.services, live_services, strict=True):
            problem = applying.ownership_problem(live, desired) if live is not None else None
            if problem is not None:
                raise applying.NotOwned(Ref.of(desired), problem)
        results = [await applying.apply(kube, workload) for workload in kids.workloads]
        # Just created: certainly not available yet; spares reading them back.
        fresh = any(r is applying.Applied.CREATED for r in results)
    live_front = live_services[0]
    serving = children.service_hash(live_front) if live_front else None
    rollout = ep.status.get("rollout") or {}
    from_gpus = _from_gpus(ep, serving)

    if serving is not None and serving != target:
        old = await _workloads(kube, ep, serving)
        if old and all(applying.is_available(w) for w in old):
            # Keep serving from the old configuration until the new one is available.
            if rollout.get("toHash") != target or rollout.get("state") != "Progressing":
                _start_rollout(ep, spec, serving, target)
                rt.events(ep.body, "Normal", "RolloutStarted",
                          f"configuration {target} created beside {serving}; the Service "
                          "moves when it is available")
            ep.status["rollout"]["fromGpus"] = from_gpus
            ep.status["allocatedGpus"] = dict(Counter(gpus) + Counter(from_gpus))
            await _drop_others(kube, ep, keep={target, serving})
            ep.phase(Phase.DEPLOYING, f"rolling out {target}; {serving} serves meanwhile")
            ep.condition(ConditionType.DEPLOYED, True, "RollingOut",
                         f"new configuration {target} created")
            await _refresh_ready(rt, ep, serving)
            return
    for service, live in zip([] if new else kids.services, live_services, strict=False):
        await applying.apply(kube, service, current=live)
    await _pod_monitor(rt, ep)
    known = {ep.written.get("servingHash"), (ep.written.get("rollout") or {}).get("toHash"),
             (ep.written.get("activeConfiguration") or {}).get("hash")} - {None}
    if known - {target} or serving not in (None, target):
        await _drop_others(kube, ep, keep={target})
    ep.status["servingHash"] = target
    ep.status["allocatedGpus"] = dict(gpus)
    in_flight = (rollout.get("toHash") == target
                 and rollout.get("state") == RolloutState.PROGRESSING.value)
    available = False if fresh else await _available(kube, ep, target)
    if not in_flight and not available:
        # Nothing else serves: the Service points here already; track the deadline.
        _start_rollout(ep, spec, None, target)
        ep.status["rollout"]["fromGpus"] = {}
    elif in_flight and available:
        ep.status["rollout"] = {**rollout, "state": RolloutState.COMPLETE.value,
                                "message": "available"}
    await _refresh_ready(rt, ep, target, ready=available)
    if serving != target:
        rt.events(ep.body, "Normal", "Deployed",
                  f"{ep.status['activeConfiguration']['summary']} as {target}")
    ep.condition(ConditionType.DEPLOYED, True, "Applied", f"configuration {target} applied")


def _from_gpus(ep: Endpoint, serving: str | None) -> dict[str, int]:
    rollout = ep.written.get("rollout") or {}
    if rollout.get("state") == "Progressing" and rollout.get("fromHash") == serving:
        return dict(rollout.get("fromGpus") or {})
    if ep.written.get("servingHash") == serving:
        return dict(ep.written.get("allocatedGpus") or {})
    return {}


def _start_rollout(ep: Endpoint, spec: OptimizedEndpointSpec, from_hash: str | None,
                   to_hash: str) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    deadline = now + datetime.timedelta(seconds=spec.rollout.progress_deadline_seconds)
    ep.status["rollout"] = to_wire(RolloutStatus(
        from_hash=from_hash, to_hash=to_hash, state=RolloutState.PROGRESSING,
        started=now.isoformat().replace("+00:00", "Z"),
        deadline=deadline.isoformat().replace("+00:00", "Z")))


async def _drop_others(kube: Kube, ep: Endpoint, keep: set[str]) -> None:
    stale = [w for w in await _workloads(kube, ep) if applying.config_hash_of(w) not in keep]
    await _delete_all(kube, stale)


async def _pod_monitor(rt: Runtime, ep: Endpoint) -> None:
    if await rt.kube.crd_exists("podmonitors.monitoring.coreos.com"):
        await applying.apply(rt.kube, children.pod_monitor(ep.owner))


async def _refresh_ready(rt: Runtime, ep: Endpoint, serving: str, *,
                         ready: bool | None = None) -> bool:
    """Sets phase and the Ready condition from the serving configuration's workloads
    (`ready`: already known, not read again)."""
    if ready is None:
        ready = await _available(rt.kube, ep, serving)
    rolling = (ep.status.get("rollout") or {}).get("state") == "Progressing"
    if ready:
        ep.condition(ConditionType.READY, True, "Available",
                     f"configuration {serving} is serving")
        if not rolling:
            ep.phase(Phase.READY, ep.status["activeConfiguration"]["summary"]
                     if ep.status.get("activeConfiguration") else "")
    else:
        ep.condition(ConditionType.READY, False, "Unavailable",
                     f"configuration {serving} has no available replicas yet")
        if not rolling or ep.status.get("phase") != Phase.DEPLOYING.value:
            ep.phase(Phase.DEPLOYING, f"waiting for {serving} to become available")
    return ready


async def advance(rt: Runtime, namespace: str, name: str) -> None:
    """Move an endpoint's rollout on: switch the Service once the new configuration is
    available, roll back once its deadline passes; refresh phase and Ready otherwise."""
    async with rt.lock(pool.key(namespace, name)):
        # Read under the lock: a reconcile may have finished while this waited.
        fresh = await rt.kube.get(Ref(naming.API_VERSION, "OptimizedEndpoint", namespace, name))
        if fresh is None or fresh.get("metadata", {}).get("deletionTimestamp"):
            return
        ep = Endpoint.of(fresh)
        rollout = ep.status.get("rollout") or {}
        if _late_rollout(ep, rollout):
            # Failed only because it was slow: the configuration is still deployed, and
            # becoming available after the deadline means it works.
            if await _available(rt.kube, ep, rollout["toHash"]):
                _recovered(rt, ep, rollout)
                await commit(rt, ep)
                rt.metrics.endpoint_phase(ep.key, ep.status.get("phase"))
            return
        if ep.status.get("phase") in (Phase.FAILED.value, Phase.INFEASIBLE.value,
                                      Phase.OPTIMIZING.value, None):
            return
        if rollout.get("state") == RolloutState.PROGRESSING.value:
            await _progress(rt, ep, rollout)
        elif ep.status.get("servingHash"):
            await _refresh_ready(rt, ep, ep.status["servingHash"])
        await commit(rt, ep)
        rt.metrics.endpoint_phase(ep.key, ep.status.get("phase"))


def _late_rollout(ep: Endpoint, rollout: Obj) -> bool:
    """Failed because a first configuration (nothing to roll back to) passed its deadline."""
    return (ep.status.get("phase") == Phase.FAILED.value
            and rollout.get("state") == RolloutState.FAILED.value
            and rollout.get("fromHash") is None and bool(rollout.get("toHash"))
            and ep.status.get("servingHash") == rollout.get("toHash"))


def _recovered(rt: Runtime, ep: Endpoint, rollout: Obj) -> None:
    target = rollout["toHash"]
    ep.status["rollout"] = {**rollout, "state": RolloutState.COMPLETE.value,
                            "message": "available after its deadline"}
    ep.condition(ConditionType.DEPLOYED, True, "Recovered",
                 f"configuration {target} became available after its deadline")
    ep.condition(ConditionType.READY, True, "Available", f"configuration {target} is serving")
    active = ep.status.get("activeConfiguration") or {}
    ep.phase(Phase.READY, str(active.get("summary") or ""))
    rt.events(ep.body, "Normal", "Recovered",
              f"configuration {target} became available after its deadline")


async def _progress(rt: Runtime, ep: Endpoint, rollout: Obj) -> None:
    target, old = rollout["toHash"], rollout.get("fromHash")
    new = await _workloads(rt.kube, ep, target)
    if new and all(applying.is_available(w) for w in new):  # _available, without a 2nd read
        if old is not None:
            await _switch_services(rt, ep, target)
            await _delete_all(rt.kube, await _workloads(rt.kube, ep, old))
            rt.events(ep.body, "Normal", "RolledOut",
                      f"the Service moved from {old} to {target}; {old} removed")
        ep.status["rollout"] = {**rollout, "state": RolloutState.COMPLETE.value,
                                "message": "available"}
        ep.status["servingHash"] = target
        gpus = status.config_gpus_from_active(ep.status.get("activeConfiguration"))
        ep.status["allocatedGpus"] = gpus
        await _refresh_ready(rt, ep, target)
        return
    deadline = status.parse_time(rollout["deadline"])
    if datetime.datetime.now(datetime.UTC) < deadline:
        return
    why = _unavailable_reason(new)
    message = (f"configuration {target} did not become available within "
               f"{rollout['deadline']}: {why}")
    ep.status["rollout"] = {**rollout, "state": RolloutState.FAILED.value, "message": message}
    if old is not None:
        # Roll back: the old configuration never stopped serving; drop the new one.
        await _delete_all(rt.kube, new)
        ep.status["allocatedGpus"] = dict(rollout.get("fromGpus") or {})
        ep.status["servingHash"] = old
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed", message)
        await _refresh_ready(rt, ep, old)
        ep.status["message"] = f"rolled back to {old}: {message}"
    else:
        ep.phase(Phase.FAILED, message)
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed", message)
    rt.events(ep.body, "Warning", "RolloutFailed", message)
    rt.metrics.error("RolloutFailed")


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


def _unavailable_reason(workloads: list[Obj]) -> str:
    for w in workloads:
        for cond in (w.get("status") or {}).get("conditions") or []:
            if cond.get("status") == "False" and cond.get("message"):
                return str(cond["message"])
    return "no replica became available"


async def _switch_services(rt: Runtime, ep: Endpoint, target: str) -> None:
    for svc in await rt.kube.list("v1", "Service", ep.namespace,
                                  labels={naming.LABEL_ENDPOINT: ep.name}):
        if not _owned_by(svc, ep):
            continue
        selector = dict(svc.get("spec", {}).get("selector") or {})
        selector[naming.LABEL_CONFIG_HASH] = target
        await rt.kube.patch(Ref.of(svc), {"spec": {"selector": selector}})


async def delete_children(rt: Runtime, body: Obj) -> None:
    """Remove everything the endpoint created (owner references make the API server's
    garbage collector do the same; this makes it immediate and works without it)."""
    ep = Endpoint.of(body)
    async with rt.lock(ep.key):
        kube = rt.kube
        await _delete_all(kube, await _workloads(kube, ep))
        for svc in await kube.list("v1", "Service", ep.namespace,
                                   labels={naming.LABEL_ENDPOINT: ep.name}):
            if _owned_by(svc, ep):
                await kube.delete(Ref.of(svc))
        named = [Ref("v1", "ConfigMap", ep.namespace, f"{ep.name}-plan")]
        if await kube.crd_exists("podmonitors.monitoring.coreos.com"):
            named.append(Ref(children.PODMONITOR_API, "PodMonitor", ep.namespace, ep.name))
        for ref in named:
            # By name, so only if it is this endpoint's: a user's object of that name stays.
            found = await kube.get(ref)
            if found is not None and _owned_by(found, ep) and _managed(found):
                await kube.delete(ref)
        rt.ledger.forget(ep.key)
        rt.metrics.forget(ep.key)


def is_transient(err: Exception) -> bool:
    """API errors worth retrying: the server or the network, not our request."""
    return isinstance(err, KubeError) and (err.status >= 500 or err.status in (0, 409, 429))
