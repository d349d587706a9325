"""GitOps: what Argo CD (the chart's Lua health checks, run by lua5.1) and Flux (kstatus's
conditions) read from the status the real operator writes, and that it never writes a spec.

The objects judged are the ones the operator left in the (emulated) API server, through a
deploy, Ready, a rollout, a rollback and bad input: no status document is made up here.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from tests.operator.test_bad_input import _settled
from tests.operator.test_reconcile import (
    ENDPOINT,
    NS,
    POOL,
    condition,
    endpoint,
    make_available,
    status,
    wait_phase,
)
from tests.support.argocd import Health, health
from tests.support.kube import OE, Api

API_VERSION = "trilemma.dev/v1alpha1"
KSTATUS = ("Reconciling", "Stalled")


def live(api: Api, name: str = "chat") -> dict[str, Any]:
    found = api.get(API_VERSION, "OptimizedEndpoint", NS, name)
    assert found is not None
    return found


def kstatus(obj: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The kstatus conditions present: {type: (status, reason)}."""
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]
            if c["type"] in KSTATUS}


def writes(api: Api) -> tuple[list[kmock.Request], list[kmock.Request]]:
    """(the operator's writes to OptimizedEndpoints, the test's own).
    The test's own requests are told apart by their client (the test's Api is plain aiohttp;
    the operator's are Kopf's and kubernetes_asyncio's)."""
    found = [r for r in api.server[kmock.resource(OE)]
             if r.method.upper() in ("PATCH", "PUT", "POST")]
    mine = [r for r in found if r.headers.get("User-Agent", "").startswith("Python/")]
    return [r for r in found if r not in mine], mine


def touches_spec(request: kmock.Request) -> bool:
    """Whether a write may change anything but status and metadata (Kopf's finalizer and
    annotations)."""
    if request.subresource == "status":
        return False
    data = request.data
    if isinstance(data, list):  # a JSON patch: its operations' paths
        return not all(str(op.get("path", "")).startswith("/metadata/") for op in data)
    return not isinstance(data, dict) or set(data) - {"metadata"} != set()


async def test_health_through_deploy_ready_rollout_and_rollback(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    await wait_phase(api, "Deploying")
    deploying = live(api)
    assert kstatus(deploying) == {"Reconciling": ("True", "Deploying")}
    assert health(deploying).status == "Progressing"
    assert "Deploying" in health(deploying).message

    old = deploying["status"]["activeConfiguration"]["hash"]
    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{old}"))
    await wait_phase(api, "Ready")
    ready = live(api)
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"] == 1
    assert kstatus(ready) == {}
    assert condition(ready["status"], "Ready")["status"] == "True"
    assert health(ready) == Health("Healthy", ready["status"]["message"])
    assert health(api.get(API_VERSION, "HardwarePool", None, "gpus")) == Health(
        "Healthy", "offers 8 h100_sxm")
    # The user's edit, before the operator has acted on it: that generation is not observed.
    edited = {**ready, "metadata": {**ready["metadata"], "generation": 2}}
    assert health(edited) == Health("Progressing", "generation 2 not yet observed (observed 1)")

    await api.patch(API_VERSION, "OptimizedEndpoint", NS, "chat",
                    {"metadata": {"generation": 2},
                     "spec": {"workload": {**ENDPOINT["spec"]["workload"], "promptTokens": {
                         "kind": "lognormal", "mean": 4000, "p90": 8000}}}})
    await api.wait(lambda: (status(api).get("rollout") or {}).get("state") == "Progressing",
                   what="a rollout")
    rolling = live(api)
    assert rolling["status"]["observedGeneration"] == 2
    assert kstatus(rolling) == {"Reconciling": ("True", "RollingOut")}
    assert health(rolling).status == "Progressing"

    # Time passes beyond the progress deadline (KMock has no clock to wait on): rolled back.
    await api.patch(API_VERSION, "OptimizedEndpoint", NS, "chat", {"status": {"rollout": {
        **rolling["status"]["rollout"], "deadline": "2020-01-01T00:00:00Z"}}})
    await api.wait(lambda: (status(api).get("rollout") or {}).get("state") == "Failed",
                   what="the rollback")
    rolled_back = live(api)
    assert rolled_back["status"]["phase"] == "Ready"  # the old configuration serves
    assert kstatus(rolled_back) == {"Stalled": ("True", "RolledBack")}
    verdict = health(rolled_back)
    assert verdict.status == "Degraded" and verdict.message.startswith("RolledBack: rolled back")

    # Through all of it, the operator wrote status and metadata only: nothing a GitOps tool
    # compares with Git (the spec) ever changed under it.
    operator, mine = writes(api)
    # The test's own (the create, the edit, the deadline written through the main resource)
    # all count as touching more than status and metadata: the check sees such writes.
    assert [touches_spec(r) for r in mine] == [True, True, True]
    assert {r.subresource for r in operator} == {"status", None}  # Kopf's metadata too
    assert [r.data for r in operator if touches_spec(r)] == []


@pytest.mark.parametrize("change,phase,reason", [
    ({"model": {"id": "acme/NoSuchModel-7B"}}, "Failed", "UnknownModel"),
    ({"slo": {"ttftMs": {"p90": 1}, "tpotMs": {"p90": 0.5}}}, "Infeasible", "SLOUnreachable"),
])
async def test_bad_input_is_degraded(api, operator_factory, change, phase, reason):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(**change))
    st = await _settled(api)
    assert st["phase"] == phase
    obj = live(api)
    assert obj["status"]["observedGeneration"] == 1
    assert kstatus(obj) == {"Stalled": ("True", reason)}
    assert health(obj) == Health("Degraded", f"{reason}: {st['message']}")


async def test_recommend_only_is_healthy_once_planned(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(rollout={"autoApply": False}))
    await wait_phase(api, "Pending", timeout=60)
    obj = live(api)
    assert condition(obj["status"], "Deployed")["reason"] == "RecommendOnly"
    assert kstatus(obj) == {}
    assert health(obj) == Health("Healthy", obj["status"]["message"])
