"""A pool of mixed GPU types: the operator deploys a plan whose replicas span them."""

from __future__ import annotations

import copy

from tests.operator.test_reconcile import ENDPOINT, NS, deployments, make_available, status

POOL = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
        "metadata": {"name": "gpus"},
        "spec": {"gpus": [
            {"gpu": "h100_sxm", "count": 2, "nodeSelector": {"pool": "h100"},
             "tolerations": [{"key": "h100", "operator": "Exists", "effect": "NoSchedule"}]},
            {"gpu": "l40s", "count": 8, "nodeSelector": {"pool": "l40s"},
             "tolerations": [{"key": "l40s", "operator": "Exists", "effect": "NoSchedule"}]},
        ]}}


def mixed_endpoint() -> dict:
    body = copy.deepcopy(ENDPOINT)
    # tests/unit/fixtures/search/mixed_pool.yaml: 90 req/s, more than either type carries.
    body["spec"].update(
        workload={"promptTokens": {"kind": "fixed", "value": 1024},
                  "outputTokens": {"kind": "fixed", "value": 256},
                  "arrivals": {"kind": "poisson", "requestsPerSecond": 90}},
        slo={"ttftMs": {"p90": 2000}, "tpotMs": {"p90": 60}}, objective="min_cost",
        bounds={"allowDisaggregation": False, "quantizations": ["bf16", "fp8"],
                "kvDtypes": ["bf16"], "speculation": ["none"], "maxTensorParallel": 2,
                "maxPipelineParallel": 1})
    return body


async def test_a_mixed_plan_deploys_one_workload_per_gpu_type(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(mixed_endpoint())
    st = await api.wait(lambda: status(api).get("phase") == "Deploying" and status(api),
                        timeout=120, what="phase Deploying")
    active = st["activeConfiguration"]
    assert set(active["gpusByType"]) == {"h100_sxm", "l40s"}
    assert st["allocatedGpus"] == active["gpusByType"]
    deps = sorted(deployments(api), key=lambda d: d["metadata"]["name"])
    assert [d["metadata"]["name"] for d in deps] == [f"chat-p0-{active['hash']}",
                                                     f"chat-p1-{active['hash']}"]
    placed = {d["spec"]["template"]["spec"]["nodeSelector"]["pool"] for d in deps}
    assert placed == {"h100", "l40s"}
    for d in deps:
        pod = d["spec"]["template"]["spec"]
        assert pod["tolerations"][0]["key"] == pod["nodeSelector"]["pool"]
    service = api.get("v1", "Service", NS, "chat")
    assert service is not None
    for d in deps:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    # Both types' workloads available: the endpoint is Ready and still holds both types.
    for d in deps:
        await make_available(api, d)
    st = await api.wait(lambda: status(api).get("phase") == "Ready" and status(api),
                        timeout=120, what="phase Ready")
    assert st["allocatedGpus"] == active["gpusByType"]
