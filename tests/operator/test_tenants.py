"""A hostile (or careless) tenant against the operator on KMock: objects it does not own stay
untouched, a failure that clears by itself is recovered from, and the periodic timer survives
whatever one of its steps raises. (The API-semantics cases, a real 403 and the garbage
collector, are tests/cluster/test_tenants.py.)"""

from __future__ import annotations

import copy

import pytest

from tests.operator.test_reconcile import (
    NS,
    POOL,
    deployments,
    endpoint,
    make_available,
    status,
)
from trilemma.operator import closed_loop


def _condition(st: dict, kind: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


USER_SERVICE = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "chat", "namespace": NS, "labels": {"team": "mine"}},
                "spec": {"selector": {"app": "my-own-chat"}, "ports": [{"port": 80}]}}
USER_PLAN = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "chat-plan", "namespace": NS},
             "data": {"notes": "the user's own data"}}


@pytest.mark.parametrize("theirs", [USER_SERVICE, USER_PLAN], ids=["service", "configmap"])
async def test_an_object_the_operator_does_not_own_is_neither_changed_nor_adopted(
        api, operator_factory, theirs):
    await operator_factory()
    await api.create(POOL)
    await api.create(copy.deepcopy(theirs))
    before = api.get("v1", theirs["kind"], NS, theirs["metadata"]["name"])
    await api.create(endpoint())
    st = await api.wait(lambda: status(api).get("phase") == "Failed" and status(api),
                        timeout=60, what="the conflict in status")
    assert _condition(st, "Deployed")["reason"] == "Conflict"
    assert f"{theirs['kind']} {NS}/{theirs['metadata']['name']}" in st["message"]
    assert "not managed by trilemma" in st["message"]
    assert st.get("allocatedGpus", {}) == {}
    after = api.get("v1", theirs["kind"], NS, theirs["metadata"]["name"])
    assert after == before  # no patch, no ownerReference, the user's keys intact
    assert "ownerReferences" not in after["metadata"]

    await api.delete("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat")
    await api.wait(lambda: api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS,
                                   "chat") is None, timeout=30, what="the endpoint gone")
    assert api.get("v1", theirs["kind"], NS, theirs["metadata"]["name"]) == before


async def test_a_conflict_clears_once_the_users_object_is_gone(api, operator_factory,
                                                                monkeypatch):
    # The backoff's first step, shortened: the behaviour, not the 30 s, is under test.
    monkeypatch.setattr("trilemma.operator.handlers.BACKOFF_FIRST_S", 1.0)
    await operator_factory()
    await api.create(POOL)
    await api.create(copy.deepcopy(USER_SERVICE))
    await api.create(endpoint())
    await api.wait(lambda: status(api).get("phase") == "Failed", timeout=60,
                   what="the conflict")
    await api.delete("v1", "Service", NS, "chat")
    await api.wait(lambda: status(api).get("phase") == "Deploying", timeout=60,
                   what="a retry deploying once the Service is gone")
    assert api.get("v1", "Service", NS, "chat")["metadata"]["ownerReferences"][0]["uid"] == \
        "uid-chat"


@pytest.mark.slow
async def test_a_rollout_that_misses_its_deadline_recovers_when_it_becomes_available(
        api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(rollout={"progressDeadlineSeconds": 60}))
    rollout = await api.wait(lambda: (status(api).get("rollout") or {}).get("deadline")
                             and status(api)["rollout"], what="the first rollout")
    # Its deadline passes (moved into the past rather than waited for: 60 s is the least a
    # spec may ask; tests/cluster/test_rollout.py waits for a real one).
    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"status": {"rollout": {**rollout, "deadline": "2000-01-01T00:00:00Z"}}})
    st = await api.wait(lambda: status(api).get("phase") == "Failed" and status(api),
                        timeout=60, what="the first rollout past its deadline")
    assert st["rollout"]["state"] == "Failed"
    assert _condition(st, "Deployed")["reason"] == "RolloutFailed"
    # Slow, not broken: its Deployment becomes available after the deadline.
    (dep,) = deployments(api)
    await make_available(api, dep)
    st = await api.wait(lambda: status(api).get("phase") == "Ready" and status(api),
                        timeout=30, what="Ready once available")
    assert st["rollout"]["state"] == "Complete"
    assert _condition(st, "Ready")["status"] == "True"
    assert _condition(st, "Deployed")["reason"] == "Recovered"
    assert st["allocatedGpus"] == {"h100_sxm": st["activeConfiguration"]["gpus"]}


async def test_a_failing_traffic_check_neither_stops_the_timer_nor_rollouts(
        api, operator_factory, monkeypatch):
    async def broken(*_args, **_kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(closed_loop, "check", broken)
    op = await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(retune={"enabled": True, "intervalSeconds": 10}))
    await api.wait(lambda: _condition(status(api), "MetricsAvailable").get("reason")
                   == "RetuneCheckFailed", timeout=60, what="the failure in status")
    message = _condition(status(api), "MetricsAvailable")["message"]
    assert "UnicodeDecodeError" in message and "retried at the next resync" in message
    # The same timer still moves the rollout on: the resync step ran beside the broken one.
    (dep,) = deployments(api)
    await make_available(api, dep)
    await api.wait(lambda: status(api).get("phase") == "Ready", timeout=30,
                   what="Ready through the timer")
    assert op.metrics.registry.get_sample_value(
        "trilemma_errors_total", {"reason": "RetuneFailed"}) >= 1


@pytest.mark.parametrize("extra", [["-tp", "8"], ["--tensor_parallel_size=8"],
                                   ["--tensor-parallel-size=8"], ["-tp=8"]])
async def test_extra_args_cannot_override_a_planned_flag_in_another_spelling(
        api, operator_factory, extra):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(serving={"extraArgs": extra}))
    st = await api.wait(lambda: status(api).get("phase") == "Failed" and status(api),
                        timeout=60, what="the refusal")
    assert _condition(st, "Optimized")["reason"] == "RenderFailed"
    assert "serving.extraArgs.0" in st["message"]
    assert "--tensor-parallel-size is set by the plan" in st["message"]
    assert deployments(api) == []
