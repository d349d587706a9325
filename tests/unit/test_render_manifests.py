"""Kubernetes manifests from plans: schema-valid, deterministic, multi-node and disaggregated."""

import io
import json
from pathlib import Path

import pytest
import yaml

from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine, KvDtype, QuantRecipe, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.render.command import render_command
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig
from trilemma.optimizer.spec.hardware import GpuGroup

kubernetes_validate = pytest.importorskip("kubernetes_validate")

FIXTURES = Path(__file__).parent / "fixtures" / "render"
K8S_VERSION = "1.30.0"

AGGREGATED = ServingConfig(model="Qwen/Qwen3-8B", replicas=2, worker=WorkerConfig(
    gpu="h100_sxm", tp=2, quant=QuantRecipe.FP8, kv_dtype=KvDtype.FP8,
    spec_method=SpecMethod.EAGLE3, spec_k=3))
MULTI_NODE = ServingConfig(model="deepseek-ai/DeepSeek-V3", worker=WorkerConfig(
    gpu="h100_sxm", tp=8, pp=2, quant=QuantRecipe.FP8, spec_method=SpecMethod.MTP, spec_k=1))
POOL = GpuGroup(gpu="h100_sxm", count=32, node_selector={"pool": "h100"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                              "effect": "NoSchedule"}])


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_deployment_and_service_validate_against_the_kubernetes_schema(engine):
    objects = render.manifests(AGGREGATED, name="chat", engine=engine, namespace="llm",
                               options=render.RenderOptions(pool_group=POOL),
                               hf_token_secret="hf", model_cache_pvc="models")
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "PodDisruptionBudget"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_deployment_carries_name_labels_gpus_probes_and_scheduling():
    dep, svc, _ = render.manifests(AGGREGATED, name="chat", engine="vllm",
                                options=render.RenderOptions(pool_group=POOL),
                                hf_token_secret="hf", model_cache_pvc="models")
    digest = AGGREGATED.layout_hash()
    assert dep["metadata"]["name"] == f"chat-{digest}"
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["trilemma.dev/config-hash"] == digest
    assert labels["app.kubernetes.io/managed-by"] == "trilemma"
    engine = pod["containers"][0]
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    probe = engine["startupProbe"]
    assert probe["httpGet"]["path"] == "/health"
    assert probe["periodSeconds"] * probe["failureThreshold"] == 600
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert engine["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert svc["metadata"]["name"] == "chat"
    assert svc["spec"]["selector"]["trilemma.dev/config-hash"] == digest
    assert svc["spec"]["ports"][0]["port"] == 8000


def test_amd_gpus_request_the_amd_resource():
    cfg = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(gpu="mi300x"))
    dep = render.manifests(cfg, name="chat")[0]
    limits = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"amd.com/gpu": "1"}


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_replica_wider_than_a_node_becomes_a_leader_worker_set(engine):
    objects = render.manifests(MULTI_NODE, name="ds", engine=engine)
    lws, svc, pdb = objects
    kubernetes_validate.validate(svc, K8S_VERSION, strict=True)
    kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert lws["kind"] == "LeaderWorkerSet"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert leader["args"][leader["args"].index("--node-rank") + 1] == "0"
    assert worker["args"][worker["args"].index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
    assert "startupProbe" in leader and "startupProbe" not in worker
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "server-leader"
    leader_labels = template["leaderTemplate"]["metadata"]["labels"]
    assert leader_labels["app.kubernetes.io/component"] == "server-leader"
    if engine == "vllm":
        assert "--headless" in worker["args"]


def test_a_replica_that_does_not_fill_whole_nodes_is_refused():
    cfg = ServingConfig(model="deepseek-ai/DeepSeek-V3",
                        worker=WorkerConfig(gpu="h100_sxm", tp=4, pp=3, quant=QuantRecipe.FP8))
    with pytest.raises(InputError):
        render.manifests(cfg, name="ds")


def test_a_replica_only_change_keeps_the_deployment_name_and_scales_it():
    import dataclasses

    more = dataclasses.replace(AGGREGATED, replicas=AGGREGATED.replicas + 3)
    assert more.config_hash() != AGGREGATED.config_hash()
    before, _, _ = render.manifests(AGGREGATED, name="chat", engine="vllm")
    after, _, _ = render.manifests(more, name="chat", engine="vllm")
    assert after["metadata"]["name"] == before["metadata"]["name"]
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["spec"]["replicas"] == before["spec"]["replicas"] + 3
    wider = dataclasses.replace(AGGREGATED, worker=dataclasses.replace(
        AGGREGATED.worker, tp=AGGREGATED.worker.tp * 2))
    assert render.manifests(wider, name="chat", engine="vllm")[0]["metadata"]["name"] != (
        before["metadata"]["name"])


def test_disaggregated_sglang_renders_pools_router_and_services():
    cfg = ServingConfig(model="Qwen/Qwen3-8B", engine=Engine.SGLANG, mode=Mode.DISAGGREGATED,
                        worker=WorkerConfig(gpu="h100_sxm"), replicas=2,
                        prefill=WorkerConfig(gpu="h100_sxm", tp=2), prefill_replicas=1)
    objects = render.manifests(cfg, name="chat")
    digest = cfg.layout_hash()
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Deployment", f"chat-prefill-{digest}"), ("Deployment", f"chat-decode-{digest}"),
        ("Deployment", f"chat-router-{digest}"), ("Service", "chat"),
        ("Service", "chat-prefill"), ("Service", "chat-decode"),
        ("PodDisruptionBudget", f"chat-prefill-{digest}"),
        ("PodDisruptionBudget", f"chat-decode-{digest}"),
        ("PodDisruptionBudget", f"chat-router-{digest}")]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    router = objects[2]["spec"]["template"]["spec"]["containers"][0]
    assert "--pd-disaggregation" in router["command"]
    assert "resources" not in router or not router["resources"]
    assert objects[3]["spec"]["selector"]["app.kubernetes.io/component"] == "router"


def test_render_yaml_is_byte_identical_and_has_no_yaml_aliases():
    first = render.render_yaml(AGGREGATED, name="chat")
    assert first == render.render_yaml(AGGREGATED, name="chat")
    assert "&id" not in first and "*id" not in first


@pytest.mark.parametrize(("fixture", "cfg", "name"), [
    ("aggregated_vllm.yaml", AGGREGATED, "chat"),
    ("multinode_vllm.yaml", MULTI_NODE, "ds"),
])
def test_rendered_yaml_matches_the_golden_file(fixture, cfg, name):
    assert render.render_yaml(cfg, name=name, engine="vllm") == (FIXTURES / fixture).read_text()


def test_render_command_reads_a_plan_file_and_prints_commands_then_manifests(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"recommended": {"config": AGGREGATED.to_dict()}}))
    out = io.StringIO()
    assert render_command(path, "vllm", name="chat", namespace="llm", image="img:1",
                          out=out) == 0
    text = out.getvalue()
    assert text.startswith("# vllm serve Qwen/Qwen3-8B")
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
    assert docs[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "img:1"


@pytest.mark.parametrize(("content", "field"), [
    ("not json", "plan"),
    ('{"recommended": 3}', "recommended.config"),
    ('[1, 2]', "config"),
    ('{"model": "x"}', "config"),
])
def test_render_command_rejects_bad_plan_files_naming_the_field(tmp_path, content, field):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        render_command(path, "vllm", name="c", namespace="d", image=None, out=io.StringIO())
    assert err.value.field == field
