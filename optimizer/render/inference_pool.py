"""Gateway API Inference Extension: an InferencePool over the endpoint's serving pods, and the
endpoint picker (EPP) that a Gateway asks, per request, which pod of the pool takes it.

Optional last step of rendering, beside workloads.py: a Gateway whose HTTPRoute points at the
pool (backendRef kind InferencePool) routes with the picker's prefix-cache and load scoring
instead of a Service's round robin. The pool selects exactly what the endpoint Service
selects, config hash included, so a rollout moves it the same way (retarget below).

Pinned to gateway-api-inference-extension v1.5.0 (commit
df9f8909fe06fe2dfd4a6fc0bd0c01a0acabf849), the last release whose repository ships the full
picker (v1.6.0 keeps only a round-robin "lightweight" picker for conformance tests; the EPP
moved to llm-d/llm-d-router). The picker objects mirror that release's helm chart
(config/charts/inferencepool, templates from config/charts/epplib) and its flags are those of
pkg/epp/server/options.go at the tag:
https://github.com/kubernetes-sigs/gateway-api-inference-extension/tree/v1.5.0/config/charts
https://github.com/kubernetes-sigs/gateway-api-inference-extension/blob/v1.5.0/pkg/epp/server/options.go
The InferencePool schema is config/crd/bases/inference.networking.k8s.io_inferencepools.yaml
at the tag, shipped as test data in tests/data/gateway-api-inference-extension/.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.render import workloads
from trilemma.optimizer.render.ir import RenderPlan, Role

Obj = dict[str, Any]
FailureMode = Literal["FailOpen", "FailClose"]

POOL_GROUP = "inference.networking.k8s.io"
POOL_API = f"{POOL_GROUP}/v1"
EPP_VERSION = "v1.5.0"
EPP_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:{EPP_VERSION}"
# The picker's ports (options.go defaults; the chart's container and Service ports).
EXT_PROC_PORT = 9002   # gRPC ext-proc: the Gateway's data plane asks here
HEALTH_PORT = 9003     # gRPC health; the probes' service name when leader election is off
METRICS_PORT = 9090
HEALTH_SERVICE = "inference-extension"
CONFIG_MOUNT = "/config"
CONFIG_FILE = "default-plugins.yaml"
COMPONENT = "endpoint-picker"
# The picker's own label for the endpoint it serves. Not trilemma.dev/endpoint: the operator
# lists an endpoint's Deployments and Services by that label, to prune other configurations'
# workloads and to move the Services' config hash, and neither may touch the picker.
LABEL_PICKER_FOR = "trilemma.dev/endpoint-picker"
# The chart's scheduling profile, as shipped: load (queue depth, KV-cache use) and prefix-cache
# affinity scorers, prefix weighted highest.
SCORERS = (("queue-scorer", 2), ("kv-cache-utilization-scorer", 2), ("prefix-cache-scorer", 3))
# The chart's EPP resources, sized upstream by scale tests (values.yaml): no CPU limit so the
# scheduler can burst, a memory limit against leaks.
EPP_RESOURCES: Obj = {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}
# The chart's grace period: mirror the longest request a pool pod may still be serving.
EPP_GRACE_S = 130


@dataclass(frozen=True, kw_only=True)
class InferencePoolOptions:
    """Render an InferencePool for the endpoint; with `endpoint_picker` None, also its EPP.

    `endpoint_picker` names an EPP Service already running in the namespace (one per pool:
    the picker watches the pool it was started with). `failure_mode` is what the Gateway does
    when the picker does not answer: FailOpen routes anyway (the chart's choice: serving
    degraded beats refusing), FailClose refuses (the CRD's default).
    """

    endpoint_picker: str | None = None
    endpoint_picker_port: int = EXT_PROC_PORT
    failure_mode: FailureMode = "FailOpen"
    image: str = EPP_IMAGE

    def __post_init__(self) -> None:
        if self.endpoint_picker is not None and not self.endpoint_picker:
            raise InputError("endpoint_picker", self.endpoint_picker,
                             "name an EPP Service, or leave it unset to render one")
        if not 1 <= self.endpoint_picker_port <= 65535:
            raise InputError("endpoint_picker_port", self.endpoint_picker_port,
                             "a port number is 1 to 65535")
        if self.failure_mode not in ("FailOpen", "FailClose"):
            raise InputError("failure_mode", self.failure_mode, "FailOpen or FailClose")


def epp_name(plan: RenderPlan) -> str:
    return f"{plan.name}-epp"


def pool_selector(plan: RenderPlan) -> dict[str, str]:
    """The pods the pool routes to: those the endpoint Service selects.

    Aggregated, the serving pods (a multi-node replica's leaders). Disaggregated, the
    router: a prefill/decode pair serves a request only through it (it sends the prompt to a
    prefill pod, then hands the KV cache to a decode pod), so the picker may only choose among
    routers; picking a decode pod directly would skip prefill.
    """
    return workloads.selector(plan, workloads.front_component(plan))


def inference_pool(plan: RenderPlan, options: InferencePoolOptions) -> Obj:
    """The InferencePool <name>, beside the endpoint Service of the same name."""
    picker = options.endpoint_picker or epp_name(plan)
    return {
        "apiVersion": POOL_API, "kind": "InferencePool",
        "metadata": {"name": plan.name, "namespace": plan.namespace,
                     "labels": workloads.labels(plan, Role.SERVER, part="inference-pool")},
        "spec": {
            "selector": {"matchLabels": pool_selector(plan)},
            # The engines' (or router's) OpenAI server; the picker scrapes /metrics there too.
            "targetPorts": [{"number": plan.port}],
            "appProtocol": "http",
            "endpointPickerRef": {"kind": "Service", "name": picker,
                                  "port": {"number": options.endpoint_picker_port},
                                  "failureMode": options.failure_mode},
        },
    }


def retarget(pool: Obj, config_hash: str) -> Obj:
    """The merge patch that points a rendered (or live) pool at configuration `config_hash`,
    as the operator's rollout does to the endpoint Services' selectors."""
    match = dict(pool["spec"]["selector"]["matchLabels"])
    match["trilemma.dev/config-hash"] = config_hash
    return {"spec": {"selector": {"matchLabels": match}}}


def _epp_labels(plan: RenderPlan) -> dict[str, str]:
    # No config hash: the picker outlives rollouts (its prefix-cache index is in memory), so
    # nothing in its pod template may change when the pool moves to a new configuration.
    return {"app.kubernetes.io/name": "gateway-api-inference-extension-epp",
            "app.kubernetes.io/instance": epp_name(plan),
            "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/version": EPP_VERSION,
            "app.kubernetes.io/managed-by": "trilemma",
            LABEL_PICKER_FOR: plan.name}


def _epp_selector(plan: RenderPlan) -> dict[str, str]:
    return {"app.kubernetes.io/component": COMPONENT, LABEL_PICKER_FOR: plan.name}


def _meta(plan: RenderPlan, name: str) -> Obj:
    return {"name": name, "namespace": plan.namespace, "labels": _epp_labels(plan)}


def plugins_config(engine: Engine) -> str:
    """The picker's EndpointPickerConfig: the chart's default-plugins.yaml (no latency
    predictor), with the engine whose metric names the core extractor reads.

    v1.5.0 refuses the older per-metric flags (--total-queued-requests-metric, ...) that the
    chart still passes for SGLang; the extractor's defaultEngine is the supported way.
    """
    extractor: Obj = {"type": "core-metrics-extractor"}
    if engine is not Engine.VLLM:
        extractor["parameters"] = {"defaultEngine": engine.value}
    doc: Obj = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [*({"type": name} for name, _ in SCORERS),
                    {"type": "metrics-data-source",
                     "parameters": {"scheme": "http", "path": "/metrics",
                                    "insecureSkipVerify": True}},
                    extractor],
        "schedulingProfiles": [{"name": "default", "plugins": [
            {"pluginRef": name, "weight": weight} for name, weight in SCORERS]}],
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def epp_args(plan: RenderPlan) -> list[str]:
    """The picker's command line: every flag is one of options.go's at v1.5.0."""
    return [
        "--pool-name", plan.name,
        "--pool-namespace", plan.namespace,
        "--pool-group", POOL_GROUP,
        "--grpc-port", str(EXT_PROC_PORT),
        "--grpc-health-port", str(HEALTH_PORT),
        "--metrics-port", str(METRICS_PORT),
        "--config-file", f"{CONFIG_MOUNT}/{CONFIG_FILE}",
        "--zap-encoder", "json",
        "--v", "1",
        # On by default, exporting to an OTLP collector at localhost:4317 that is not there.
        "--tracing=false",
    ]


def _grpc_probe(period: int) -> Obj:
    return {"grpc": {"port": HEALTH_PORT, "service": HEALTH_SERVICE}, "periodSeconds": period}


def epp_container(plan: RenderPlan, options: InferencePoolOptions) -> Obj:
    return {
        "name": "epp",
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "args": epp_args(plan),
        "ports": [{"name": "grpc", "containerPort": EXT_PROC_PORT},
                  {"name": "grpc-health", "containerPort": HEALTH_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "livenessProbe": {**_grpc_probe(10), "initialDelaySeconds": 5},
        "readinessProbe": _grpc_probe(2),
        # The picker defaults its pool namespace to NAMESPACE; POD_NAME names it in logs.
        "env": [{"name": "NAMESPACE", "valueFrom": {"fieldRef": {
                    "fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": copy.deepcopy(EPP_RESOURCES),
        "volumeMounts": [{"name": "plugins-config", "mountPath": CONFIG_MOUNT}],
        # The image is distroless "nonroot" (the release's Dockerfile): no root to give up.
        "securityContext": {**copy.deepcopy(workloads.CONTAINER_SECURITY), "runAsNonRoot": True},
    }


def epp_deployment(plan: RenderPlan, options: InferencePoolOptions) -> Obj:
    name = epp_name(plan)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(plan, name),
        "spec": {
            # One active replica keeps one prefix-cache index; Recreate (the chart's) lets a
            # new picker take over at once instead of waiting beside the old one.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _epp_selector(plan)},
            "template": {
                "metadata": {"labels": _epp_labels(plan)},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": EPP_GRACE_S,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [epp_container(plan, options)],
                    "volumes": [{"name": "plugins-config", "configMap": {"name": name}}],
                },
            },
        },
    }


def epp_service(plan: RenderPlan) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(plan, epp_name(plan)),
        "spec": {"selector": _epp_selector(plan), "type": "ClusterIP", "ports": [
            {"name": "grpc-ext-proc", "port": EXT_PROC_PORT, "targetPort": EXT_PROC_PORT,
             "protocol": "TCP"},
            {"name": "http-metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT,
             "protocol": "TCP"}]},
    }


def epp_rbac(plan: RenderPlan) -> list[Obj]:
    """ServiceAccount, Role, RoleBinding: read the namespace's pods (the pool's endpoints) and
    its InferencePools (the chart's -sa and -non-sa Roles, as one). The alpha objectives and
    rewrites are read only where their CRDs are installed (the picker checks discovery)."""
    name = epp_name(plan)
    readable = (("", ("pods",)), (POOL_GROUP, ("inferencepools",)),
                ("inference.networking.x-k8s.io", ("inferenceobjectives",
                                                   "inferencemodelrewrites")))
    # Fresh lists per rule: a shared one would come out as a YAML alias.
    rules: list[Obj] = [{"apiGroups": [group], "resources": list(resources),
                         "verbs": ["get", "watch", "list"]} for group, resources in readable]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(plan, name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": _meta(plan, name), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(plan, name),
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": plan.namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}},
    ]


def epp_config_map(plan: RenderPlan) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(plan, epp_name(plan)),
            "data": {CONFIG_FILE: plugins_config(plan.engine)}}


def objects(plan: RenderPlan, options: InferencePoolOptions) -> list[Obj]:
    """In apply order: the picker's identity, config, Deployment and Service (unless the
    options name an existing picker), then the pool that references it."""
    picker: list[Obj] = []
    if options.endpoint_picker is None:
        picker = [*epp_rbac(plan), epp_config_map(plan), epp_deployment(plan, options),
                  epp_service(plan)]
    return [*picker, inference_pool(plan, options)]
