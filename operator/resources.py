"""The custom resources' specs and status: `OptimizedEndpoint` and `HardwarePool`.

One source of truth: these pydantic models validate what the operator reads, and `trilemma
crds` generates the CRD schemas from them (crdgen.py). They reuse the optimizer's spec models
for everything the search reads (workload, SLO, objective, bounds, GPU groups) and add only
what is Kubernetes' business: where the model's config lives, images, serving extras, rollout,
retune and Prometheus settings.

Checks that need the cluster (does the ConfigMap exist, is the pool there) or the catalogs
(is the model known) happen in the reconciler, which reports them in status; these models
check shape and the rules one document can decide.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from trilemma.operator.endpoint_status import (
    ActiveConfiguration,
    Condition,
    ConditionType,
    EndpointPhase,
    FrontPoint,
    Optimization,
    OptimizedEndpointStatus,
    Predictions,
    RolloutState,
    RolloutStatus,
    TunedWorkload,
    status_field_names,
)
from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.spec import (
    HardwarePool,
    Objective,
    QualityScore,
    SearchBounds,
    Slo,
    SpecModel,
    Workload,
    rule_error,
)

# The status models are declared in endpoint_status.py; re-exported for the callers that read
# spec and status from one module.
__all__ = [  # noqa: RUF022 (grouped: re-exported first)
    "ActiveConfiguration",
    "Condition",
    "ConditionType",
    "EndpointPhase",
    "FrontPoint",
    "OptimizedEndpointStatus",
    "Optimization",
    "Predictions",
    "RolloutState",
    "RolloutStatus",
    "TunedWorkload",
    "status_field_names",
]

# RFC 1123 names: what Kubernetes accepts for ConfigMaps, Secrets, PVCs and pools.
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# A normalised absolute directory: no "." or ".." segments, no "//", no trailing "/", not
# "/" itself, portable characters only. RE2 (the API server's regex engine) has no
# lookahead, so a segment is spelled as: not starting with a dot, one dot then a non-dot, or
# two dots then more.
_SEGMENT = r"([A-Za-z0-9_-][A-Za-z0-9._-]*|\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\.\.[A-Za-z0-9._-]+)"
_HOST_DIR = re.compile(rf"^(/{_SEGMENT})+$")
# Prometheus label names (the data model's rule); a label selector's keys must be one.
_PROM_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# The matchers the operator always sets on an endpoint's series: a tenant may add to them,
# never replace them (that would read another namespace's traffic).
RESERVED_PROMETHEUS_LABELS = ("namespace", "trilemma_dev_endpoint")
# "25%" or a count; Kubernetes' IntOrString for maxSurge / maxUnavailable.
_PERCENT = re.compile(r"^(100|[1-9]?[0-9])%$")

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=_DNS_NAME.pattern)]
IntOrPercent = Annotated[
    int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


def _int_or_percent(value: int | str, field: str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise rule_error("must be 0 or more", field=field, value=value)
        return value
    if not _PERCENT.match(value):
        raise rule_error("a count or a percentage such as 25%", field=field, value=value)
    return value


class ConfigMapModel(SpecModel):
    """A model architecture given as a Hugging Face config.json held in a ConfigMap."""

    name: ObjectName = Field(description="ConfigMap in the endpoint's namespace.")
    key: str = Field(default="config.json", min_length=1, max_length=253,
                     description="Key of the ConfigMap holding the config.json text.")


class ModelRef(SpecModel):
    """One model: a bundled id, or a config.json in a ConfigMap plus the checkpoint to serve."""

    id: str | None = Field(
        default=None, min_length=1, max_length=253,
        description="Bundled model id, e.g. meta-llama/Llama-3.1-8B-Instruct.")
    config_map: ConfigMapModel | None = Field(
        default=None, description="A config.json in a ConfigMap, for models not bundled.")
    served_model: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="What the engine loads: a Hugging Face id or a path in the pod. Required "
                    "with configMap; default: id.")
    quality: QualityScore | None = Field(
        default=None, description="Published benchmark score; default: the bundled table's.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.id is None) == (self.config_map is None):
            raise rule_error("give id (a bundled model) or configMap, exactly one", field="id",
                             value=self.id)
        if self.config_map is not None and self.served_model is None:
            raise rule_error("a configMap model needs servedModel: the checkpoint the engine "
                             "loads (Hugging Face id or path in the pod)", field="servedModel")
        if self.id is not None and ("/" in self.id and self.id.endswith(".json")):
            raise rule_error("a file path cannot be read by the operator; put the config.json "
                             "in a ConfigMap and use configMap", field="id", value=self.id)
        return self

    @property
    def checkpoint(self) -> str:
        """The model the engine serves."""
        return self.served_model or str(self.id)


class HardwarePoolRef(SpecModel):
    name: ObjectName = Field(description="Name of a cluster-scoped HardwarePool.")


class EngineSpec(SpecModel):
    """Which serving engine to run, and the images to run it from."""

    name: Engine | None = Field(
        default=None, description="vllm or sglang; empty lets the search choose.")
    vllm_image: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="Image for vLLM; default vllm/vllm-openai.")
    sglang_image: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="Image for SGLang; default lmsysorg/sglang.")
    router_command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, min_length=1, max_length=64,
        description="Command of the prefill/decode router (vLLM disaggregated plans need one; "
                    "SGLang ships sglang_router).")

    def image(self, engine: Engine) -> str | None:
        return self.vllm_image if engine is Engine.VLLM else self.sglang_image


class EnvVar(SpecModel):
    name: str = Field(min_length=1, max_length=256, pattern=_ENV_NAME.pattern)
    value: str = Field(default="", max_length=32768)


class ModelCache(SpecModel):
    """Where downloaded weights persist across restarts: a PVC or a directory on the node."""

    claim_name: ObjectName | None = Field(
        default=None, description="PersistentVolumeClaim mounted at the Hugging Face cache.")
    host_path: str | None = Field(
        default=None, pattern=_HOST_DIR.pattern, max_length=4096,
        description="Node directory mounted at the Hugging Face cache (absolute, normalised); "
                    "only under a prefix the HardwarePool's modelCacheHostPaths allows.")

    @model_validator(mode="after")
    def _one_kind(self) -> ModelCache:
        if (self.claim_name is None) == (self.host_path is None):
            raise rule_error("give claimName or hostPath, exactly one", field="claimName",
                             value=self.claim_name)
        return self


class ServingExtras(SpecModel):
    """What the operator adds to the plan's engine command and pods, verbatim."""

    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=64,
        description="Appended to the engine's arguments; may not repeat a flag the plan sets.")
    env: list[EnvVar] = Field(default_factory=list, max_length=64,
                              description="Environment variables of the engine container.")
    model_cache: ModelCache | None = Field(
        default=None, description="Persistent model cache; default: none (download each start).")
    hf_token_secret: ObjectName | None = Field(
        default=None, description="Secret whose key `token` holds a Hugging Face token.")

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        names = [e.name for e in env]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise rule_error(f"{name} is set twice", field=f"{i}.name", value=name)
        return env


class Rollout(SpecModel):
    auto_apply: bool = Field(
        default=True, description="false: recommend only (plan in status and ConfigMap).")
    max_surge: IntOrPercent = Field(default="25%",
                                    description="Deployment maxSurge: a count or a percentage.")
    max_unavailable: IntOrPercent = Field(
        default=0, description="Deployment maxUnavailable: a count or a percentage.")
    progress_deadline_seconds: int = Field(
        default=1800, ge=60, le=86400,
        description="How long a new configuration may take to become Ready.")

    @field_validator("max_surge", "max_unavailable")
    @classmethod
    def _int_or_percent(cls, value: int | str) -> int | str:
        return _int_or_percent(value, "")


class DriftThresholds(SpecModel):
    """Relative changes of the observed workload that trigger a re-plan."""

    rate: float = Field(default=0.3, gt=0, le=10, description="Request rate, relative.")
    prompt_tokens: float = Field(default=0.3, gt=0, le=10,
                                 description="Mean prompt length, relative.")
    output_tokens: float = Field(default=0.3, gt=0, le=10,
                                 description="Mean output length, relative.")
    prefix_share: float = Field(default=0.15, gt=0, le=1,
                                description="Prefix-cache hit share, absolute.")
    refused_share: float = Field(
        default=0.02, gt=0, le=1,
        description="Share of requests the engine refused (prompts past the deployed context "
                    "limit), absolute; a plan expects none.")


class Retune(SpecModel):
    enabled: bool = Field(default=False, description="Re-plan from observed traffic.")
    interval_seconds: int = Field(default=300, ge=10, le=86400,
                                  description="How often to compare traffic with the plan.")
    window_seconds: int = Field(default=900, ge=30, le=604800,
                                description="Query window of the traffic estimate.")
    drift: DriftThresholds = Field(default_factory=DriftThresholds,
                                   description="Changes that trigger a re-plan.")
    cooldown_seconds: int = Field(default=1800, ge=0, le=604800,
                                  description="Least time between two rollouts.")
    min_improvement: float = Field(
        default=0.1, ge=0, le=1,
        description="A new plan rolls out only if it beats the current one on the objective "
                    "by this share (or the current one violates the SLO).")


class SecretKeyRef(SpecModel):
    name: ObjectName = Field(description="Secret in the endpoint's namespace.")
    key: str = Field(default="token", min_length=1, max_length=253,
                     description="Key holding a bearer token.")


class PrometheusSpec(SpecModel):
    url: str | None = Field(
        default=None, pattern=r"^https?://", max_length=2048,
        description="Prometheus base URL; default: the operator's --prometheus-url.")
    auth_secret: SecretKeyRef | None = Field(default=None,
                                             description="Bearer token for Prometheus.")
    label_selector: dict[str, str] = Field(
        default_factory=dict, max_length=16,
        description="Extra PromQL label matchers, ANDed with the operator's own (namespace "
                    "and endpoint, which may not be given here).")

    @field_validator("label_selector")
    @classmethod
    def _label_names(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            if not _PROM_LABEL.match(key):
                raise rule_error("not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
                                 field=key, value=key)
            if key in RESERVED_PROMETHEUS_LABELS:
                raise rule_error("set by the operator to the endpoint's own namespace and "
                                 "name; a selector may only narrow them", field=key, value=key)
            if len(value) > 1024:
                raise rule_error("longer than 1024 characters", field=key, value=value[:40])
        return selector


# RFC 1123 label: what a Service name must be (shorter and dot-free, unlike ObjectName).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class InferencePoolSpec(SpecModel):
    """A Gateway API InferencePool over the endpoint's serving pods (Inference Extension
    v1.5.0), so a Gateway routes each request to the pod an endpoint picker chooses."""

    enabled: bool = Field(
        default=False, description="Deploy an InferencePool named after the endpoint; it "
                                   "needs the InferencePool CRD (inference.networking.k8s.io).")
    # A name only, never a namespace: the pool's endpointPickerRef has no namespace field, so
    # a tenant can point its pool at a picker of its own namespace and nowhere else.
    endpoint_picker: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=_DNS_LABEL.pattern,
        description="An endpoint picker Service already running in the endpoint's namespace; "
                    "default: the operator deploys one (<name>-epp).")
    failure_mode: render.gateway.FailureMode = Field(
        default="FailOpen", description="When the picker does not answer: FailOpen routes "
                                        "anyway, FailClose refuses the request.")


class GatewaySpec(SpecModel):
    """Routing through the Gateway API, beside the endpoint Service."""

    inference_pool: InferencePoolSpec = Field(
        default_factory=InferencePoolSpec, description="The InferencePool and its picker.")


class ReplicaOwner(enum.StrEnum):
    OPERATOR = "operator"
    EXTERNAL = "external"


# The most replicas of one configuration a spec may ask for: bounds the objects and GPUs one
# tenant's number can make the operator request.
MAX_REPLICAS = 512


class ReplicaPolicy(SpecModel):
    """Who sets the replica count of the planned configuration (never two writers of one
    field). The plan decides the configuration; the count moves between re-plans."""

    owner: ReplicaOwner = Field(
        default=ReplicaOwner.OPERATOR,
        description="operator: the operator scales from the observed rate against the plan's "
                    "per-replica capacity at the SLO. external: kubectl scale, an HPA or KEDA "
                    "own replicas.count (the scale subresource) and the operator follows it.")
    count: int | None = Field(
        default=None, ge=0, le=MAX_REPLICAS,
        description="The scale subresource's spec.replicas. With owner external, the count "
                    "deployed (0 stops every replica); unset: the plan's count. With owner "
                    "operator it is ignored (status.scaling says so).")
    min_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS,
                              description="owner operator: the fewest replicas.")
    max_replicas: int | None = Field(
        default=None, ge=1, le=MAX_REPLICAS,
        description="owner operator: the most replicas; default: as many as the pool has room "
                    "for.")
    target_utilization: float = Field(
        default=0.8, ge=0.1, le=1.0,
        description="owner operator: the share of a replica's capacity at the SLO it is "
                    "scaled to carry (headroom for bursts).")
    window_seconds: int = Field(default=120, ge=30, le=3600,
                                description="owner operator: the rate window read each check.")
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600,
        description="owner operator: scale up to the lowest count recommended over this long.")
    scale_down_stabilization_seconds: int = Field(
        default=300, ge=0, le=3600,
        description="owner operator: scale down to the highest count recommended over this "
                    "long (down slowly: a replica takes minutes to load a model).")

    @model_validator(mode="after")
    def _range(self) -> ReplicaPolicy:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise rule_error(f"below minReplicas ({self.min_replicas})",
                             field="maxReplicas", value=self.max_replicas)
        return self


class OptimizedEndpointSpec(SpecModel):
    """An inference endpoint described by what it must do; the operator picks how."""

    model: ModelRef | None = Field(default=None,
                                   description="The model to serve; or give models.")
    models: list[ModelRef] | None = Field(
        default=None, min_length=1, max_length=16,
        description="Candidate models; the search may pick any. Exclusive with model.")
    workload: Workload = Field(description="The traffic to serve.")
    slo: Slo = Field(default_factory=Slo, description="Targets every plan must meet.")
    objective: Objective = Field(default=Objective.BALANCED,
                                 description="min_cost, max_throughput, min_latency, balanced.")
    bounds: SearchBounds = Field(default_factory=SearchBounds,
                                 description="Limits on the configurations to try.")
    hardware_pool_ref: HardwarePoolRef = Field(description="The HardwarePool to draw GPUs from.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Engine and images.")
    serving: ServingExtras = Field(default_factory=ServingExtras,
                                   description="Extra engine arguments, env, caches, secrets.")
    rollout: Rollout = Field(default_factory=Rollout, description="How plans are applied.")
    retune: Retune = Field(default_factory=Retune, description="Re-planning from traffic.")
    prometheus: PrometheusSpec = Field(default_factory=PrometheusSpec,
                                       description="Where the endpoint's metrics are.")
    gateway: GatewaySpec | None = Field(
        default=None, description="Gateway API routing (an InferencePool); default: none.")
    replicas: ReplicaPolicy = Field(
        default_factory=ReplicaPolicy,
        description="Who owns the replica count (the scale subresource's spec.replicas is "
                    "replicas.count) and, when the operator does, how it scales.")

    @model_validator(mode="after")
    def _one_model_field(self) -> OptimizedEndpointSpec:
        if (self.model is None) == (self.models is None):
            raise rule_error("give model (one) or models (candidates), exactly one",
                             field="model")
        if self.workload.arrivals.kind == "trace":
            raise rule_error("trace arrivals read a file the operator cannot see; describe "
                             "the traffic with poisson or gamma arrivals",
                             field="workload.arrivals.kind", value="trace")
        return self

    @property
    def candidates(self) -> tuple[ModelRef, ...]:
        return (self.model,) if self.model is not None else tuple(self.models or ())


class HardwarePoolSpec(HardwarePool):
    """The GPUs a platform team offers to endpoints, per type (cluster-scoped)."""

    model_cache_host_paths: list[Annotated[str, Field(
        max_length=4096, pattern=_HOST_DIR.pattern)]] = Field(
        default_factory=list, max_length=16,
        description="Node directories under which endpoints drawing from this pool may put a "
                    "hostPath model cache (serving.modelCache.hostPath). Empty: none may. "
                    "Pools are cluster-scoped, so only the platform team sets this.")

    def allows_host_path(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/")
                   for p in self.model_cache_host_paths)

    def search_pool(self) -> HardwarePool:
        """The pool as the optimizer takes it (without the Kubernetes-only fields)."""
        return HardwarePool(gpus=self.gpus)


def to_wire(model: SpecModel) -> dict[str, Any]:
    """A model as the API server stores it: camelCase, enums as values, no unset optionals."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)
