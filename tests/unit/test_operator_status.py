"""Status patches: only what changed, and keys that vanished (at any depth) sent as null."""

from typing import Any

import pydantic
import pytest

from trilemma.operator import status
from trilemma.operator.endpoint import Endpoint
from trilemma.operator.resources import RolloutState, RolloutStatus


def test_a_patch_nulls_keys_that_vanished_inside_nested_objects():
    # A merge patch merges nested objects: without the null, the gamma `cv` would stay on
    # the server under a poisson workload and make the stored workload unreadable.
    current = {"tunedWorkload": {"workload": {"arrivals": {
        "kind": "gamma", "requestsPerSecond": 4, "cv": 0.8}}}, "phase": "Ready"}
    desired = {"tunedWorkload": {"workload": {"arrivals": {
        "kind": "poisson", "requestsPerSecond": 4}}}, "phase": "Ready"}
    patch = status.patch_for(current, desired, ["tunedWorkload", "phase"])
    assert patch == {"tunedWorkload": {"workload": {"arrivals": {"kind": "poisson",
                                                                 "cv": None}}}}


def test_a_patch_is_empty_when_nothing_changed_and_nulls_dropped_top_level_keys():
    same = {"phase": "Ready", "rollout": {"state": "Complete"}}
    assert status.patch_for(same, dict(same), ["phase", "rollout"]) == {}
    assert status.patch_for(same, {"phase": "Ready"}, ["phase", "rollout"]) == {
        "rollout": None}
    # Keys the operator does not own are never touched.
    assert status.patch_for({"kopf": {"x": 1}}, {}, ["phase"]) == {}


def test_a_condition_keeps_its_transition_time_while_its_status_holds():
    first = status.set_condition([], status.ConditionType.READY, False, "Unavailable", "",
                                 generation=1, now="2026-01-01T00:00:00Z")
    again = status.set_condition(first, status.ConditionType.READY, False, "Unavailable",
                                 "still", generation=1, now="2026-01-01T00:05:00Z")
    flipped = status.set_condition(again, status.ConditionType.READY, True, "Available", "",
                                   generation=1, now="2026-01-01T00:09:00Z")
    assert again[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:09:00Z"


def test_the_printer_summary_and_gpu_count_come_from_the_serving_config():
    from trilemma.optimizer.catalog import QuantRecipe, SpecMethod
    from trilemma.optimizer.search import Mode, ServingConfig, WorkerConfig

    agg = ServingConfig(model="m", replicas=3, worker=WorkerConfig(
        gpu="h100_sxm", tp=2, quant=QuantRecipe.FP8, spec_method=SpecMethod.EAGLE3,
        spec_k=3))
    assert status.short_summary(agg) == "fp8 TP2 eagle3x3"
    assert status.config_gpus(agg) == {"h100_sxm": 6}
    disagg = ServingConfig(model="m", mode=Mode.DISAGGREGATED, replicas=2,
                           worker=WorkerConfig(gpu="h100_sxm", tp=2),
                           prefill=WorkerConfig(gpu="h100_sxm", tp=4),
                           prefill_replicas=1)
    assert status.short_summary(disagg) == "bf16 TP2 disagg"
    assert status.config_gpus(disagg) == {"h100_sxm": 2 * 2 + 4}


class Recorder:
    """The status writes a commit sends."""

    def __init__(self) -> None:
        self.patches: list[Any] = []

    async def patch(self, ref: Any, patch: Any, *, subresource: str | None = None) -> Any:
        self.patches.append((subresource, patch))
        return {}


async def test_a_status_field_the_crd_does_not_declare_is_never_written():
    """Status goes through the pydantic status models (which generate the CRD): an undeclared
    field fails before any request, instead of being pruned by the API server."""
    kube = Recorder()
    ep = Endpoint.of({"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
                      "metadata": {"name": "chat", "namespace": "team-a"}, "spec": {}})
    ep.status["rollout"] = {"toHash": "abc", "state": "Progressing", "started": "t",
                            "deadline": "t", "undeclared": 1}
    with pytest.raises(pydantic.ValidationError):
        await ep.commit(kube)  # type: ignore[arg-type]
    assert kube.patches == []
    del ep.status["rollout"]["undeclared"]
    assert await ep.commit(kube)  # type: ignore[arg-type]
    # With the kstatus conditions every write derives (operator/health.py).
    assert kube.patches == [("status", {"status": {"rollout": ep.status["rollout"],
                                                   "conditions": ep.status["conditions"]}})]


def test_status_fields_are_written_through_the_status_models():
    ep = Endpoint.of({"metadata": {"name": "a", "generation": 2}, "status": {}})
    ep.put(allocated_gpus={"h100_sxm": 2}, spec_digest="d", cost_per_hour=3)
    assert ep.status == {"allocatedGpus": {"h100_sxm": 2}, "specDigest": "d",
                         "costPerHour": 3.0}
    # A value the models refuse fails at its writer, and nothing is written.
    with pytest.raises(pydantic.ValidationError):
        ep.put(allocated_gpus={"h100_sxm": "two"})
    with pytest.raises(KeyError):
        ep.put(no_such_field=1)
    assert ep.status["allocatedGpus"] == {"h100_sxm": 2}
    ep.put(spec_digest=None)
    assert "specDigest" not in ep.status
    ep.put(rollout=RolloutStatus(to_hash="bbbb", state=RolloutState.PROGRESSING,
                                 started="2026-01-01T00:00:00Z",
                                 deadline="2026-01-01T00:30:00Z"))
    ep.update_rollout(state=RolloutState.COMPLETE, message="available")
    assert ep.status["rollout"] == {"toHash": "bbbb", "state": "Complete",
                                    "started": "2026-01-01T00:00:00Z",
                                    "deadline": "2026-01-01T00:30:00Z",
                                    "message": "available", "fromGpus": {}}
