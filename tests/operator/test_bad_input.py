"""Semantically invalid endpoints end in Failed or Infeasible, say why, post an Event, and
leave no children behind; fixing the cause (a pool appears) lets them go on."""

from __future__ import annotations

import copy

import pytest

from tests.operator.test_reconcile import ENDPOINT, NS, POOL, deployments, endpoint, status


def _condition(st: dict, kind: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == kind)


async def _settled(api, name: str = "chat") -> dict:
    return await api.wait(lambda: status(api, name).get("phase") in ("Failed", "Infeasible")
                          and status(api, name), timeout=60, what="a failure in status")


def _nothing_deployed(api) -> None:
    assert deployments(api) == []
    assert api.get("v1", "Service", NS, "chat") is None


@pytest.mark.parametrize("change,phase,reason,words", [
    ({"model": {"id": "acme/NoSuchModel-7B"}}, "Failed", "UnknownModel",
     ["model.id", "acme/NoSuchModel-7B", "not a bundled model"]),
    ({"hardwarePoolRef": {"name": "missing"}}, "Failed", "HardwarePoolNotFound",
     ["hardwarePoolRef.name", "missing", "existing: gpus"]),
    ({"slo": {"ttftMs": {"p90": 1}, "tpotMs": {"p90": 0.5}}}, "Infeasible", "SLOUnreachable",
     ["no configuration meets the SLO", "Nearest:"]),
    ({"workload": {**ENDPOINT["spec"]["workload"],
                   "arrivals": {"kind": "poisson", "requestsPerSecond": 1000}}},
     "Infeasible", "PoolTooSmall",
     ["more GPUs", "Nearest feasible:", "h100_sxm; 8 h100_sxm available"]),
    ({"workload": {**ENDPOINT["spec"]["workload"],
                   "promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 500}}},
     "Failed", "InvalidSpec", ["workload.promptTokens.p90", "must exceed the mean"]),
    ({"bounds": {"gpuTypes": ["b200_sxm"]}}, "Failed", "InvalidSpec",
     ["bounds.gpuTypes", "not in the hardware pool"]),
    ({"serving": {"extraArgs": ["--max-num-seqs=8"]}}, "Failed", "RenderFailed",
     ["serving.extraArgs.0", "--max-num-seqs is set by the plan"]),
])
async def test_bad_input_is_reported_not_retried_in_a_loop(api, operator_factory, change, phase,
                                                           reason, words):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(**change))
    st = await _settled(api)
    assert st["phase"] == phase, st["message"]
    failing = [c for c in st["conditions"] if c["status"] == "False"]
    assert [c["reason"] for c in failing] == [reason]
    for word in words:
        assert word in st["message"], (word, st["message"])
    _nothing_deployed(api)
    await api.wait(lambda: reason in {e.get("reason") for e in api.events(NS)},
                   what="the Events")
    assert st.get("allocatedGpus", {}) == {}


async def test_a_name_too_long_for_its_children_is_refused(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    body = copy.deepcopy(ENDPOINT)
    body["metadata"]["name"] = "a-very-long-endpoint-name-that-cannot-carry-suffix"
    await api.create(body)
    st = await _settled(api, body["metadata"]["name"])
    assert _condition(st, "Validated")["reason"] == "InvalidName"
    assert "at most 45 characters" in st["message"]


async def test_a_missing_pool_is_retried_when_the_pool_appears(api, operator_factory):
    await operator_factory()
    await api.create(endpoint())
    st = await _settled(api)
    assert _condition(st, "Validated")["reason"] == "HardwarePoolNotFound"
    await api.create(POOL)
    await api.wait(lambda: status(api).get("phase") == "Deploying", timeout=60,
                   what="the endpoint deployed once the pool exists")
    assert len(deployments(api)) == 1


async def test_a_configmap_model_is_planned_from_its_config_and_serves_the_checkpoint(
        api, operator_factory):
    from trilemma.optimizer.catalog import bundled

    await operator_factory()
    await api.create(POOL)
    config_json = bundled._DATA.joinpath(  # the bundled Llama 3.1 8B config.json
        bundled._bundled_files()["meta-llama/Llama-3.1-8B"]).read_text()
    await api.create({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "my-model", "namespace": NS},
                      "data": {"config.json": config_json}})
    await api.create(endpoint(model={"configMap": {"name": "my-model"},
                                     "servedModel": "acme/llama-finetune"}))
    st = await api.wait(lambda: status(api).get("phase") == "Deploying" and status(api),
                        timeout=60, what="a deployment")
    args = deployments(api)[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "acme/llama-finetune" in args
    assert not any(a.endswith("config.json") for a in args)
    assert st["activeConfiguration"]["model"] == "acme/llama-finetune"


async def test_a_missing_model_configmap_is_reported(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(model={"configMap": {"name": "nope"}, "servedModel": "x/y"}))
    st = await _settled(api)
    assert _condition(st, "Validated")["reason"] == "ModelConfigMapNotFound"
    assert "configMap.name='nope'" in st["message"]
