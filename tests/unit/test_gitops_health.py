"""kstatus conditions derived from status (operator/health.py), and the chart's Argo CD health
checks (run with lua5.1) on the cases no operator scenario reaches in a short test."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.support.argocd import Health, health, lua_literal
from tests.tools import require_tool
from trilemma.operator.health import kstatus_verdict, with_kstatus
from trilemma.operator.resources import OptimizedEndpointStatus

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
ACTIVE = {"hash": "new1", "summary": "1x [fp8 TP1] on h100_sxm", "short": "fp8 TP1",
          "model": "m", "engine": "vllm", "gpu": "h100_sxm", "gpus": 1, "replicas": 1,
          "applied": True}


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": T0}


def rollout(state: str, from_hash: str | None, to_hash: str = "new1") -> dict[str, Any]:
    out = {"toHash": to_hash, "state": state, "started": T0, "deadline": T1,
           "message": "did not become available"}
    return out if from_hash is None else {**out, "fromHash": from_hash}


def verdict(**wire: Any) -> tuple[str, str] | None:
    found = kstatus_verdict(OptimizedEndpointStatus.model_validate(wire))
    return None if found is None else (found.kind.value, found.reason)


@pytest.mark.parametrize(("wire", "expected"), [
    ({}, ("Reconciling", "Pending")),
    ({"phase": "Optimizing"}, ("Reconciling", "Optimizing")),
    ({"phase": "Deploying", "rollout": rollout("Progressing", None)},
     ("Reconciling", "Deploying")),
    ({"phase": "Deploying", "rollout": rollout("Progressing", "old1")},
     ("Reconciling", "RollingOut")),
    ({"phase": "Ready", "conditions": [cond("Ready", "True", "Available")]}, None),
    # A failed resync leaves phase Ready but Ready Unknown: still being worked on.
    ({"phase": "Ready", "conditions": [cond("Ready", "Unknown", "ResyncFailed")]},
     ("Reconciling", "ResyncFailed")),
    ({"phase": "Pending", "conditions": [cond("Deployed", "False", "RecommendOnly")]}, None),
    # The first False step names the cause (a stale RecommendOnly after it does not).
    ({"phase": "Infeasible", "conditions": [cond("Validated", "True", "Valid"),
                                            cond("Optimized", "False", "PoolTooSmall"),
                                            cond("Deployed", "False", "RecommendOnly")]},
     ("Stalled", "PoolTooSmall")),
    ({"phase": "Failed", "conditions": [cond("Validated", "False", "InvalidSpec")]},
     ("Stalled", "InvalidSpec")),
    ({"phase": "Failed"}, ("Stalled", "Failed")),
    # Rolled back: the old configuration serves, the spec's plan failed.
    ({"phase": "Ready", "activeConfiguration": ACTIVE, "servingHash": "old1",
      "rollout": rollout("Failed", "old1")}, ("Stalled", "RolledBack")),
    # ... until the spec plans the serving configuration again.
    ({"phase": "Ready", "activeConfiguration": {**ACTIVE, "hash": "old1"},
      "servingHash": "old1", "rollout": rollout("Failed", "old1")}, None),
])
def test_kstatus_condition_follows_phase_and_rollout(wire, expected):
    assert verdict(**wire) == expected


def test_derived_conditions_replace_stale_ones_and_keep_their_transition_time():
    wire: dict[str, Any] = {"phase": "Deploying", "conditions": [
        cond("Ready", "False", "Unavailable"), cond("Stalled", "True", "InvalidSpec")]}
    first = with_kstatus(wire, generation=3, now=T1)
    assert [(c["type"], c["status"], c["reason"]) for c in first] == [
        ("Ready", "False", "Unavailable"), ("Reconciling", "True", "Deploying")]
    assert first[1]["lastTransitionTime"] == T1 and first[1]["observedGeneration"] == 3
    again = with_kstatus({**wire, "conditions": first}, generation=3, now="2027-01-01T00:00:00Z")
    assert again == first
    settled = with_kstatus({"phase": "Ready", "conditions": [
        cond("Ready", "True", "Available"), first[1]]}, generation=3, now=T1)
    assert [c["type"] for c in settled] == ["Ready"]


def endpoint(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
                           "metadata": {"name": "chat", "generation": generation}}
    return obj if status is None else {**obj, "status": status}


def test_argocd_waits_for_the_operator_to_observe_the_generation():
    assert health(endpoint(None)) == Health("Progressing", "waiting for the operator")
    behind = endpoint({"observedGeneration": 1, "phase": "Ready", "message": "ok"})
    assert health(behind) == Health("Progressing",
                                    "generation 2 not yet observed (observed 1)")
    assert health(endpoint({"observedGeneration": 2, "phase": "Ready", "message": "ok"})
                  ) == Health("Healthy", "ok")


def test_argocd_reports_a_hardware_pool_healthy_with_its_offer():
    pool = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
            "metadata": {"name": "gpus", "generation": 1},
            "spec": {"gpus": [{"gpu": "h100_sxm", "count": 8}, {"gpu": "l4", "count": 2}]}}
    assert health(pool) == Health("Healthy", "offers 8 h100_sxm, 2 l4")


def test_lua_literal_carries_json_values_exactly():
    lua = require_tool("lua5.1")
    value = {"s": 'a "quoted"\\ line\nnext é', "n": [1, 2.5, -3], "b": [True, False],
             "nested": {"x": None, "y": {"z": "deep"}}}
    program = (f"local v = {lua_literal(value)}\n"
               'io.write(v.s, "|", #v.n, "|", v.n[2], "|", tostring(v.b[2]), "|",'
               ' tostring(v.nested.x), "|", v.nested.y.z)\n')
    out = subprocess.run([lua, "-"], input=program.encode(), capture_output=True, check=True)
    assert out.stdout.decode() == 'a "quoted"\\ line\nnext é|3|2.5|false|nil|deep'
