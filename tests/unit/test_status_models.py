"""The closed loop's status fields as models: the wire form is the one written before the models
existed (byte for byte), the CRD names every key written, and a misspelled key fails at its
writer.

The `legacy_*` functions are the hand-written encoders as they were before the models (commit
781cac4), kept here as the reference the models must reproduce: status already stored by an
older operator must read back, and re-encode, unchanged.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from tests.support.observations import NOW, observed
from trilemma.operator import calibration, retune, retune_history
from trilemma.operator.acceptance import Acceptance
from trilemma.operator.drift import WorkloadSummary
from trilemma.operator.endpoint import Endpoint
from trilemma.operator.estimator import (
    Availability,
    LatencyStats,
    LengthStats,
    MetricsReason,
    ObservedWorkload,
)
from trilemma.operator.resources import (
    DriftThresholds,
    OptimizedEndpointStatus,
    Retune,
    to_wire,
)
from trilemma.operator.status_models import (
    CalibrationStatus,
    ObservedWorkloadStatus,
    RetuneHistoryEntry,
    RetuneStatus,
)
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.search import Prediction
from trilemma.tools import crdgen

Obj = dict[str, Any]
THRESHOLDS = DriftThresholds()


# ---- the encoders before the models (the reference) --------------------------------------


def _sig(value: float) -> float:
    return float(f"{value:.4g}")


def _stamp(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(round(unix_s), datetime.UTC).isoformat().replace(
        "+00:00", "Z")


def legacy_observed(o: ObservedWorkload) -> Obj:
    out: Obj = {"windowSeconds": o.window_s, "observedAt": _stamp(o.observed_at),
                "samples": round(o.samples)}
    for key, value in (("rateRps", o.rate_rps), ("prefixHitShare", o.prefix_hit_share),
                       ("burstinessCv", o.burstiness_cv), ("specAcceptance", o.spec_acceptance),
                       ("queueWaitMs", o.queue_wait_ms), ("kvCacheUsage", o.kv_cache_usage),
                       ("stalenessSeconds", o.staleness_s)):
        if value is not None:
            out[key] = _sig(value)
    for key, stats in (("promptTokens", o.prompt_tokens), ("outputTokens", o.output_tokens),
                       ("ttftMs", o.ttft_ms), ("itlMs", o.itl_ms)):
        figures = {k: _sig(v) for k, v in vars(stats).items() if v is not None}
        if figures:
            out[key] = figures
    return out


def legacy_retune(s: retune.RetuneState) -> Obj:
    out: Obj = {"driftChecks": s.drift_checks, "violationChecks": s.violation_checks}
    for key, t in (("lastCheckTime", s.last_check), ("lastReplanTime", s.last_replan),
                   ("lastRolloutTime", s.last_rollout)):
        if t is not None:
            out[key] = _stamp(t)
    if s.last_replan_workload is not None:
        out["lastReplanWorkload"] = s.last_replan_workload
    if s.failed:
        out["failed"] = [
            {"workload": f.digest, "time": _stamp(f.time), "reason": f.reason,
             "basis": f.basis, "figures": {
                 k: _sig(v) for k, v in (("rateRps", f.workload.rate_rps),
                                         ("promptTokens", f.workload.prompt_tokens),
                                         ("outputTokens", f.workload.output_tokens),
                                         ("prefixShare", f.workload.prefix_share))
                 if v is not None}}
            for f in s.failed]
    return out


def legacy_event(e: retune_history.RetuneEvent) -> Obj:
    out: Obj = {"time": _stamp(e.time), "action": e.action.value, "reason": e.reason}
    for key, value in (("cause", e.cause), ("fromHash", e.from_hash), ("toHash", e.to_hash)):
        if value is not None:
            out[key] = value
    if e.figures:
        out["figures"] = {k: e.figures[k] for k in sorted(e.figures)}
    return out


def legacy_calibration(c: calibration.Calibration) -> Obj:
    def factor(f: calibration.Factor) -> Obj:
        out: Obj = {"factor": _sig(f.value), "pairs": f.pairs, "applied": f.applied}
        if f.last_ratio is not None:
            out["lastRatio"] = _sig(f.last_ratio)
        return out

    out: Obj = {"ttft": factor(c.ttft), "tpot": factor(c.tpot)}
    if c.updated is not None:
        out["updated"] = _stamp(c.updated)
    if c.config_hash is not None:
        out["configHash"] = c.config_hash
    return out


# ---- realistic values -------------------------------------------------------------------


def observations() -> list[ObservedWorkload]:
    full = ObservedWorkload(
        engine=Engine.SGLANG, window_s=600, observed_at=NOW + 0.6,
        availability=Availability(reason=MetricsReason.AVAILABLE, message="ok"),
        rate_rps=12.345678, prompt_tokens=LengthStats(mean=4123.4567, p50=3000.0, p90=9876.54,
                                                      p99=18000.0),
        output_tokens=LengthStats(mean=201.99, p90=512.0), prefix_hit_share=0.123456,
        burstiness_cv=1.61803, spec_acceptance=0.7123, ttft_ms=LatencyStats(p50=180.5, p90=432.1),
        itl_ms=LatencyStats(p50=21.0, p90=35.55, p99=80.0), queue_wait_ms=12.0,
        kv_cache_usage=0.45, samples=7404.6, staleness_s=7.5)
    missing = ObservedWorkload(
        engine=Engine.VLLM, window_s=900, observed_at=NOW,
        availability=Availability(reason=MetricsReason.MISSING, message="none"))
    return [full, missing, observed(), observed(prefix=None, ttft=LatencyStats(p90=250.0))]


def summary(rate: float, prefix: float | None) -> WorkloadSummary:
    return WorkloadSummary(rate_rps=rate, prompt_tokens=4120.123, output_tokens=200.0,
                           prefix_share=prefix)


def retune_states() -> list[retune.RetuneState]:
    failed = retune.record_failure(retune.RetuneState(), NOW - 600, summary(12.34567, None),
                                   "infeasible: no GPUs", thresholds=THRESHOLDS)
    failed = retune.record_failure(failed, NOW - 60, summary(30.0, 0.25), "not cheaper",
                                   thresholds=THRESHOLDS, basis="digest1")
    return [retune.RetuneState(),
            retune.RetuneState(last_check=NOW, drift_checks=1, violation_checks=2,
                               last_replan=NOW - 900, last_replan_workload="abcdef0123",
                               last_rollout=NOW - 1800.4, failed=failed.failed)]


def events() -> list[retune_history.RetuneEvent]:
    state = retune.RetuneState(last_check=NOW - 300, drift_checks=1)
    planned = WorkloadSummary(rate_rps=10.0, prompt_tokens=1000.0, output_tokens=200.0,
                              prefix_share=0.3)
    check = retune.Check(now=NOW, observed=observed(prompt=4120.0), planned=planned)
    decision = retune.decide(state, check, Retune(enabled=True, cooldown_seconds=0))
    acceptance = Acceptance(roll_out=True, reason="cheaper", improvement=0.5,
                            current_hash="aaaa", candidate_hash="bbbb",
                            figures={"improvement": 0.5, "currentCostPerHour": 12.5})
    return [retune_history.RetuneEvent.of_decision(decision, NOW, "aaaa"),
            retune_history.RetuneEvent.of_acceptance(acceptance, NOW + 60),
            retune_history.RetuneEvent(time=NOW + 120, action=retune_history.Step.FAILED,
                                       reason="rollout failed")]


def calibrations() -> list[calibration.Calibration]:
    predicted = Prediction(ttft_p50_ms=150.0, ttft_p90_ms=200.0, tpot_p50_ms=20.0,
                           tpot_p90_ms=25.0, e2e_p99_ms=6000.0, capacity_rps=5.0,
                           cost_per_hour=10.0, cost_per_mtok=1.0, quality=None)
    cal = calibration.Calibration()
    for i in range(4):
        seen = observed(samples=5000.0, at=NOW + 300 * i,
                        ttft=LatencyStats(p90=263.3 + i), itl=LatencyStats(p90=27.77))
        cal = calibration.update(cal, predicted=predicted, observed=seen,
                                 config_hash="abcd1234")
    return [calibration.Calibration(), cal]


CASES: list[tuple[str, type[pydantic.BaseModel], list[tuple[Obj, pydantic.BaseModel]]]] = [
    ("observedWorkload", ObservedWorkloadStatus,
     [(legacy_observed(o), o.to_status()) for o in observations()]),
    ("retune", RetuneStatus, [(legacy_retune(s), s.to_status()) for s in retune_states()]),
    ("retuneHistory", RetuneHistoryEntry,
     [(legacy_event(e), e.to_status()) for e in events()]),
    ("calibration", CalibrationStatus,
     [(legacy_calibration(c), c.to_status()) for c in calibrations()]),
]


def cases() -> Iterator[tuple[str, type[pydantic.BaseModel], Obj, pydantic.BaseModel]]:
    for field, model, pairs in CASES:
        for old, new in pairs:
            yield field, model, old, new


# ---- the wire form ------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "model", "old", "new"), list(cases()))
def test_the_models_write_what_the_old_encoders_wrote(field: str, model: Any, old: Obj,
                                                      new: Any) -> None:
    # Byte for byte, key order included: a patch of stored status must not churn.
    assert json.dumps(to_wire(new)) == json.dumps(old), field
    assert json.dumps(to_wire(model.model_validate(old))) == json.dumps(old), field
    # The JSON the API server returns (ints where a float was whole) reads back the same.
    assert to_wire(model.model_validate(json.loads(json.dumps(old)))) == old


def test_the_decoders_read_the_old_wire_form_back() -> None:
    # The wire form rounds (times to the second, figures to 4 digits): what reads back
    # encodes to the same wire form.
    for s in retune_states():
        assert retune.RetuneState.from_status(legacy_retune(s)).to_status() == s.to_status()
    for c in calibrations():
        back = calibration.Calibration.from_status(legacy_calibration(c))
        assert back.to_status() == c.to_status()
    history = [legacy_event(e) for e in events()]
    hold = retune_history.RetuneEvent(time=NOW + 600, action=retune_history.Step.HOLD,
                                      reason="cooldown", cause="Cooldown")
    appended = retune_history.append(history, hold)
    assert [to_wire(e) for e in appended] == [*history, legacy_event(hold)]


def _unnamed(node: Obj, value: Any, path: str = "") -> list[str]:
    """Keys of `value` the structural schema `node` does not name: what pruning would drop."""
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _unnamed(node["items"], v, f"{path}[{i}]")]
    if not isinstance(value, dict) or node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    extra = node.get("additionalProperties")
    props = node.get("properties", {})
    out = []
    for key, v in value.items():
        if key in props:
            out += _unnamed(props[key], v, f"{path}.{key}")
        elif isinstance(extra, dict):
            out += _unnamed(extra, v, f"{path}.{key}")
        else:
            out.append(f"{path}.{key}")
    return out


@pytest.mark.parametrize("field", [f for f, _, _ in CASES])
def test_the_crd_names_every_key_written(field: str) -> None:
    crd = next(d for d in crdgen.crd_documents() if d["spec"]["names"]["kind"]
               == "OptimizedEndpoint")
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"][field]
    assert "x-kubernetes-preserve-unknown-fields" not in node  # a schema, not a free-form map
    for f, _, old, new in cases():
        if f == field:
            wire = [to_wire(new)] if field == "retuneHistory" else to_wire(new)
            assert _unnamed(node, wire) == [] and old


# ---- the writer ---------------------------------------------------------------------------


def endpoint() -> Endpoint:
    return Endpoint.of({"metadata": {"name": "ep", "namespace": "ns"}, "status": {}})


def test_a_misspelled_key_is_refused_at_the_writer() -> None:
    ep = endpoint()
    good = legacy_observed(observations()[0])
    ep.put(observed_workload=good)
    assert ep.status["observedWorkload"] == good
    with pytest.raises(pydantic.ValidationError, match="rateRPS"):
        ep.put(observed_workload={**good, "rateRPS": 1.0})
    with pytest.raises(pydantic.ValidationError, match="driftCheck"):
        ep.put(retune={"driftCheck": 1})
    with pytest.raises(pydantic.ValidationError, match="lastratio"):
        ep.put(calibration={"ttft": {"factor": 1.2, "lastratio": 1.1}})
    with pytest.raises(pydantic.ValidationError, match="action"):
        ep.put(retune_history=[{"time": "2023-11-14T22:13:20Z", "action": "Rollout",
                                "reason": "typo in the action"}])
    assert ep.status["observedWorkload"] == good  # a refused write changes nothing


def test_the_bounds_in_code_are_schema_bounds() -> None:
    status = crdgen.crd_documents()
    crd = next(d for d in status if d["spec"]["names"]["kind"] == "OptimizedEndpoint")
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"]
    assert props["retune"]["properties"]["failed"]["maxItems"] == retune.POLICY.max_failed
    assert props["retuneHistory"]["maxItems"] == 10
    many = retune.RetuneState(failed=tuple(
        retune.Failure(workload=summary(float(i + 1), None), digest=str(i), time=NOW,
                       reason="r") for i in range(retune.POLICY.max_failed + 1)))
    with pytest.raises(pydantic.ValidationError, match="at most 5"):
        many.to_status()
    history: list[RetuneHistoryEntry] = []
    for i in range(12):
        history = retune_history.append(history, retune_history.RetuneEvent(
            time=NOW + i, action=retune_history.Step.REPLAN, reason=f"drift {i}"))
    assert len(history) == 10
    with pytest.raises(pydantic.ValidationError, match="at most 10"):
        OptimizedEndpointStatus(retune_history=[*history, history[0]])
