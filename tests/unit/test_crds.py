"""The generated CRDs: in sync with the models, structural, faithful to them, and the sample
custom resources in examples/operator/ valid against both the CRDs and the pydantic models."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from trilemma.operator.resources import HardwarePoolSpec, OptimizedEndpointSpec, Rollout, to_wire
from trilemma.optimizer.catalog import models as catalog_models
from trilemma.tools import cli, crdgen

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "operator"
DOCS = {doc["spec"]["names"]["kind"]: doc for doc in crdgen.crd_documents()}
SPEC_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "OptimizedEndpoint": OptimizedEndpointSpec, "HardwarePool": HardwarePoolSpec}

# What a structural schema node may carry (the keywords the models need, all allowed in CRDs).
ALLOWED_KEYS = {
    "type", "description", "enum", "default", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "maxProperties", "required",
    "properties", "items", "additionalProperties", "anyOf", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
              "object": dict, "array": list}


def schema_of(kind: str) -> dict[str, Any]:
    return DOCS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_node(kind: str, *path: str) -> dict[str, Any]:
    node = schema_of(kind)["properties"]["spec"]
    for key in path:
        node = node["items"] if key == "[*]" else node["properties"][key]
    return node


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path or ".", node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{*}}")


def sample_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path.name}#{i}", doc) for path in sorted(EXAMPLES.glob("*.yaml"))
            for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8")))]


SAMPLES = sample_docs()
CUSTOM = [(name, doc) for name, doc in SAMPLES if doc["kind"] in DOCS]


# ---- a tiny CEL evaluator --------------------------------------------------------------------
# Enough for the generated rules (has(), ==, !=, >, !, &&, ||, in, string literals, a map's
# .all() and a string's .matches()): it lets the
# negative cases below show that the API server would refuse them, without an API server.


class _Obj:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        value = self._data[name]  # KeyError: CEL's "no such key", which fails the rule
        return _Obj(value) if isinstance(value, dict) else value


def _has(obj: _Obj, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for name in parents:
        obj = getattr(obj, name)
    return last in obj._data


def _comprehensions(expr: str) -> str:
    """`X.all(v, BODY)` as a Python generator over X's keys (CEL iterates a map's keys)."""
    while (start := expr.find(".all(")) != -1:
        head = re.search(r"[\w.]+$", expr[:start])
        assert head is not None, expr
        depth, i = 1, start + len(".all(")
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            i += 1
        var, body = expr[start + len(".all("):i - 1].split(",", 1)
        expr = (f"{expr[:head.start()]}all(({body}) for {var.strip()} in "
                f"{head.group(0)}._data){expr[i:]}")
    return expr


def cel(rule: str, value: dict[str, Any]) -> bool:
    expr = re.sub(r"has\(self((?:\.\w+)+)\)", lambda m: f"_has(self, {m.group(1)[1:]!r})", rule)
    expr = re.sub(r"(\w+)\.matches\(('[^']*')\)", r"_matches(\2, \1)", expr)
    expr = re.sub(r"!(?!=)", " not ", expr.replace("||", " or ").replace("&&", " and "))
    expr = _comprehensions(expr)
    env = {"__builtins__": {"all": all}, "_has": _has,
           "_matches": lambda pattern, s: re.search(pattern, s) is not None}
    try:
        return bool(eval(expr, env, {"self": _Obj(value)}))
    except KeyError:
        return False


def cel_failures(node: dict[str, Any], value: Any, path: str = "") -> list[str]:
    failures = []
    if isinstance(value, dict):
        failures += [f"{path or '.'}: {r['message']}" for r in
                     node.get("x-kubernetes-validations", []) if not cel(r["rule"], value)]
        for key, child in value.items():
            if key in node.get("properties", {}):
                failures += cel_failures(node["properties"][key], child, f"{path}.{key}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            failures += cel_failures(node["items"], item, f"{path}[{i}]")
    return failures


def schema_errors(kind: str, doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(schema_of(kind))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def rejections(doc: dict[str, Any]) -> list[str]:
    """Why the API server would refuse `doc`: schema errors, then failed CEL rules."""
    kind = doc["kind"]
    return schema_errors(kind, doc) + cel_failures(schema_of(kind), doc)


# ---- in sync ---------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", crdgen.TARGET_DIRS, ids=str)
def test_committed_crds_are_what_the_models_generate(folder):
    expected = crdgen.rendered_files()
    present = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / folder).glob("*.yaml")}
    hint = "CRDs drifted from operator/resources.py: run `trilemma crds` and commit the result"
    assert sorted(present) == sorted(expected), hint
    for name, text in expected.items():
        assert present[name] == text, f"{folder / name}: {hint}"


def test_generation_is_deterministic():
    first = [crdgen.render_crd_yaml(d) for d in crdgen.crd_documents()]
    assert first == [crdgen.render_crd_yaml(d) for d in crdgen.crd_documents()]
    assert all(text.startswith(crdgen.GENERATED_HEADER) for text in first)


def test_check_command_passes_on_the_repository(capsys):
    assert cli.main(["crds", "--check", "--out-root", str(ROOT)]) == 0
    assert "in sync" in capsys.readouterr().out


def test_check_command_reports_drift_and_stale_files(tmp_path, capsys):
    assert cli.main(["crds", "--out-root", str(tmp_path)]) == 0
    assert "wrote crds/hardwarepools.trilemma.dev.yaml" in capsys.readouterr().out
    pool = tmp_path / "charts/trilemma/crds/hardwarepools.trilemma.dev.yaml"
    pool.write_text(pool.read_text().replace("hwpool", "pool"))
    (tmp_path / "crds/old.trilemma.dev.yaml").write_text(crdgen.GENERATED_HEADER)
    (tmp_path / "crds/README.md").write_text("kept")
    assert cli.main(["crds", "--check", "--out-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "charts/trilemma/crds/hardwarepools.trilemma.dev.yaml: differs (+1 -1 lines)" in out
    assert "crds/old.trilemma.dev.yaml: stale" in out
    assert "run `trilemma crds`" in out
    assert cli.main(["crds", "--out-root", str(tmp_path)]) == 0
    assert not (tmp_path / "crds/old.trilemma.dev.yaml").exists()
    assert (tmp_path / "crds/README.md").read_text() == "kept"
    assert cli.main(["crds", "--check", "--out-root", str(tmp_path)]) == 0


def test_stdout_prints_both_crds_as_one_yaml_stream(capsys):
    assert cli.main(["crds", "--stdout"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == [
        "optimizedendpoints.trilemma.dev", "hardwarepools.trilemma.dev"]


# ---- valid CRDs, structural schemas ----------------------------------------------------------


@pytest.mark.parametrize("kind", DOCS)
def test_crd_is_a_valid_kubernetes_object(kind):
    kubernetes_validate.validate(DOCS[kind], "1.30", strict=True)


def test_names_scope_versions_and_printer_columns():
    oe, pool = DOCS["OptimizedEndpoint"]["spec"], DOCS["HardwarePool"]["spec"]
    assert oe["names"] == {"kind": "OptimizedEndpoint", "listKind": "OptimizedEndpointList",
                           "plural": "optimizedendpoints", "singular": "optimizedendpoint",
                           "shortNames": ["oe"], "categories": ["trilemma"]}
    assert (oe["scope"], pool["scope"]) == ("Namespaced", "Cluster")
    assert pool["names"]["shortNames"] == ["hwpool"]
    for crd in (oe, pool):
        (version,) = crd["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    # An endpoint scales (kubectl scale, HPA, KEDA) through replicas.count; a pool does not.
    assert oe["versions"][0]["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas.count", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    assert pool["versions"][0]["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"])
               for c in oe["versions"][0]["additionalPrinterColumns"]}
    assert columns == {
        "Model": ("string", ".status.activeConfiguration.model"),
        "GPU": ("string", ".status.activeConfiguration.gpu"),
        "Config": ("string", ".status.activeConfiguration.short"),
        "Replicas": ("integer", ".status.activeConfiguration.replicas"),
        "Phase": ("string", ".status.phase"),
        "$/hour": ("number", ".status.costPerHour"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    assert [c["jsonPath"] for c in pool["versions"][0]["additionalPrinterColumns"]] == [
        ".spec.gpus[*].gpu", ".metadata.creationTimestamp"]
    for kind in DOCS:
        assert schema_of(kind)["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]


@pytest.mark.parametrize("kind", DOCS)
def test_every_schema_node_is_structural(kind):
    for path, node in walk(schema_of(kind)):
        assert set(node) <= ALLOWED_KEYS, (path, sorted(set(node) - ALLOWED_KEYS))
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in JSON_TYPES or node.get(
                "x-kubernetes-preserve-unknown-fields"), path
        if "additionalProperties" in node:
            assert isinstance(node["additionalProperties"], dict), path
            assert "properties" not in node, path
        if node.get("type") == "array":
            assert "items" in node, path
        for key in node.get("required", []):
            assert key in node["properties"], (path, key)
        for value in node.get("enum", []):
            assert isinstance(value, JSON_TYPES[node["type"]]), (path, value)
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) == {"rule", "message"}, path
            for name in re.findall(r"self\.(\w+)", rule["rule"]):
                assert name in node["properties"], (path, rule["rule"])


@pytest.mark.parametrize("kind", DOCS)
def test_every_default_is_valid_against_its_own_node(kind):
    # The API server refuses a CRD whose defaults its own schema would reject.
    defaults = [(p, n) for p, n in walk(schema_of(kind)) if "default" in n]
    assert defaults
    for path, node in defaults:
        rest = {k: v for k, v in node.items() if k != "default"}
        errors = list(jsonschema.Draft4Validator(rest).iter_errors(node["default"]))
        assert not errors, (path, [e.message for e in errors])
        assert not cel_failures(rest, node["default"]), path


# ---- faithful to the models ------------------------------------------------------------------


def test_enums_defaults_and_bounds_of_the_models_show_up():
    objective = spec_node("OptimizedEndpoint", "objective")
    assert objective["enum"] == ["min_cost", "max_throughput", "min_latency", "balanced"]
    assert objective["default"] == "balanced"
    assert spec_node("OptimizedEndpoint", "rollout", "autoApply")["default"] is True
    assert spec_node("OptimizedEndpoint", "workload", "arrivals", "kind")["enum"] == [
        "poisson", "gamma", "trace"]
    assert spec_node("OptimizedEndpoint", "workload", "promptTokens", "kind")["enum"] == [
        "fixed", "lognormal", "histogram"]
    assert spec_node("HardwarePool", "gpus", "[*]", "count")["minimum"] == 1
    assert spec_node("HardwarePool", "gpus", "[*]", "gpusPerNode")["maximum"] == 72
    assert spec_node("HardwarePool", "gpus", "[*]")["required"] == ["gpu", "count"]
    assert set(spec_node("OptimizedEndpoint")["required"]) == {"workload", "hardwarePoolRef"}
    assert spec_node("OptimizedEndpoint", "models")["maxItems"] == 16
    assert spec_node("OptimizedEndpoint", "workload")["description"] == "The traffic to serve."
    price = spec_node("HardwarePool", "gpus", "[*]", "pricePerGpuHour")
    assert (price["minimum"], price["exclusiveMinimum"]) == (0, True)
    labels = spec_node("OptimizedEndpoint", "prometheus", "labelSelector")
    assert labels["additionalProperties"] == {"type": "string"}


def test_int_or_percent_fields_are_int_or_string_with_their_defaults():
    surge = spec_node("OptimizedEndpoint", "rollout", "maxSurge")
    unavailable = spec_node("OptimizedEndpoint", "rollout", "maxUnavailable")
    for node in (surge, unavailable):
        assert node["x-kubernetes-int-or-string"] is True
        assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert (surge["default"], unavailable["default"]) == ("25%", 0)


@pytest.mark.parametrize("name", [n for n, f in OptimizedEndpointSpec.model_fields.items()
                                  if f.default_factory is not None])
def test_default_factory_fields_carry_the_models_defaults(name):
    field = OptimizedEndpointSpec.model_fields[name]
    expected = pydantic.TypeAdapter(field.annotation).dump_python(
        field.default_factory(), mode="json", by_alias=True, exclude_none=True)
    assert spec_node("OptimizedEndpoint", field.alias)["default"] == expected
    if name == "rollout":
        assert expected == to_wire(Rollout())


def test_unions_are_flattened_with_cel_rules_for_each_kind():
    lengths = spec_node("OptimizedEndpoint", "workload", "promptTokens")
    assert lengths["required"] == ["kind"]
    assert list(lengths["properties"]) == [
        "kind", "value", "mean", "p90", "values", "edges", "weights"]
    rules = {r["rule"]: r["message"] for r in lengths["x-kubernetes-validations"]}
    assert rules["self.kind != 'lognormal' || (has(self.mean) && has(self.p90))"] == (
        "kind lognormal needs mean and p90")
    assert rules["self.kind != 'fixed' || has(self.value)"] == "kind fixed needs value"
    assert rules["!has(self.value) || self.kind == 'fixed'"] == "value applies only to kind fixed"
    arrivals = spec_node("OptimizedEndpoint", "workload", "arrivals")
    assert "self.kind != 'gamma' || (has(self.requestsPerSecond) && has(self.cv))" in {
        r["rule"] for r in arrivals["x-kubernetes-validations"]}


def test_colliding_union_keys_merge_to_the_looser_schema():
    def branch(tag: str, size: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "required": ["kind", "size"], "properties": {
            "kind": {"type": "string", "enum": [tag]}, "size": size}}

    union = {"oneOf": [branch("a", {"type": "integer", "minimum": 1, "description": "A."}),
                       branch("b", {"type": "integer", "minimum": 5, "maximum": 9})],
             "discriminator": {"propertyName": "kind"}}
    flat = crdgen.structural_schema(union)
    assert flat["properties"]["size"] == {"type": "integer", "description": "A."}
    assert flat["properties"]["kind"]["enum"] == ["a", "b"]
    clash = copy.deepcopy(union)
    clash["oneOf"][1]["properties"]["size"] = {"type": "string"}
    with pytest.raises(ValueError, match="size"):
        crdgen.structural_schema(clash)


# ---- the sample custom resources -------------------------------------------------------------


def test_samples_cover_both_kinds_and_every_feature_asked_for():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert names == {"hardwarepool.yaml", "chatbot-endpoint.yaml", "recommend-only.yaml",
                     "configmap-model.yaml", "autoscaled-endpoint.yaml"}
    for _, doc in CUSTOM:
        assert doc["apiVersion"] == "trilemma.dev/v1alpha1"
        assert doc["metadata"]["name"]
        assert ("namespace" in doc["metadata"]) == (doc["kind"] == "OptimizedEndpoint")


@pytest.mark.parametrize(("name", "doc"), CUSTOM, ids=[n for n, _ in CUSTOM])
def test_sample_validates_against_its_crd_and_its_model(name, doc):
    assert not rejections(doc), name
    SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])


def test_sample_endpoints_name_the_sample_pool_and_their_configmaps():
    pools = {d["metadata"]["name"] for _, d in CUSTOM if d["kind"] == "HardwarePool"}
    config_maps = {(d["metadata"]["namespace"], d["metadata"]["name"]): d
                   for _, d in SAMPLES if d["kind"] == "ConfigMap"}
    assert config_maps
    for _, doc in CUSTOM:
        if doc["kind"] != "OptimizedEndpoint":
            continue
        assert doc["spec"]["hardwarePoolRef"]["name"] in pools
        ref = doc["spec"].get("model", {}).get("configMap")
        if ref is not None:
            held = config_maps[(doc["metadata"]["namespace"], ref["name"])]
            config = json.loads(held["data"][ref.get("key", "config.json")])
            assert catalog_models.parse_hf_config(config).total_params > 0


@pytest.mark.parametrize("name", [n for n, d in SAMPLES if d["kind"] == "ConfigMap"])
def test_sample_configmap_is_a_valid_kubernetes_object(name):
    kubernetes_validate.validate(dict(SAMPLES)[name], "1.30", strict=True)


def _endpoint() -> dict[str, Any]:
    return copy.deepcopy(dict(SAMPLES)["chatbot-endpoint.yaml#0"])


def _pool() -> dict[str, Any]:
    return copy.deepcopy(dict(SAMPLES)["hardwarepool.yaml#0"])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            doc = doc[int(key)] if key.isdigit() else doc[key]
        if value is _DELETE:
            del doc[last]
        else:
            doc[int(last) if last.isdigit() else last] = value
    return mutate


_DELETE = object()

NEGATIVE = {
    "unknown objective": (_endpoint, _set("spec.objective", "cheapest")),
    "maxSurge 150%": (_endpoint, _set("spec.rollout.maxSurge", "150%")),
    "maxUnavailable -1": (_endpoint, _set("spec.rollout.maxUnavailable", -1)),
    "missing workload": (_endpoint, _set("spec.workload", _DELETE)),
    "unknown arrivals kind": (_endpoint, _set("spec.workload.arrivals.kind", "burst")),
    "lognormal without p90": (_endpoint, _set("spec.workload.promptTokens.p90", _DELETE)),
    "lognormal p90 below mean": (_endpoint, _set("spec.workload.promptTokens.p90", 900)),
    "fixed length with a mean": (
        _endpoint, _set("spec.workload.outputTokens", {"kind": "fixed", "value": 3, "mean": 3})),
    "gamma without cv": (
        _endpoint, _set("spec.workload.arrivals", {"kind": "gamma", "requestsPerSecond": 1})),
    "trace arrivals": (
        _endpoint, _set("spec.workload.arrivals", {"kind": "trace", "path": "t.csv"})),
    "model and models": (_endpoint, _set("spec.models", [{"id": "Qwen/Qwen3-8B"}])),
    "configMap without servedModel": (
        _endpoint, _set("spec.model", {"configMap": {"name": "cfg"}})),
    "latency target without a percentile": (_endpoint, _set("spec.slo.ttftMs", {})),
    "pool count 0": (_pool, _set("spec.gpus.0.count", 0)),
    # A hostile tenant's specs (README, threat model): refused before the operator reads them.
    "hostPath /": (_endpoint, _set("spec.serving", {"modelCache": {"hostPath": "/"}})),
    "hostPath traversal": (_endpoint, _set("spec.serving", {
        "modelCache": {"hostPath": "/var/lib/../../etc"}})),
    "selector replacing the namespace": (_endpoint, _set("spec.prometheus", {
        "labelSelector": {"namespace": "other-team"}})),
    "selector key that is no label name": (_endpoint, _set("spec.prometheus", {
        "labelSelector": {"bad-key": "x"}})),
    "pool of 10^12 GPUs": (_pool, _set("spec.gpus.0.count", 10**12)),
    "rate of 10^9 requests/s": (_endpoint, _set("spec.workload.arrivals.requestsPerSecond",
                                                1e9)),
    "pool hostPath prefix /": (_pool, _set("spec.modelCacheHostPaths", ["/"])),
    "pool without gpus": (_pool, _set("spec.gpus", [])),
}


@pytest.mark.parametrize("case", NEGATIVE)
def test_invalid_resource_is_refused_by_the_crd_and_the_model(case):
    make, mutate = NEGATIVE[case]
    doc = make()
    mutate(doc)
    assert rejections(doc), case
    with pytest.raises(pydantic.ValidationError):
        SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])
