"""Create -> children and status, readiness, spec change -> new Deployment and Service switch."""

from __future__ import annotations

import copy
import json
import time

import kmock

from tests.support.kube import Api
from trilemma.optimizer.search import Plan

NS = "team-a"
POOL = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
        "metadata": {"name": "gpus"},
        "spec": {"gpus": [{"gpu": "h100_sxm", "count": 8, "pricePerGpuHour": 2.5,
                           "nodeSelector": {"pool": "h100"},
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "effect": "NoSchedule"}]}]}}
ENDPOINT = {
    "apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
    "metadata": {"name": "chat", "namespace": NS, "uid": "uid-chat", "generation": 1},
    "spec": {
        "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
        "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                     "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
                     "arrivals": {"kind": "poisson", "requestsPerSecond": 5}},
        "slo": {"ttftMs": {"p90": 1000}, "tpotMs": {"p90": 50}},
        "hardwarePoolRef": {"name": "gpus"},
        "engine": {"name": "vllm", "vllmImage": "vllm/vllm-openai:v0.11.0"},
        "bounds": {"allowDisaggregation": False},
        "serving": {"extraArgs": ["--disable-log-requests"],
                    "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}]},
    },
}


def endpoint(**spec_changes: object) -> dict:
    body = copy.deepcopy(ENDPOINT)
    body["spec"].update(spec_changes)
    return body


def deployments(api: Api) -> list[dict]:
    return api.list("apps/v1", "Deployment", NS)


def status(api: Api, name: str = "chat") -> dict:
    found = api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, name) or {}
    return found.get("status") or {}


async def make_available(api: Api, deployment: dict) -> None:
    replicas = deployment["spec"]["replicas"]
    await api.patch("apps/v1", "Deployment", NS, deployment["metadata"]["name"],
                    {"status": {"replicas": replicas, "readyReplicas": replicas,
                                "availableReplicas": replicas}})


async def test_create_deploys_children_and_reports_status(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())

    deps = await api.wait(lambda: deployments(api), what="a Deployment")
    st = await api.wait(lambda: status(api).get("phase") == "Deploying" and status(api),
                        what="phase Deploying")
    assert len(deps) == 1
    dep = deps[0]
    active = st["activeConfiguration"]
    assert dep["metadata"]["name"] == f"chat-{active['hash']}"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    labels = dep["metadata"]["labels"]
    assert labels["trilemma.dev/endpoint"] == "chat"
    assert labels["trilemma.dev/config-hash"] == active["hash"]
    assert labels["app.kubernetes.io/managed-by"] == "trilemma"
    pod = dep["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["image"] == "vllm/vllm-openai:v0.11.0"
    assert engine["args"] == [*active["engineArgs"]]
    assert engine["args"][-1] == "--disable-log-requests"
    assert "--tensor-parallel-size" in " ".join(engine["args"]) or active["short"].startswith(
        ("bf16 TP1", "fp8 TP1"))
    gpus_per_pod = int(engine["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod * dep["spec"]["replicas"] == active["gpus"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "VLLM_LOGGING_LEVEL", "value": "INFO"} in engine["env"]
    assert engine["startupProbe"]["failureThreshold"] * engine["startupProbe"][
        "periodSeconds"] == 600
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    svc = api.get("v1", "Service", NS, "chat")
    assert svc["spec"]["selector"]["trilemma.dev/config-hash"] == active["hash"]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    plan = api.get("v1", "ConfigMap", NS, "chat-plan")
    assert '"recommended"' in plan["data"]["plan.json"]
    # Status: predictions, front, conditions, allocation.
    assert st["predictions"]["ttftP90Ms"] <= 1000
    assert st["predictions"]["tpotP90Ms"] <= 50
    assert 1 <= len(st["paretoFront"]) <= 8
    assert sum(p["recommended"] for p in st["paretoFront"]) == 1
    assert st["allocatedGpus"] == {"h100_sxm": active["gpus"]}
    assert st["observedGeneration"] == 1
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Validated"]["status"] == "True"
    assert conditions["Optimized"]["status"] == "True"
    assert conditions["Deployed"]["status"] == "True"
    assert conditions["Ready"]["status"] == "False"
    assert st["lastOptimization"]["candidates"] > 1000

    await make_available(api, dep)
    await api.wait(lambda: status(api).get("phase") == "Ready", what="phase Ready")
    await api.wait(lambda: {"Planned", "Deployed"} <= {
        e.get("reason") for e in api.events(NS)}, what="the Events")
    # Every Event was stored under a name of its own (Kopf posts them with generateName):
    # none was refused with 409 Conflict.
    posts = [r for r in api.server[kmock.resource("v1/events")] if r.method.upper() == "POST"]
    stored = api.list("v1", "Event", NS)
    assert len(posts) >= 2 and len(stored) == len(posts)
    assert len({e["metadata"]["name"] for e in stored}) == len(stored)


async def wait_phase(api: Api, phase: str, name: str = "chat", timeout: float = 60) -> dict:
    return await api.wait(lambda: status(api, name).get("phase") == phase and status(api, name),
                          timeout=timeout, what=f"{name} in phase {phase}")


def condition(st: dict, kind: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == kind)


async def start_rollout(api: Api) -> dict:
    """Prompts four times longer (generation 2): a different plan, so a new hashed
    Deployment; returns the status once its rollout is Progressing."""
    longer = {"kind": "lognormal", "mean": 4000, "p90": 8000}
    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"metadata": {"generation": 2},
                     "spec": {"workload": {**ENDPOINT["spec"]["workload"],
                                           "promptTokens": longer}}})
    return await api.wait(lambda: (status(api).get("rollout") or {}).get("state")
                          == "Progressing" and status(api), what="a rollout")


async def test_spec_change_rolls_out_beside_the_old_configuration(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    first = await wait_phase(api, "Deploying")
    old = first["activeConfiguration"]["hash"]
    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{old}"))
    await wait_phase(api, "Ready")

    rolling = await start_rollout(api)
    new = rolling["activeConfiguration"]["hash"]
    assert new != old and rolling["rollout"] == {**rolling["rollout"], "fromHash": old,
                                                 "toHash": new}
    names = {d["metadata"]["name"] for d in deployments(api)}
    assert names == {f"chat-{old}", f"chat-{new}"}
    # The Service keeps sending traffic to the old configuration until the new one is up.
    assert api.get("v1", "Service", NS, "chat")["spec"]["selector"][
        "trilemma.dev/config-hash"] == old
    assert rolling["phase"] == "Deploying"
    assert condition(rolling, "Ready")["status"] == "True"
    held = rolling["allocatedGpus"]["h100_sxm"]
    assert held == first["activeConfiguration"]["gpus"] + rolling["activeConfiguration"]["gpus"]

    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{new}"))
    done = await wait_phase(api, "Ready")
    assert api.get("v1", "Service", NS, "chat")["spec"]["selector"][
        "trilemma.dev/config-hash"] == new
    await api.wait(lambda: [d["metadata"]["name"] for d in deployments(api)] == [f"chat-{new}"],
                   what="the old Deployment removed")
    assert done["rollout"]["state"] == "Complete"
    assert done["servingHash"] == new
    assert done["allocatedGpus"] == {"h100_sxm": done["activeConfiguration"]["gpus"]}
    assert done["observedGeneration"] == 2
    await api.wait(lambda: "RolledOut" in {e.get("reason") for e in api.events(NS)},
                   what="the Events")


async def test_rollout_that_never_becomes_ready_is_rolled_back(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    old = (await wait_phase(api, "Deploying"))["activeConfiguration"]["hash"]
    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{old}"))
    await wait_phase(api, "Ready")
    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"spec": {"workload": {**ENDPOINT["spec"]["workload"], "promptTokens": {
                        "kind": "lognormal", "mean": 4000, "p90": 8000}}}})
    rolling = await api.wait(lambda: (status(api).get("rollout") or {}).get("state")
                             == "Progressing" and status(api), what="a rollout")
    new = rolling["rollout"]["toHash"]
    # Time passes beyond the progress deadline (KMock has no clock to wait on).
    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"status": {"rollout": {**rolling["rollout"],
                                            "deadline": "2020-01-01T00:00:00Z"}}})
    failed = await api.wait(lambda: (status(api).get("rollout") or {}).get("state")
                            == "Failed" and status(api), what="the rollback")
    assert [d["metadata"]["name"] for d in deployments(api)] == [f"chat-{old}"]
    assert api.get("v1", "Service", NS, "chat")["spec"]["selector"][
        "trilemma.dev/config-hash"] == old
    assert failed["servingHash"] == old
    assert new in failed["rollout"]["message"]
    assert condition(failed, "Deployed")["reason"] == "RolloutFailed"
    assert failed["phase"] == "Ready"  # the old configuration never stopped serving
    await api.wait(lambda: "RolloutFailed" in {e.get("reason") for e in api.events(NS)},
                   what="the Events")


async def test_recommend_only_deploys_nothing(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(rollout={"autoApply": False}))
    st = await wait_phase(api, "Pending", timeout=60)
    await api.wait(lambda: condition(status(api), "Optimized")["status"] == "True",
                   what="a plan")
    st = status(api)
    assert st["activeConfiguration"]["applied"] is False
    assert condition(st, "Deployed")["reason"] == "RecommendOnly"
    assert api.get("v1", "ConfigMap", NS, "chat-plan") is not None
    assert deployments(api) == []
    assert api.get("v1", "Service", NS, "chat") is None
    assert st.get("allocatedGpus", {}) == {}


async def test_deleting_the_endpoint_removes_its_children(api, operator_factory):
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    await wait_phase(api, "Deploying")
    await api.delete("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat")
    await api.wait(lambda: api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat")
                   is None, what="the endpoint gone (finalizer released)")
    assert deployments(api) == []
    assert api.get("v1", "Service", NS, "chat") is None
    assert api.get("v1", "ConfigMap", NS, "chat-plan") is None


async def test_restart_reuses_the_plan_and_writes_nothing(api, operator_factory):
    op = await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    first = await wait_phase(api, "Deploying")
    dep = api.get("apps/v1", "Deployment", NS, f"chat-{first['activeConfiguration']['hash']}")
    await make_available(api, dep)
    await wait_phase(api, "Ready")
    await op.stop()
    # As the stopped operator left it (its timers may have written after Ready).
    ready = status(api)
    posts, patches = api.requests("post"), api.requests("patch")

    again = await operator_factory()
    # The resumed endpoint reuses the stored plan: no search, no new objects, no changes.
    await api.wait(lambda: again.runtime.metrics.registry.get_sample_value(
        "trilemma_reconciles_total", {"result": "ok"}), what="the resume reconcile")
    assert again.runtime.metrics.registry.get_sample_value(
        "trilemma_optimization_duration_seconds_count") == 0
    assert len(deployments(api)) == 1
    assert status(api) == ready
    new_posts = [r for r in api.server["post"]][posts:]
    assert [r.path for r in new_posts if "/events" not in r.path] == []
    # Kopf's own bookkeeping may patch annotations; the operator patches nothing.
    owned = [r for r in list(api.server["patch"])[patches:]
             if "optimizedendpoints" not in str(r.url)]
    assert owned == []


async def test_stop_does_not_wait_out_kopfs_grace_for_hung_tasks(api, operator_factory):
    """Kopf, once its root tasks end, waits 5 s for every task that appeared since it started:
    the caller of `stop` (which waits for Kopf) and a timer re-spawned while the workers drain
    are none of its to wait for. Each stop, in every operator test and the demo, cost 5 s."""
    op = await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    await wait_phase(api, "Deploying")  # its resync timer running
    started = time.monotonic()
    await op.stop()
    assert time.monotonic() - started < 4.0


async def test_a_stored_plan_that_does_not_decode_is_planned_again(api, operator_factory):
    op = await operator_factory()
    await api.create(POOL)
    await api.create(endpoint())
    first = await wait_phase(api, "Deploying")
    await op.stop()
    stored = json.loads(api.get("v1", "ConfigMap", NS, "chat-plan")["data"]["plan.json"])
    # Another format, or a hand edit: the stored plan no longer decodes.
    stored["recommended"]["config"]["worker"]["tp"] = "two"
    await api.patch("v1", "ConfigMap", NS, "chat-plan",
                    {"data": {"plan.json": json.dumps(stored)}})

    again = await operator_factory()
    # Treated as absent: searched again (the same input, so the same plan), stored again.
    await api.wait(lambda: again.runtime.metrics.registry.get_sample_value(
        "trilemma_optimization_duration_seconds_count") == 1, what="a new search")
    rewritten = await api.wait(lambda: (lambda text: "\"two\"" not in text and text)(
        api.get("v1", "ConfigMap", NS, "chat-plan")["data"]["plan.json"]),
        what="the plan stored again")
    plan = Plan.from_dict(json.loads(rewritten))
    assert plan.recommended.config.config_hash() == first["activeConfiguration"]["hash"]
    assert len(deployments(api)) == 1
