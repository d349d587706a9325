"""Kopf handlers: the thin shell between Kubernetes events and the reconciler.

Run with `kopf run --module trilemma.operator.handlers` (the image's command). Importing this
module registers the handlers in Kopf's default registry; `register(registry)` does the same
for another registry (tests run several operators in one process).

Environment: TRILEMMA_PROMETHEUS_URL, TRILEMMA_PROMETHEUS_ALLOWED_URLS and
TRILEMMA_PROMETHEUS_SECRET_NAMES (comma-separated; what endpoint specs may name),
TRILEMMA_MAX_CONCURRENT_OPTIMIZATIONS (2),
TRILEMMA_CACHE_DIR (/tmp/trilemma), TRILEMMA_METRICS_PORT (9090; 0 turns the server off),
TRILEMMA_RESYNC_SECONDS (15: how often rollouts and readiness are re-checked).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import random
from typing import Any, cast

import kopf
from kubernetes_asyncio.config import kube_config

from trilemma.operator import (
    closed_loop,
    endpoint,
    gateway,
    naming,
    reconcile,
    rollout,
    scale,
    scaler,
)
from trilemma.operator.apply import is_available
from trilemma.operator.endpoint import OperatorConfig, Runtime
from trilemma.operator.kube import Kube, KubeError
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import Optimizer, Planner, default_planner

ENDPOINTS = (naming.GROUP, naming.VERSION, "optimizedendpoints")
POOLS = (naming.GROUP, naming.VERSION, "hardwarepools")
MANAGED = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}


def _names(variable: str) -> tuple[str, ...]:
    """A comma-separated environment variable as a tuple (empty entries dropped)."""
    return tuple(n.strip() for n in os.environ.get(variable, "").split(",") if n.strip())


def config_from_env() -> OperatorConfig:
    return OperatorConfig(
        prometheus_url=os.environ.get("TRILEMMA_PROMETHEUS_URL") or None,
        max_concurrent_optimizations=int(
            os.environ.get("TRILEMMA_MAX_CONCURRENT_OPTIMIZATIONS", "2")),
        cache_dir=os.environ.get("TRILEMMA_CACHE_DIR", "/tmp/trilemma"),
        prometheus_urls=_names("TRILEMMA_PROMETHEUS_ALLOWED_URLS"),
        prometheus_secret_names=_names("TRILEMMA_PROMETHEUS_SECRET_NAMES"))


def resync_seconds() -> float:
    return float(os.environ.get("TRILEMMA_RESYNC_SECONDS", "15"))


def _post_event(body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    # Event messages are capped at 1 KiB by convention; the full text is in status. The body
    # is an API object as read; kopf.RawBody is the TypedDict Kopf declares for exactly that.
    kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=kind, reason=reason,
               message=message[:1024])


def build_runtime(config: OperatorConfig, *, planner: Planner | None = None,
                  metrics: OperatorMetrics | None = None) -> Runtime:
    return Runtime(kube=Kube(), optimizer=Optimizer(planner or default_planner,
                                                    config.max_concurrent_optimizations),
                   config=config, metrics=metrics or OperatorMetrics(), events=_post_event)


def _runtime(memo: Any) -> Runtime:
    rt = getattr(memo, "runtime", None)
    if not isinstance(rt, Runtime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return rt


# Backoff of a failure reported in status that may clear by itself (an API refusal, a
# conflicting object): 30 s, doubling per retry, at most an hour.
BACKOFF_FIRST_S = 30.0
BACKOFF_MAX_S = 3600.0


def backoff_s(retry: int) -> float:
    return min(BACKOFF_FIRST_S * 2.0 ** min(retry, 16), BACKOFF_MAX_S)


async def _guarded(coro: Any, what: str, retry: int = 0, body: kopf.Body | None = None) -> None:
    """Transient API trouble -> Kopf retries soon; a failure already reported in status ->
    retried with exponential backoff; anything else -> retried with backoff too, logged, never
    a crash of the operator. A refusal (403: RBAC, or an admission webhook) that reached no
    status is also said on the endpoint (`body`), as a Warning Event: its user does not read
    the operator's log, and Kopf 1.45 no longer posts log lines as Events."""
    try:
        await coro
    except endpoint.RetryLater as err:
        raise kopf.TemporaryError(f"{what}: {err}", delay=backoff_s(retry)) from err
    except KubeError as err:
        if endpoint.is_transient(err):
            raise kopf.TemporaryError(f"{what}: {err}", delay=5) from err
        if body is not None and err.status == 403:
            _post_event(dict(body), "Warning", "Forbidden",
                        f"the API server refused the operator ({what}: {err}); retrying "
                        f"in {backoff_s(retry):.0f} s")
        raise kopf.TemporaryError(f"{what}: {err}", delay=backoff_s(retry)) from err


def register(registry: kopf.OperatorRegistry) -> None:
    """Register every handler of the operator into `registry`.

    The parts are public names on purpose: Kopf names each handler by its qualified name
    (e.g. "register_endpoints.<locals>.endpoint_created") and keeps its progress in an
    annotation named after it, which must start with a letter or digit."""
    register_lifecycle(registry)
    register_endpoints(registry)
    register_children_and_pools(registry)


def register_lifecycle(registry: kopf.OperatorRegistry) -> None:
    """Start-up (settings, the runtime), clean-up, login and the liveness probe."""

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo,
                      logger: kopf.Logger, **_: Any) -> None:
        # Kopf's own bookkeeping under our group, not kopf.zalando.org.
        settings.persistence.finalizer = f"{naming.GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix=naming.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=naming.GROUP, key="last-handled-configuration")
        settings.posting.level = logging.INFO
        # Timers only re-read state and are idempotent: stop them at once on shutdown.
        settings.background.instant_exit_timeout = 0.1
        if not settings.peering.priority:
            # Replicas of one Deployment share their arguments; a random priority per process
            # makes exactly one active and the others standby (equal priorities all pause).
            settings.peering.priority = random.randint(1, 32767)
        if getattr(memo, "runtime", None) is None:
            memo.runtime = build_runtime(config_from_env())
            port = int(os.environ.get("TRILEMMA_METRICS_PORT", "9090"))
            if port:
                memo.runtime.metrics.serve(port)
        logger.info("trilemma operator ready: %d concurrent optimizations",
                    memo.runtime.config.max_concurrent_optimizations)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        rt = getattr(memo, "runtime", None)
        if rt is not None:
            rt.optimizer.shutdown()
            await rt.kube.close()

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The async client's own config loading (in-cluster, then kubeconfig) also configures
        # the client the reconciler uses: one login for Kopf and for our calls. The client
        # reads $KUBECONFIG when it is imported; read it again now, where it may have changed.
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = os.environ.get("KUBECONFIG",
                                                                  "~/.kube/config")
        return await kopf.login_via_async_client(**kwargs)

    @kopf.on.probe(id="optimizations_in_flight", registry=registry)
    async def in_flight(memo: kopf.Memo, **_: Any) -> int:
        rt = getattr(memo, "runtime", None)
        return rt.optimizer.in_flight if rt is not None else 0


def register_endpoints(registry: kopf.OperatorRegistry) -> None:
    """An OptimizedEndpoint's life: created, changed, resumed, deleted, and its resync timer."""

    async def _reconcile(body: kopf.Body, memo: kopf.Memo, *, force: bool,
                         retry: int) -> None:
        await _guarded(reconcile.reconcile(_runtime(memo), copy.deepcopy(dict(body)),
                                           force=force), "reconcile", retry, body)

    @kopf.on.create(*ENDPOINTS, registry=registry)
    async def endpoint_created(body: kopf.Body, memo: kopf.Memo, retry: int,
                               **_: Any) -> None:
        await _reconcile(body, memo, force=False, retry=retry)

    @kopf.on.update(*ENDPOINTS, field="spec", registry=registry)
    async def endpoint_changed(body: kopf.Body, memo: kopf.Memo, retry: int,
                               **_: Any) -> None:
        await _reconcile(body, memo, force=False, retry=retry)

    @kopf.on.resume(*ENDPOINTS, registry=registry)
    async def endpoint_resumed(body: kopf.Body, memo: kopf.Memo, retry: int,
                               **_: Any) -> None:
        # After a restart the children may have changed behind the operator's back: check
        # everything (the stored plan spares the search).
        await _reconcile(body, memo, force=True, retry=retry)

    @kopf.on.delete(*ENDPOINTS, registry=registry)
    async def endpoint_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        rt = _runtime(memo)
        await _guarded(rollout.delete_children(rt, copy.deepcopy(dict(body))), "delete",
                       body=body)
        pool = (body.get("spec", {}).get("hardwarePoolRef") or {}).get("name")
        if pool:
            _retry_waiting(rt, pool)

    @kopf.timer(*ENDPOINTS, interval=resync_seconds(), initial_delay=resync_seconds(),
                registry=registry)
    async def endpoint_resync(name: str, namespace: str | None, body: kopf.Body,
                              memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        if namespace is None:  # the resource is namespaced: Kopf always passes one
            return
        rt = _runtime(memo)
        # Each step on its own: a failing traffic check must not stop rollouts from moving
        # on, and nothing a spec holds may raise out of the timer (Kopf would back the whole
        # timer off). Every failure is logged and reported in status; the next tick retries.
        await _timer_step(rt, namespace, name, "resync", rollout.advance, logger)
        await _timer_step(rt, namespace, name, "regrow",
                          functools.partial(_regrow, seen=dict(body)), logger)
        # The traffic check is due every retune.intervalSeconds; the policy says when (from
        # the watched body first: a check that is not due costs no read).
        await _timer_step(rt, namespace, name, "retune",
                          functools.partial(closed_loop.check, seen=dict(body)), logger)
        # The operator-owned replica count follows the rate every tick (owner external: the
        # HPA's or KEDA's count, nothing to do here).
        await _timer_step(rt, namespace, name, "scale",
                          functools.partial(scaler.check, seen=dict(body)), logger)
        await _timer_step(rt, namespace, name, "gateway",
                          functools.partial(_pool_crd_arrived, seen=dict(body)), logger)


def register_children_and_pools(registry: kopf.OperatorRegistry) -> None:
    """A child Deployment that became available moves its rollout on; a pool that appeared or
    changed retries the endpoints waiting for it."""

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
    async def deployment_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        endpoint = (body.get("metadata", {}).get("labels") or {}).get(naming.LABEL_ENDPOINT)
        namespace = body.get("metadata", {}).get("namespace")
        rt = getattr(memo, "runtime", None)
        if not is_available(dict(body)):
            # Only availability moves a rollout on here; losing it is caught by the resync
            # timer, and a just-created Deployment has nothing to say yet.
            return
        if endpoint and namespace and rt is not None:
            try:
                await rollout.advance(rt, namespace, endpoint)
            except KubeError as err:
                # Events are not retried by Kopf; the periodic resync will catch up.
                logging.getLogger(__name__).warning("advance %s/%s: %s", namespace,
                                                    endpoint, err)

    @kopf.on.create(*POOLS, registry=registry)
    @kopf.on.update(*POOLS, field="spec", registry=registry)
    async def pool_changed(name: str, memo: kopf.Memo, **_: Any) -> None:
        _retry_waiting(_runtime(memo), name)


async def _timer_step(rt: Runtime, namespace: str, name: str, what: str, step: Any,
                      logger: kopf.Logger) -> None:
    try:
        await step(rt, namespace, name)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # the timer carries on whatever one step raised
        logger.warning("%s of %s/%s failed: %s: %s", what, namespace, name,
                       type(err).__name__, err)
        rt.metrics.error(f"{what.capitalize()}Failed")
        try:
            await endpoint.record_timer_failure(rt, namespace, name, what, err)
        except Exception as report_err:  # e.g. the status write was refused too
            logger.warning("could not report it in status: %s", report_err)


async def _pool_crd_arrived(rt: Runtime, namespace: str, name: str, *, seen: dict[str, Any]
                            ) -> None:
    """An endpoint deployed without its InferencePool (the CRD was missing) gets it once the
    CRD is installed: nothing else would reconcile it again, its spec being unchanged. Costs
    no request unless its Deployed condition says the pool is missing."""
    conditions = (seen.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == "Deployed" and gateway.MISSING_CRD in (c.get("message") or "")
               for c in conditions):
        return
    if await rt.kube.crd_exists(gateway.POOL_CRD):
        await reconcile.reconcile(rt, seen, force=True)


async def _regrow(rt: Runtime, namespace: str, name: str, *, seen: dict[str, Any]) -> None:
    """A rollout that started with the replicas that fit beside the old configuration gets
    the count it wanted once the old one is gone: nothing else would reconcile it again, its
    spec being unchanged. Costs no request unless its status says the count was held back."""
    if scale.held_back(seen):
        await reconcile.reconcile(rt, copy.deepcopy(seen), force=True)


def _retry_waiting(rt: Runtime, pool_name: str) -> None:
    """Endpoints that failed for want of this pool (or its GPUs) try again in the
    background: the pool appeared, grew, or an endpoint released GPUs."""
    async def retry() -> None:
        endpoints = await rt.kube.list(naming.API_VERSION, "OptimizedEndpoint")
        for ep in endpoints:
            spec = ep.get("spec") or {}
            phase = (ep.get("status") or {}).get("phase")
            if (spec.get("hardwarePoolRef") or {}).get("name") != pool_name:
                continue
            if phase not in ("Infeasible", "Failed"):
                continue
            reasons = {c.get("reason") for c in (ep.get("status") or {}).get("conditions", [])
                       if c.get("status") == "False"}
            if reasons & {"PoolExhausted", "PoolTooSmall", "PoolContention",
                          "HardwarePoolNotFound", "InvalidHardwarePool", "SLOUnreachable"}:
                try:
                    await reconcile.reconcile(rt, ep)
                except (KubeError, endpoint.RetryLater) as err:
                    # E.g. an endpoint in a namespace this operator does not serve (403):
                    # its own operator, or its next change, will handle it.
                    logging.getLogger(__name__).warning(
                        "retrying %s/%s: %s", ep["metadata"].get("namespace"),
                        ep["metadata"].get("name"), err)

    task = asyncio.get_running_loop().create_task(retry())
    _background.add(task)
    task.add_done_callback(_background.discard)


# Strong references to fire-and-forget tasks (the loop keeps only weak ones).
_background: set[asyncio.Task[None]] = set()

register(kopf.get_default_registry())
