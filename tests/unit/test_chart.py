"""The Helm chart, rendered by a real helm: lint, schema-valid output, RBAC equal to
trilemma.operator.rbac, and a Deployment that keeps the operator's contract (kopf flags, env,
read-only root, probe) for every mode the values select."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests import tools
from trilemma.operator import rbac

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trilemma"
RELEASE = "t"
NAMESPACE = "ops"
K8S_VERSION = "1.30"

# Kinds whose schemas kubernetes_validate does not ship (CRD-defined by other projects); they are
# checked by hand below instead, and a test pins that the validator really does not know them.
FOREIGN_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "ClusterKopfPeering": "kopf.dev/v1",
    "KopfPeering": "kopf.dev/v1",
}

# name -> extra helm arguments; each mode the values select.
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "ha": ["--set", "replicas=2"],
    "namespaces": ["--set-json", 'watchNamespaces=["a","b"]'],
    "ha-namespaces": ["--set", "replicas=3", "--set-json", 'watchNamespaces=["a","b"]'],
    "peering-one-replica": ["--set", "peering.enabled=true"],
    "servicemonitor": ["--set", "serviceMonitor.enabled=true",
                       "--set", "prometheus.url=http://prometheus.monitoring:9090"],
    "dashboards": ["--set", "dashboards.enabled=true"],
}
PEERING = {"ha", "ha-namespaces", "peering-one-replica"}
NAMESPACED = {"namespaces", "ha-namespaces"}

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    return tools.require_tool("helm")


def run_helm(helm: str, *args: str | Path) -> str:
    done = subprocess.run([helm, *map(str, args)], capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, f"helm {args}: {done.stdout}{done.stderr}"
    return done.stdout


def template(helm: str, *args: str, release: str = RELEASE) -> str:
    return run_helm(helm, "template", release, CHART, "--namespace", NAMESPACE, *args)


def documents(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[Doc]]:
    """Each scenario rendered once, CRDs included, for the tests below to share."""
    return {name: documents(template(helm, "--include-crds", *args))
            for name, args in SCENARIOS.items()}


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Doc], kind: str) -> Doc:
    (found,) = of_kind(docs, kind)
    return found


def container(docs: Iterable[Doc]) -> Doc:
    (operator,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return operator


def normalised(rules: Iterable[rbac.Rule | Doc]) -> list[tuple[tuple[str, ...], ...]]:
    return sorted((tuple(sorted(rule["apiGroups"])), tuple(sorted(rule["resources"])),
                   tuple(sorted(rule["verbs"]))) for rule in rules)


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "strict"])
def test_chart_lints_cleanly(helm, strict):
    run_helm(helm, "lint", CHART, *(["--strict"] if strict else []))


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "default"])
def test_chart_lints_strictly_in_every_mode(helm, scenario):
    run_helm(helm, "lint", "--strict", CHART, *SCENARIOS[scenario])


def test_values_schema_rejects_misspelt_and_malformed_values(helm):
    for bad in (["--set", "replica=2"], ["--set-json", 'watchNamespaces=["Team_A"]'],
                ["--set", "logLevel=loud"], ["--set", "metrics.port=8080"]):
        done = subprocess.run([helm, "template", RELEASE, str(CHART), *bad],
                              capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode != 0, f"values {bad} were accepted"


def test_rendering_is_deterministic(helm):
    args = SCENARIOS["ha-namespaces"]
    assert template(helm, *args) == template(helm, *args)


# --- every document is valid Kubernetes -------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_document_is_valid_for_kubernetes(rendered, scenario):
    for doc in rendered[scenario]:
        name = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] in FOREIGN_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            assert doc["apiVersion"] == FOREIGN_KINDS[doc["kind"]], name
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), name


def test_names_fit_kubernetes_limits_for_the_longest_release_name(helm):
    # Helm caps release names at 53 characters; the longest suffix is "-namespaced".
    docs = documents(template(helm, *SCENARIOS["namespaces"], release="r" * 53))
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        for value in doc["metadata"].get("labels", {}).values():
            assert len(value) <= 63, value


def test_service_monitor_scrapes_the_metrics_service(rendered):
    docs = rendered["servicemonitor"]
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["metadata"]["namespace"] == NAMESPACE
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    # The per-endpoint series keep the endpoint's namespace label (the dashboard selects by it).
    assert endpoint["honorLabels"] is True
    assert not of_kind(rendered["default"], "ServiceMonitor")


# --- RBAC -------------------------------------------------------------------------------------

ROLE_RULES = {"cluster": rbac.CLUSTER_RULES, "namespaced": rbac.NAMESPACED_RULES,
              "events": rbac.EVENT_RULES}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_cluster_roles_grant_exactly_the_operator_rules(rendered, scenario):
    roles = of_kind(rendered[scenario], "ClusterRole")
    granted = [rule for role in roles for rule in role["rules"]]
    assert normalised(granted) == normalised(rbac.RULES)
    for role in roles:
        group = role["metadata"]["name"].removeprefix(f"{RELEASE}-trilemma-")
        assert normalised(role["rules"]) == normalised(ROLE_RULES[group]), group
    assert not of_kind(rendered[scenario], "Role"), "rules live in ClusterRoles only"


def bindings(docs: list[Doc]) -> set[tuple[str, str | None, str]]:
    """(kind, namespace, role group) of every binding, after checking its subject."""
    found = set()
    for doc in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        assert doc["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-trilemma",
                                    "namespace": NAMESPACE}]
        assert doc["roleRef"]["kind"] == "ClusterRole"
        group = doc["roleRef"]["name"].removeprefix(f"{RELEASE}-trilemma-")
        found.add((doc["kind"], doc["metadata"].get("namespace"), group))
    return found


def test_all_namespaces_binds_every_role_cluster_wide(rendered):
    assert bindings(rendered["default"]) == {("ClusterRoleBinding", None, group)
                                             for group in ROLE_RULES}


def test_watched_namespaces_get_role_bindings_and_only_cluster_scope_is_cluster_wide(rendered):
    assert bindings(rendered["namespaces"]) == {
        ("ClusterRoleBinding", None, "cluster"),
        ("RoleBinding", "a", "namespaced"), ("RoleBinding", "a", "events"),
        ("RoleBinding", "b", "namespaced"), ("RoleBinding", "b", "events"),
        # Kopf posts events about cluster-scoped HardwarePools in its own namespace.
        ("RoleBinding", NAMESPACE, "events"),
    }


def test_operator_namespace_among_watched_ones_is_bound_once(helm):
    docs = documents(template(helm, "--set-json", f'watchNamespaces=["{NAMESPACE}"]'))
    assert bindings(docs) == {("ClusterRoleBinding", None, "cluster"),
                              ("RoleBinding", NAMESPACE, "namespaced"),
                              ("RoleBinding", NAMESPACE, "events")}


def test_the_default_install_reads_no_secrets_anywhere(rendered):
    for scenario, docs in rendered.items():
        for role in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
            for rule in role["rules"]:
                assert "secrets" not in rule["resources"], (scenario, role["metadata"]["name"])
        env = {e["name"] for e in one(docs, "Deployment")["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        assert "TRILEMMA_PROMETHEUS_SECRET_NAMES" not in env


@pytest.mark.parametrize("namespaces", [[], ["a", "b"]])
def test_named_prometheus_secrets_are_the_only_ones_granted_bound_like_the_children(
        helm, namespaces):
    docs = documents(template(helm, "--set-json", 'prometheus.authSecretNames=["tok","prom"]',
                              "--set-json", f"watchNamespaces={json.dumps(namespaces)}",
                              "--set-json", 'prometheus.allowedUrls=["http://a:9090","http://b"]'))
    (role,) = [r for r in of_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith(
        "-secrets")]
    assert role["rules"] == rbac.secret_rules(["tok", "prom"]) == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
         "resourceNames": ["prom", "tok"]}]
    secrets = {b for b in bindings(docs) if b[2] == "secrets"}
    if namespaces:
        assert secrets == {("RoleBinding", "a", "secrets"), ("RoleBinding", "b", "secrets")}
    else:
        assert secrets == {("ClusterRoleBinding", None, "secrets")}
    env = {e["name"]: e.get("value") for e in one(docs, "Deployment")["spec"]["template"][
        "spec"]["containers"][0]["env"]}
    assert env["TRILEMMA_PROMETHEUS_SECRET_NAMES"] == "tok,prom"
    assert env["TRILEMMA_PROMETHEUS_ALLOWED_URLS"] == "http://a:9090,http://b"


def test_network_policy_admits_only_the_listed_peers_to_the_metrics_port(helm, rendered):
    assert not of_kind(rendered["default"], "NetworkPolicy")
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs = documents(template(helm, "--set", "networkPolicy.enabled=true", "--set-json",
                              f"networkPolicy.metricsFrom=[{json.dumps(peer)}]"))
    policy = one(docs, "NetworkPolicy")
    pod = one(docs, "Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"][
        "labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [peer], "ports": [
        {"port": "metrics", "protocol": "TCP"}]}]
    closed = documents(template(helm, "--set", "networkPolicy.enabled=true"))
    assert one(closed, "NetworkPolicy")["spec"]["ingress"] is None  # nobody may scrape


def test_deployment_runs_as_the_bound_service_account(rendered):
    docs = rendered["default"]
    account = one(docs, "ServiceAccount")["metadata"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["name"] == f"{RELEASE}-trilemma"
    assert account["namespace"] == NAMESPACE


def crd_documents() -> list[Doc]:
    return [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "crds").glob("*.yaml"))]


def test_rbac_names_the_trilemma_crds_by_their_plurals_and_scopes():
    crds = crd_documents()
    if not crds:
        pytest.skip("crds/ not generated yet (`trilemma crds`)")
    cluster = {r for rule in rbac.CLUSTER_RULES for r in rule["resources"]
               if "trilemma.dev" in rule["apiGroups"]}
    namespaced = {r for rule in rbac.NAMESPACED_RULES for r in rule["resources"]
                  if "trilemma.dev" in rule["apiGroups"]}
    for crd in crds:
        plural = crd["spec"]["names"]["plural"]
        if crd["spec"]["scope"] == "Cluster":
            assert {plural, f"{plural}/status"} <= cluster, plural
            assert plural not in namespaced, plural
        else:
            assert {plural, f"{plural}/status"} <= namespaced, plural


# --- the operator Deployment ------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_kopf_arguments_follow_the_values(rendered, scenario):
    operator = container(rendered[scenario])
    assert operator["command"] == ["kopf", "run"]
    args = operator["args"]
    assert args[:2] == ["--module=trilemma.operator.handlers",
                        "--liveness=http://0.0.0.0:8080/healthz"]
    scope = [a for a in args if a.startswith(("--namespace", "--all-namespaces"))]
    assert scope == (["--namespace=a", "--namespace=b"] if scenario in NAMESPACED
                     else ["--all-namespaces"])
    peering = [a for a in args if a.startswith(("--peering", "--standalone"))]
    assert peering == (["--peering=trilemma"] if scenario in PEERING else ["--standalone"])


@pytest.mark.parametrize(("level", "flag"), [("info", None), ("verbose", "--verbose"),
                                             ("debug", "--debug"), ("quiet", "--quiet")])
def test_log_level_maps_to_one_kopf_flag(helm, level, flag):
    args = container(documents(template(helm, "--set", f"logLevel={level}")))["args"]
    levels = [a for a in args if a in ("--verbose", "--debug", "--quiet")]
    assert levels == ([flag] if flag else [])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_standalone_operator_is_replaced_not_rolled(rendered, scenario):
    strategy = one(rendered[scenario], "Deployment")["spec"].get("strategy")
    if scenario in PEERING:
        assert strategy is None  # RollingUpdate: peering keeps one active operator
    else:
        assert strategy == {"type": "Recreate"}


def test_pod_runs_non_root_with_a_read_only_root_and_no_capabilities(rendered):
    pod = one(rendered["default"], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(rendered["default"])["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_tmp_is_the_only_writable_mount(rendered):
    pod = one(rendered["default"], "Deployment")["spec"]["template"]["spec"]
    assert container(rendered["default"])["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    (volume,) = pod["volumes"]
    assert volume["name"] == "tmp"
    assert set(volume) == {"name", "emptyDir"}


def test_liveness_probe_hits_kopfs_endpoint_and_metrics_port_is_exposed(rendered):
    operator = container(rendered["default"])
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"liveness": 8080, "metrics": 9090}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    service = one(rendered["default"], "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090,
                                         "targetPort": "metrics", "protocol": "TCP"}]


def env_of(docs: list[Doc]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def test_operator_environment_carries_the_settings_and_the_pod_identity(rendered):
    env = env_of(rendered["default"])
    assert env["TRILEMMA_METRICS_PORT"] == "9090"
    assert env["TRILEMMA_MAX_CONCURRENT_OPTIMIZATIONS"] == "2"
    assert env["TRILEMMA_CACHE_DIR"].startswith("/tmp/")
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "TRILEMMA_PROMETHEUS_URL" not in env  # empty url: the operator's own default
    assert env_of(rendered["servicemonitor"])["TRILEMMA_PROMETHEUS_URL"] == (
        "http://prometheus.monitoring:9090")


def test_image_defaults_to_the_chart_app_version_which_is_the_package_version(rendered):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert container(rendered["default"])["image"] == (
        f"ghcr.io/trilemma/trilemma:{chart['appVersion']}")


def test_operator_resources_leave_room_for_the_searches(rendered):
    resources = container(rendered["default"])["resources"]
    assert resources["requests"]["memory"] == "1Gi"
    assert "cpu" not in resources["limits"]


# --- peering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_peering_objects_exist_exactly_when_peering_is_on(rendered, scenario):
    docs = rendered[scenario]
    cluster, namespaced = of_kind(docs, "ClusterKopfPeering"), of_kind(docs, "KopfPeering")
    if scenario not in PEERING:
        assert not cluster and not namespaced
    elif scenario in NAMESPACED:
        assert not cluster
        assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in namespaced) \
            == [("a", "trilemma"), ("b", "trilemma")]
    else:
        assert not namespaced
        assert [p["metadata"]["name"] for p in cluster] == ["trilemma"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_disruption_budget_only_guards_several_replicas(rendered, scenario):
    budgets = of_kind(rendered[scenario], "PodDisruptionBudget")
    replicas = one(rendered[scenario], "Deployment")["spec"]["replicas"]
    assert len(budgets) == (1 if replicas > 1 else 0)
    for budget in budgets:
        assert budget["spec"]["maxUnavailable"] == 1


def test_peering_crds_ship_with_the_chart_and_define_the_peering_kinds(rendered, helm):
    crds = {d["spec"]["names"]["kind"]: d for d in of_kind(rendered["default"],
                                                             "CustomResourceDefinition")
            if d["spec"]["group"] == "kopf.dev"}
    assert set(crds) == {"ClusterKopfPeering", "KopfPeering"}
    assert crds["ClusterKopfPeering"]["spec"]["scope"] == "Cluster"
    assert crds["KopfPeering"]["spec"]["scope"] == "Namespaced"
    peering_rules = {r for rule in rbac.RULES if "kopf.dev" in rule["apiGroups"]
                     for r in rule["resources"]}
    assert peering_rules == {crd["spec"]["names"]["plural"] for crd in crds.values()}
    without = documents(template(helm, "--include-crds", "--set", "peering.installCRDs=false"))
    assert not [d for d in of_kind(without, "CustomResourceDefinition")
                if d["spec"]["group"] == "kopf.dev"]


# --- files beside the templates ---------------------------------------------------------------


def test_chart_crds_are_byte_identical_copies_of_the_generated_crds():
    chart_crds = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    generated = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    if not chart_crds and not generated:
        pytest.skip("no CRDs generated yet (`trilemma crds`)")
    assert chart_crds == generated


def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the documented values; free-form maps (resources) count as one."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "resources":
            paths += value_paths(value, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_every_value_is_in_the_readme_table_and_the_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (ROOT / "charts" / "README.md").read_text()
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    for path in value_paths(values):
        assert f"| `{path}` |" in readme, path
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
