"""Endpoints drawing on one HardwarePool: each plans with what the others leave."""

from __future__ import annotations

import copy

from tests.operator.test_reconcile import ENDPOINT, NS, POOL, status


def named(name: str, uid: str) -> dict:
    body = copy.deepcopy(ENDPOINT)
    body["metadata"].update(name=name, uid=uid)
    # Cheapest plans: each endpoint needs few GPUs, so three fit only partly into a small pool.
    body["spec"]["objective"] = "min_cost"
    return body


async def test_two_endpoints_share_a_pool_and_a_third_waits_for_gpus(api, operator_factory):
    await operator_factory()
    pool = copy.deepcopy(POOL)
    pool["spec"]["gpus"][0]["count"] = 2
    await api.create(pool)
    await api.create(named("a", "uid-a"))
    st_a = await api.wait(lambda: status(api, "a").get("phase") == "Deploying"
                          and status(api, "a"), timeout=60, what="a deployed")
    held_a = st_a["allocatedGpus"]["h100_sxm"]
    assert held_a == 1, "the cheapest plan for this load is one GPU"
    await api.create(named("b", "uid-b"))
    st_b = await api.wait(lambda: status(api, "b").get("phase") == "Deploying"
                          and status(api, "b"), timeout=60, what="b deployed")
    assert st_b["allocatedGpus"]["h100_sxm"] == 1
    # Nothing is left for a third: it waits, naming who holds the GPUs.
    await api.create(named("c", "uid-c"))
    st_c = await api.wait(lambda: status(api, "c").get("phase") == "Infeasible"
                          and status(api, "c"), timeout=60, what="c infeasible")
    assert "team-a/a" in st_c["message"] and "team-a/b" in st_c["message"]
    assert api.list("apps/v1", "Deployment", NS) and all(
        d["metadata"]["labels"]["trilemma.dev/endpoint"] in ("a", "b")
        for d in api.list("apps/v1", "Deployment", NS))
    # Deleting one endpoint frees its GPU; the waiting one gets it.
    await api.delete("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "a")
    st_c = await api.wait(lambda: status(api, "c").get("phase") == "Deploying"
                          and status(api, "c"), timeout=60, what="c deployed after a left")
    assert st_c["allocatedGpus"] == {"h100_sxm": 1}


async def test_pod_monitor_is_created_when_its_crd_exists(api, operator_factory, kube_env):
    import kmock

    kube_env.resources["monitoring.coreos.com/v1/podmonitors"] = kmock.ResourceInfo(
        kind="PodMonitor", namespaced=True, verbs={"get", "list", "create", "patch", "delete"})
    await operator_factory()
    await api.create({"apiVersion": "apiextensions.k8s.io/v1",
                      "kind": "CustomResourceDefinition",
                      "metadata": {"name": "podmonitors.monitoring.coreos.com"},
                      "spec": {"group": "monitoring.coreos.com"}})
    await api.create(POOL)
    await api.create(copy.deepcopy(ENDPOINT))
    monitor = await api.wait(lambda: api.get("monitoring.coreos.com/v1", "PodMonitor", NS,
                                             "chat"), timeout=60, what="a PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["trilemma.dev/endpoint"] == "chat"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
