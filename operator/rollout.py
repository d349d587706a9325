"""Deploying a plan and moving traffic to it: children, the rollout state machine, deletion.

A new configuration gets its own hashed Deployment beside the serving one; the Service moves
when it is available and the old one goes (`advance`, from the timer and Deployment events);
past the progress deadline it is rolled back, or, with nothing to roll back to, fails and
recovers if it becomes available later. Only objects this endpoint owns are ever changed or
deleted.
"""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

from trilemma.operator import apply as applying
from trilemma.operator import children, gateway, naming, pool, status
from trilemma.operator.endpoint import Endpoint, Runtime, commit, owns, together
from trilemma.operator.kube import Kube, Ref
from trilemma.operator.resources import (
    ConditionType,
    EndpointPhase,
    OptimizedEndpointSpec,
    RolloutState,
    RolloutStatus,
)

Obj = dict[str, Any]


async def delete_owned(kube: Kube, ep: Endpoint, objects: list[Obj]) -> None:
    for obj in objects:
        live = await kube.get(Ref.of(obj))
        if live is not None and owns(ep, live):
            await kube.delete(Ref.of(obj))


LWS_CRD = "leaderworkersets.leaderworkerset.x-k8s.io"
LWS_API = "leaderworkerset.x-k8s.io/v1"


async def _workloads(kube: Kube, ep: Endpoint, config_hash: str | None = None) -> list[Obj]:
    """The endpoint's Deployments and LeaderWorkerSets: of one configuration hash (read by
    name: the renderer names them <name>[-role]-<hash>; listed by that hash's label when none
    is found so: a plan spanning GPU types names one per type, <name>-p<i>-<hash>), or all of
    them (listed)."""
    lws = await kube.crd_exists(LWS_CRD)
    kinds = [("apps/v1", "Deployment")] + ([(LWS_API, "LeaderWorkerSet")] if lws else [])
    labels = {naming.LABEL_ENDPOINT: ep.name, "app.kubernetes.io/managed-by": naming.MANAGED_BY}
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
        if found:
            return [w for w in found if owns(ep, w)]
        labels = {**labels, naming.LABEL_CONFIG_HASH: config_hash}
    found = []
    for api_version, kind in kinds:
        found += await kube.list(api_version, kind, ep.namespace, labels=labels)
    # Only the ones this endpoint owns: a same-named endpoint's leftovers are not ours.
    return [w for w in found if owns(ep, w)]


async def _available(kube: Kube, ep: Endpoint, config_hash: str) -> bool:
    live = await _workloads(kube, ep, config_hash)
    return bool(live) and all(applying.is_available(w) for w in live)


async def _serving(kube: Kube, ep: Endpoint, config_hash: str) -> bool:
    """Every workload of the configuration has a replica available (some may be starting)."""
    live = await _workloads(kube, ep, config_hash)
    return bool(live) and all(applying.is_serving(w) for w in live)


async def _delete_workloads(kube: Kube, ep: Endpoint, workloads: list[Obj]) -> None:
    """Each workload and its disruption budget (same name), if the endpoint owns it."""
    for obj in workloads:
        await kube.delete(Ref.of(obj))
        meta = obj["metadata"]
        budget = Ref(children.PDB_API, "PodDisruptionBudget", meta["namespace"], meta["name"])
        found = await kube.get(budget)
        if found is not None and owns(ep, found):
            await kube.delete(budget)


async def deploy(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                 kids: children.Children, gpus: dict[str, int], *, new: bool = False) -> None:
    """`new`: nothing of the endpoint is thought to exist yet (see _reconcile)."""
    kube = rt.kube
    target = kids.config_hash
    made: list[applying.Applied] = []
    if new:
        made = await together(*(applying.apply(kube, obj, current=None)
                                 for obj in [*kids.workloads, *kids.budgets, *kids.services]))
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
        await gateway.check_pool_name(kube, kids)
        results = [await applying.apply(kube, workload) for workload in kids.workloads]
        for budget in kids.budgets:
            await applying.apply(kube, budget)
        # Just created: certainly not available yet; spares reading them back.
        fresh = any(r is applying.Applied.CREATED for r in results)
    live_front = live_services[0]
    serving = children.service_hash(live_front) if live_front else None
    rollout = ep.status.get("rollout") or {}
    from_gpus = ep.gpus_of(serving)

    if serving is not None and serving != target:
        old = await _workloads(kube, ep, serving)
        if old and all(applying.is_available(w) for w in old):
            # Keep serving from the old configuration until the new one is available.
            if rollout.get("toHash") != target or rollout.get("state") != "Progressing":
                _start_rollout(ep, spec, serving, target)
                rt.events(ep.body, "Normal", "RolloutStarted",
                          f"configuration {target} created beside {serving}; the Service "
                          "moves when it is available")
            ep.update_rollout(from_gpus=from_gpus)
            ep.put(allocated_gpus=dict(Counter(gpus) + Counter(from_gpus)))
            await _drop_others(kube, ep, keep={target, serving})
            # The pool selects what the Service still selects; both move when it is available.
            note = await gateway.apply(kube, ep, kids,
                                       selector=children.service_selector(live_front))
            ep.phase(EndpointPhase.DEPLOYING, f"rolling out {target}; {serving} serves meanwhile")
            ep.condition(ConditionType.DEPLOYED, True, "RollingOut",
                         _with_note(f"new configuration {target} created", note))
            await _refresh_ready(rt, ep, serving)
            return
    for service, live in zip([] if new else kids.services, live_services, strict=False):
        await applying.apply(kube, service, current=live)
    note = await gateway.apply(kube, ep, kids)
    await _pod_monitor(rt, ep)
    known = {ep.written.get("servingHash"), (ep.written.get("rollout") or {}).get("toHash"),
             (ep.written.get("activeConfiguration") or {}).get("hash")} - {None}
    if known - {target} or serving not in (None, target):
        await _drop_others(kube, ep, keep={target})
    ep.put(serving_hash=target, allocated_gpus=dict(gpus))
    await _track(rt, ep, spec, target, fresh=fresh, serving=serving)
    if serving != target:
        rt.events(ep.body, "Normal", "Deployed",
                  f"{ep.status['activeConfiguration']['summary']} as {target}")
        if note:  # once per configuration, not every reconcile; the condition keeps saying it
            rt.events(ep.body, "Warning", "InferencePoolCRDMissing", note)
    ep.condition(ConditionType.DEPLOYED, True, "Applied",
                 _with_note(f"configuration {target} applied", note))


async def _track(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, target: str, *,
                 fresh: bool, serving: str | None) -> None:
    """The Service points at `target` now: a rollout with a deadline until it is available
    (none for a serving configuration that was only scaled), and Ready from its workloads."""
    rollout = ep.status.get("rollout") or {}
    in_flight = (rollout.get("toHash") == target
                 and rollout.get("state") == RolloutState.PROGRESSING.value)
    available = False if fresh else await _available(rt.kube, ep, target)
    # Scaled while serving (the same configuration, more replicas starting): no rollout.
    scaled = (not available and not in_flight and serving == target
              and await _serving(rt.kube, ep, target))
    if not in_flight and not available and not scaled:
        # Nothing else serves: the Service points here already; track the deadline.
        _start_rollout(ep, spec, None, target)
    elif in_flight and available:
        ep.update_rollout(state=RolloutState.COMPLETE, message="available")
    await _refresh_ready(rt, ep, target, ready=available or scaled)


def _with_note(message: str, note: str) -> str:
    return f"{message}; {note}" if note else message


def _start_rollout(ep: Endpoint, spec: OptimizedEndpointSpec, from_hash: str | None,
                   to_hash: str) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    deadline = now + datetime.timedelta(seconds=spec.rollout.progress_deadline_seconds)
    ep.put(rollout=RolloutStatus(
        from_hash=from_hash, to_hash=to_hash, state=RolloutState.PROGRESSING,
        started=now.isoformat().replace("+00:00", "Z"),
        deadline=deadline.isoformat().replace("+00:00", "Z")))


async def _drop_others(kube: Kube, ep: Endpoint, keep: set[str]) -> None:
    stale = [w for w in await _workloads(kube, ep) if applying.config_hash_of(w) not in keep]
    await _delete_workloads(kube, ep, stale)


async def _pod_monitor(rt: Runtime, ep: Endpoint) -> None:
    if await rt.kube.crd_exists("podmonitors.monitoring.coreos.com"):
        await applying.apply(rt.kube, children.pod_monitor(ep.owner))


async def _refresh_ready(rt: Runtime, ep: Endpoint, serving: str, *,
                         ready: bool | None = None) -> bool:
    """Sets phase and the Ready condition from the serving configuration's workloads
    (`ready`: already known, not read again)."""
    rolling = (ep.status.get("rollout") or {}).get("state") == "Progressing"
    if ready is None:
        # Outside a rollout, a configuration with a replica of each workload up serves, the
        # replicas a scale-up added still loading; a rollout waits for all of them.
        ready = await (_available if rolling else _serving)(rt.kube, ep, serving)
    if ready:
        ep.condition(ConditionType.READY, True, "Available",
                     f"configuration {serving} is serving")
        if not rolling:
            ep.phase(EndpointPhase.READY, ep.status["activeConfiguration"]["summary"]
                     if ep.status.get("activeConfiguration") else "")
    else:
        ep.condition(ConditionType.READY, False, "Unavailable",
                     f"configuration {serving} has no available replicas yet")
        if not rolling or ep.status.get("phase") != EndpointPhase.DEPLOYING.value:
            ep.phase(EndpointPhase.DEPLOYING, f"waiting for {serving} to become available")
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
        if ep.status.get("phase") in (EndpointPhase.FAILED.value, EndpointPhase.INFEASIBLE.value,
                                      EndpointPhase.OPTIMIZING.value, None):
            return
        if rollout.get("state") == RolloutState.PROGRESSING.value:
            await _progress(rt, ep, rollout)
        elif ep.status.get("servingHash"):
            await _refresh_ready(rt, ep, ep.status["servingHash"])
        await commit(rt, ep)
        rt.metrics.endpoint_phase(ep.key, ep.status.get("phase"))


def _late_rollout(ep: Endpoint, rollout: Obj) -> bool:
    """Failed because a first configuration (nothing to roll back to) passed its deadline."""
    return (ep.status.get("phase") == EndpointPhase.FAILED.value
            and rollout.get("state") == RolloutState.FAILED.value
            and rollout.get("fromHash") is None and bool(rollout.get("toHash"))
            and ep.status.get("servingHash") == rollout.get("toHash"))


def _recovered(rt: Runtime, ep: Endpoint, rollout: Obj) -> None:
    target = rollout["toHash"]
    ep.update_rollout(state=RolloutState.COMPLETE, message="available after its deadline")
    ep.condition(ConditionType.DEPLOYED, True, "Recovered",
                 f"configuration {target} became available after its deadline")
    ep.condition(ConditionType.READY, True, "Available", f"configuration {target} is serving")
    active = ep.status.get("activeConfiguration") or {}
    ep.phase(EndpointPhase.READY, str(active.get("summary") or ""))
    rt.events(ep.body, "Normal", "Recovered",
              f"configuration {target} became available after its deadline")


async def _progress(rt: Runtime, ep: Endpoint, rollout: Obj) -> None:
    target, old = rollout["toHash"], rollout.get("fromHash")
    new = await _workloads(rt.kube, ep, target)
    if new and all(applying.is_available(w) for w in new):  # _available, without a 2nd read
        if old is not None:
            await _switch_services(rt, ep, target)
            await _delete_workloads(rt.kube, ep, await _workloads(rt.kube, ep, old))
            rt.events(ep.body, "Normal", "RolledOut",
                      f"the Service moved from {old} to {target}; {old} removed")
        ep.update_rollout(state=RolloutState.COMPLETE, message="available")
        ep.put(serving_hash=target,
               allocated_gpus=status.config_gpus_from_active(ep.status.get("activeConfiguration")))
        await _refresh_ready(rt, ep, target)
        return
    deadline = status.parse_time(rollout["deadline"])
    if datetime.datetime.now(datetime.UTC) < deadline:
        return
    why = _unavailable_reason(new)
    message = (f"configuration {target} did not become available within "
               f"{rollout['deadline']}: {why}")
    ep.update_rollout(state=RolloutState.FAILED, message=message)
    if old is not None:
        # Roll back: the old configuration never stopped serving; drop the new one.
        await _delete_workloads(rt.kube, ep, new)
        ep.put(allocated_gpus=dict(rollout.get("fromGpus") or {}), serving_hash=old)
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed", message)
        await _refresh_ready(rt, ep, old)
        ep.put(message=f"rolled back to {old}: {message}")
    else:
        ep.phase(EndpointPhase.FAILED, message)
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed", message)
    rt.events(ep.body, "Warning", "RolloutFailed", message)
    rt.metrics.error("RolloutFailed")


def _unavailable_reason(workloads: list[Obj]) -> str:
    for w in workloads:
        for cond in (w.get("status") or {}).get("conditions") or []:
            if cond.get("status") == "False" and cond.get("message"):
                return str(cond["message"])
    return "no replica became available"


async def _switch_services(rt: Runtime, ep: Endpoint, target: str) -> None:
    for svc in await rt.kube.list("v1", "Service", ep.namespace,
                                  labels={naming.LABEL_ENDPOINT: ep.name}):
        if not owns(ep, svc):
            continue
        selector = dict(svc.get("spec", {}).get("selector") or {})
        selector[naming.LABEL_CONFIG_HASH] = target
        await rt.kube.patch(Ref.of(svc), {"spec": {"selector": selector}})
    await gateway.retarget(rt.kube, ep, target)


async def delete_children(rt: Runtime, body: Obj) -> None:
    """Remove everything the endpoint created (owner references make the API server's
    garbage collector do the same; this makes it immediate and works without it)."""
    ep = Endpoint.of(body)
    async with rt.lock(ep.key):
        kube = rt.kube
        await _delete_workloads(kube, ep, await _workloads(kube, ep))
        for svc in await kube.list("v1", "Service", ep.namespace,
                                   labels={naming.LABEL_ENDPOINT: ep.name}):
            if owns(ep, svc):
                await kube.delete(Ref.of(svc))
        named = [Ref("v1", "ConfigMap", ep.namespace, f"{ep.name}-plan")]
        if await kube.crd_exists("podmonitors.monitoring.coreos.com"):
            named.append(Ref(children.PODMONITOR_API, "PodMonitor", ep.namespace, ep.name))
        for ref in named:
            # By name, so only if it is this endpoint's: a user's object of that name stays.
            found = await kube.get(ref)
            if found is not None and owns(ep, found):
                await kube.delete(ref)
        await gateway.delete(kube, ep)
        rt.ledger.forget(ep.key)
        rt.metrics.forget(ep.key)

