"""Gateway API InferencePool and endpoint picker: valid against the upstream CRD (shipped in
tests/data/gateway-api-inference-extension/) and Kubernetes' schemas, selecting what the
endpoint Service selects, stable across rollouts, and off unless asked for."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from trilemma.optimizer import cli, render
from trilemma.optimizer.catalog import Engine, QuantRecipe
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.render import inference_pool
from trilemma.optimizer.render.command import render_command
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

CRD = (Path(__file__).resolve().parents[1] / "data" / "gateway-api-inference-extension"
       / "inference.networking.k8s.io_inferencepools.yaml")
K8S_VERSION = "1.30.0"
# The CRD's CEL rules, which jsonschema cannot run; pool_errors checks each in Python, and
# test_the_shipped_crd_has_exactly_the_cel_rules_checked_here notices if the CRD gains one.
CEL_RULES = {
    "spec.endpointPickerRef": ("self.kind != 'Service' || has(self.port)",),
    "spec.targetPorts": ("self.all(p1, self.exists_one(p2, p1.number==p2.number))",),
}

AGGREGATED = ServingConfig(model="Qwen/Qwen3-8B", replicas=2,
                           worker=WorkerConfig(gpu="h100_sxm", tp=2))
MULTI_NODE = ServingConfig(model="deepseek-ai/DeepSeek-V3", worker=WorkerConfig(
    gpu="h100_sxm", tp=8, pp=2, quant=QuantRecipe.FP8))
DISAGGREGATED = ServingConfig(
    model="Qwen/Qwen3-8B", engine=Engine.SGLANG, mode=Mode.DISAGGREGATED,
    worker=WorkerConfig(gpu="h100_sxm"), replicas=2,
    prefill=WorkerConfig(gpu="h100_sxm", tp=2), prefill_replicas=1)
PLANS = [pytest.param(AGGREGATED, "vllm", id="aggregated-vllm"),
         pytest.param(AGGREGATED, "sglang", id="aggregated-sglang"),
         pytest.param(MULTI_NODE, "vllm", id="multi-node-vllm"),
         pytest.param(DISAGGREGATED, "sglang", id="disaggregated-sglang")]


def _v1_version() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["spec"]["group"] == "inference.networking.k8s.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version


def _cel_rules(node: dict[str, Any], path: str = "") -> dict[str, tuple[str, ...]]:
    rules = tuple(r["rule"] for r in node.get("x-kubernetes-validations", []))
    found = {path: rules} if rules else {}
    for name, child in node.get("properties", {}).items():
        found.update(_cel_rules(child, f"{path}.{name}".lstrip(".")))
    return found


def _strict(node: Any) -> Any:
    """The schema for jsonschema: without Kubernetes' x-kubernetes-* extensions (CEL, list
    types), and closed where it lists properties: the API server would prune an unknown field
    without a word, so a rendered one is a bug to refuse here."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and isinstance(node["properties"], dict):
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = _strict(_v1_version()["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def pool_errors(pool: dict[str, Any]) -> list[str]:
    """Why the API server would refuse `pool`: the structural schema, then the CEL rules."""
    errors = [e.message for e in _validator().iter_errors(pool)]
    spec = pool.get("spec", {})
    ref = spec.get("endpointPickerRef")
    if isinstance(ref, dict) and ref.get("kind", "Service") == "Service" and "port" not in ref:
        errors.append("port is required when kind is 'Service' or unspecified")
    numbers = [p.get("number") for p in spec.get("targetPorts", [])]
    if len(numbers) != len(set(numbers)):
        errors.append("port number must be unique")
    return errors


def manifests(cfg: ServingConfig, engine: str, **pool: Any) -> list[dict[str, Any]]:
    return render.manifests(cfg, name="chat", engine=engine, namespace="llm",
                            inference_pool=render.InferencePoolOptions(**pool))


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_the_shipped_crd_has_exactly_the_cel_rules_checked_here():
    version = _v1_version()
    assert version["served"] and version["storage"]
    assert _cel_rules(version["schema"]["openAPIV3Schema"]) == CEL_RULES


@pytest.mark.parametrize(("cfg", "engine"), PLANS)
def test_every_rendered_object_validates_pool_against_the_crd_rest_against_kubernetes(
        cfg, engine):
    objects = manifests(cfg, engine)
    pools = [o for o in objects if o["kind"] == "InferencePool"]
    assert len(pools) == 1 and pools[-1] is objects[-1]  # applied after what it references
    assert pool_errors(pools[0]) == []
    for obj in objects:
        if obj["kind"] not in ("InferencePool", "LeaderWorkerSet"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("cfg", "engine"), PLANS)
def test_the_pool_selects_what_the_endpoint_service_selects_on_the_engine_port(cfg, engine):
    objects = render.manifests(cfg, name="chat", engine=engine,
                               options=render.RenderOptions(port=9000),
                               inference_pool=render.InferencePoolOptions())
    pool = the(objects, "InferencePool", "chat")
    service = the(objects, "Service", "chat")
    assert pool["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert pool["spec"]["targetPorts"] == [{"number": 9000}]
    front = service["spec"]["selector"]["app.kubernetes.io/component"]
    served = [o for o in objects if o["kind"] in ("Deployment", "LeaderWorkerSet")
              and front in json.dumps(o["spec"].get("template", o["spec"]))]
    assert served, "the pool selects no rendered pod"
    ports = {p["containerPort"] for o in served for p in _serving_ports(o)}
    assert ports == {9000}


def _serving_ports(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]
    template = spec.get("template") or spec["leaderWorkerTemplate"]["leaderTemplate"]
    return [p for c in template["spec"]["containers"] for p in c.get("ports", [])]


def test_a_disaggregated_pool_fronts_the_router_not_the_prefill_or_decode_pods():
    pool = the(manifests(DISAGGREGATED, "sglang"), "InferencePool", "chat")
    assert pool["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "router"


def test_the_picker_is_rendered_beside_the_pool_and_referenced_by_it():
    objects = manifests(AGGREGATED, "vllm")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects[3:]]
    assert kinds == [("ServiceAccount", "chat-epp"), ("Role", "chat-epp"),
                     ("RoleBinding", "chat-epp"), ("ConfigMap", "chat-epp"),
                     ("Deployment", "chat-epp"), ("Service", "chat-epp"),
                     ("InferencePool", "chat")]
    ref = objects[-1]["spec"]["endpointPickerRef"]
    assert ref == {"kind": "Service", "name": "chat-epp", "port": {"number": 9002},
                   "failureMode": "FailOpen"}
    svc = the(objects, "Service", "chat-epp")
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9090}
    dep = the(objects, "Deployment", "chat-epp")
    pod = dep["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--pool-name") + 1] == "chat"
    assert args[args.index("--pool-namespace") + 1] == "llm"
    assert container["image"] == "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
    assert container["readinessProbe"]["grpc"]["port"] == 9003
    role = the(objects, "Role", "chat-epp")
    readable = {(g, r) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= readable
    assert all(rule["verbs"] == ["get", "watch", "list"] for rule in role["rules"])


@pytest.mark.parametrize(("engine", "parameters"), [
    ("vllm", None), ("sglang", {"defaultEngine": "sglang"})])
def test_the_picker_scores_prefix_cache_and_load_reading_the_engines_metrics(
        engine, parameters):
    config_map = the(manifests(AGGREGATED, engine), "ConfigMap", "chat-epp")
    config = yaml.safe_load(config_map["data"]["default-plugins.yaml"])
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p["type"]: p for p in config["plugins"]}
    assert plugins["core-metrics-extractor"].get("parameters") == parameters
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == {
        "prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer"}


def test_an_existing_picker_is_referenced_and_nothing_else_rendered():
    objects = manifests(AGGREGATED, "vllm", endpoint_picker="shared-epp",
                        endpoint_picker_port=9443, failure_mode="FailClose")
    assert [o["kind"] for o in objects] == ["Deployment", "Service", "PodDisruptionBudget",
                                           "InferencePool"]
    assert objects[-1]["spec"]["endpointPickerRef"] == {
        "kind": "Service", "name": "shared-epp", "port": {"number": 9443},
        "failureMode": "FailClose"}
    assert pool_errors(objects[-1]) == []


@pytest.mark.parametrize(("field", "value"), [
    ("endpoint_picker", ""), ("endpoint_picker_port", 0), ("endpoint_picker_port", 70000),
    ("failure_mode", "Sometimes")])
def test_bad_pool_options_are_refused_naming_the_field(field, value):
    with pytest.raises(InputError) as err:
        render.InferencePoolOptions(**{field: value})
    assert err.value.field == field


def _broken(change: str) -> dict[str, Any]:
    pool = copy.deepcopy(manifests(AGGREGATED, "vllm")[-1])
    spec = pool["spec"]
    if change == "no picker":
        del spec["endpointPickerRef"]
    elif change == "service without port":
        del spec["endpointPickerRef"]["port"]
    elif change == "repeated port":
        spec["targetPorts"].append(dict(spec["targetPorts"][0]))
    elif change == "empty selector":
        spec["selector"]["matchLabels"] = {}
    elif change == "unknown field":
        spec["endpointPicker"] = spec.pop("endpointPickerRef")
    elif change == "bad failure mode":
        spec["endpointPickerRef"]["failureMode"] = "FailSometimes"
    return pool


@pytest.mark.parametrize("change", ["no picker", "service without port", "repeated port",
                                    "empty selector", "unknown field", "bad failure mode"])
def test_the_crd_check_refuses_a_broken_pool(change):
    assert pool_errors(_broken(change)), f"a pool with {change} passed the CRD check"


def test_a_rollout_moves_the_pool_selector_and_leaves_the_picker_alone():
    new = dataclasses.replace(AGGREGATED, worker=dataclasses.replace(AGGREGATED.worker, tp=4))
    before, after = manifests(AGGREGATED, "vllm"), manifests(new, "vllm")
    old_pool, new_pool = before[-1], after[-1]
    new_hash = new.layout_hash()
    assert old_pool["spec"]["selector"] != new_pool["spec"]["selector"]
    patch = inference_pool.retarget(old_pool, new_hash)
    assert patch == {"spec": {"selector": new_pool["spec"]["selector"]}}
    picker = [o for o in before if o["metadata"]["name"] == "chat-epp"]
    assert picker == [o for o in after if o["metadata"]["name"] == "chat-epp"]
    # The operator finds an endpoint's workloads and Services by trilemma.dev/endpoint, to
    # prune old configurations and move Service selectors: the picker must not match.
    assert all("trilemma.dev/endpoint" not in o["metadata"]["labels"] for o in picker)


def test_the_pool_is_off_by_default_and_the_yaml_is_byte_identical():
    assert [o["kind"] for o in render.manifests(AGGREGATED, name="chat")] == [
        "Deployment", "Service", "PodDisruptionBudget"]
    options = render.InferencePoolOptions()
    first = render.render_yaml(DISAGGREGATED, name="chat", inference_pool=options)
    assert first == render.render_yaml(DISAGGREGATED, name="chat", inference_pool=options)
    assert "&id" not in first and "*id" not in first


def test_render_command_and_cli_render_the_pool_on_request(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"recommended": {"config": AGGREGATED.to_dict()}}))
    out = io.StringIO()
    render_command(path, "vllm", name="chat", namespace="llm", image=None, out=out,
                   inference_pool=render.InferencePoolOptions(endpoint_picker="epp"))
    docs = list(yaml.safe_load_all(out.getvalue()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget",
                                        "InferencePool"]
    assert cli.main(["render", str(path), "--name", "chat", "--inference-pool"]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds[-2:] == ["Service", "InferencePool"] and "Role" in kinds
    assert cli.main(["render", str(path), "--endpoint-picker", "epp"]) == cli.EXIT_BAD_INPUT
    assert "--inference-pool" in capsys.readouterr().err


def test_the_readme_gateway_example_routes_to_the_rendered_pool():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Gateway API"):readme.index("## The operator")]
    example = section[section.index("```yaml\n") + 8:]
    gateway, route = yaml.safe_load_all(example[:example.index("```")])
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    pool = manifests(AGGREGATED, "vllm")[-1]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        inference_pool.POOL_GROUP, pool["kind"], pool["metadata"]["name"])
    assert "--name chat --namespace llm --inference-pool" in section
