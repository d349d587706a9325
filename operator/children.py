"""An endpoint's children as plain dicts: a pure function of the plan and the resource's spec.

The optimizer's renderer (trilemma.optimizer.render) decides the engine command, the pods and
the Services. This module adds only what the custom resource owns: the user's extra
arguments and environment, the model cache, the rollout strategy, owner references, the plan
ConfigMap and the PodMonitor. Same inputs, same bytes: the children are what GitOps diffs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from trilemma.operator import naming
from trilemma.operator.resources import OptimizedEndpointSpec
from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import Plan, ServingConfig, canonical_json
from trilemma.optimizer.spec import GpuGroup

Obj = dict[str, Any]
PODMONITOR_API = "monitoring.coreos.com/v1"
# Longest endpoint name whose children stay valid: "<name>-prefill-<hash8>" must fit a
# 63-character label value (app.kubernetes.io/instance) and DNS label (Service names).
MAX_NAME = 45


@dataclass(frozen=True)
class Owner:
    """The custom resource the children belong to (for ownerReferences)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> Obj:
        return {"apiVersion": naming.API_VERSION, "kind": "OptimizedEndpoint",
                "name": self.name, "uid": self.uid, "controller": True,
                "blockOwnerDeletion": True}


@dataclass(frozen=True)
class Children:
    """Everything one configuration deploys, by role in the rollout."""

    workloads: list[Obj]   # Deployments / LeaderWorkerSets named <name>[-role]-<hash8>
    services: list[Obj]    # stable names; their selectors pick the active hash
    config_hash: str
    # A PodDisruptionBudget per workload, of the workload's name: created with it, deleted
    # with it, never counted in availability (the renderer's drain.py says why they exist).
    budgets: list[Obj]
    # spec.gateway.inferencePool enabled: the InferencePool <name> goes with the Services
    # (stable name, its selector moved to the new hash on rollout like theirs)...
    pool: Obj | None = None
    # ...and the endpoint picker <name>-epp (unless the spec names one), applied like the plan
    # ConfigMap: owned by the endpoint, outside the hashed objects rollouts prune.
    picker: list[Obj] = field(default_factory=list)

    def owned(self) -> list[Obj]:
        """Every object this configuration creates, for removing a half-made new endpoint."""
        return [*self.workloads, *self.budgets, *self.services, *self.picker,
                *([self.pool] if self.pool is not None else [])]


def _extra_args(container: Obj, extra: list[str], engine: Engine,
                decided: frozenset[str]) -> None:
    # A user flag that sets one the plan decided, in any spelling the engine accepts, would
    # silently override the configuration the predictions were made for: refuse it, say which.
    for i, arg in enumerate(extra):
        flag = render.overridden_flag(engine.value, arg, decided)
        if flag == "--config":
            raise InputError(f"serving.extraArgs.{i}", arg,
                             "a config file can set any flag, the plan's included; pass the "
                             "flags themselves")
        if flag is not None:
            raise InputError(f"serving.extraArgs.{i}", arg,
                             f"{flag} is set by the plan; change the spec (bounds, SLO) "
                             "instead of overriding it")
    container["args"] = [*container.get("args", []), *extra]


def _env(container: Obj, spec: OptimizedEndpointSpec) -> None:
    extra = [{"name": e.name, "value": e.value} for e in spec.serving.env]
    if not extra:
        return
    taken = {e["name"] for e in container.get("env", [])}
    for i, e in enumerate(extra):
        if e["name"] in taken:
            raise InputError(f"serving.env.{i}.name", e["name"],
                             "set by the operator for this configuration")
    container["env"] = [*container.get("env", []), *extra]


def _host_path_cache(pod_spec: Obj, container: Obj, host_path: str) -> None:
    pod_spec["volumes"].append({"name": "model-cache",
                                "hostPath": {"path": host_path, "type": "DirectoryOrCreate"}})
    container["volumeMounts"].append({"name": "model-cache", "mountPath": render.CACHE_MOUNT})


def _pod_specs(workload: Obj) -> list[Obj]:
    spec = workload["spec"]
    if workload["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    lws = spec["leaderWorkerTemplate"]
    return [lws["leaderTemplate"]["spec"], lws["workerTemplate"]["spec"]]


def _customize(workload: Obj, spec: OptimizedEndpointSpec, owner: Owner, engine: Engine,
               decided: frozenset[str]) -> Obj:
    out = copy.deepcopy(workload)
    out["metadata"]["ownerReferences"] = [owner.reference()]
    leader = True
    for pod_spec in _pod_specs(out):
        for container in pod_spec["containers"]:
            if container["name"] != "engine":
                continue  # the router runs its own command, untouched
            if leader:
                _extra_args(container, list(spec.serving.extra_args), engine, decided)
            _env(container, spec)
            cache = spec.serving.model_cache
            if cache is not None and cache.host_path is not None:
                _host_path_cache(pod_spec, container, cache.host_path)
        leader = False
    if out["kind"] == "Deployment":
        out["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {
            "maxSurge": spec.rollout.max_surge,
            "maxUnavailable": spec.rollout.max_unavailable}}
        out["spec"]["progressDeadlineSeconds"] = spec.rollout.progress_deadline_seconds
    return out


PDB_API = "policy/v1"


def build(config: ServingConfig, spec: OptimizedEndpointSpec, owner: Owner,
          pool_group: GpuGroup, *, served_model: str | None = None,
          e2e_p99_ms: float | None = None, other_groups: tuple[GpuGroup, ...] = ()) -> Children:
    """The workloads, Services and disruption budgets deploying `config`; `served_model` is
    what the engine loads when it differs from the planned model id (a ConfigMap model's
    checkpoint); `e2e_p99_ms`, the plan's predicted p99 latency, sizes the pods' drain;
    `other_groups`, a mixed plan's other GPU types' pool groups (their nodes' scheduling).

    Raises InputError when the configuration cannot be deployed as specified (a vLLM
    disaggregated plan without a router command, an extra argument overriding the plan).
    """
    engine = Engine(config.engine)
    cache = spec.serving.model_cache
    options = render.RenderOptions(
        pool_group=pool_group, pool_groups=other_groups,
        router_command=tuple(spec.engine.router_command) if spec.engine.router_command
        else None,
        served_model=served_model if served_model != config.model else None,
        e2e_p99_ms=e2e_p99_ms)
    objects = render.manifests(
        config, name=owner.name, engine=engine.value, namespace=owner.namespace,
        image=spec.engine.image(engine), options=options,
        hf_token_secret=spec.serving.hf_token_secret,
        model_cache_pvc=cache.claim_name if cache is not None else None,
        inference_pool=_pool_options(spec))
    # The picker's objects first: its Deployment and Service are no workload or endpoint
    # Service (labelled for the picker, not with the endpoint and a hash).
    picker = [copy.deepcopy(o) for o in objects if _is_picker(o)]
    objects = [o for o in objects if not _is_picker(o)]
    pool = next((copy.deepcopy(o) for o in objects if o["kind"] == "InferencePool"), None)
    decided = render.decided_flags(config, engine.value, options=options)
    workloads = [_customize(o, spec, owner, engine, decided) for o in objects
                 if o["kind"] not in ("Service", "PodDisruptionBudget", "InferencePool")]
    services = [copy.deepcopy(o) for o in objects if o["kind"] == "Service"]
    budgets = [copy.deepcopy(o) for o in objects if o["kind"] == "PodDisruptionBudget"]
    for obj in [*services, *budgets, *picker, *([pool] if pool is not None else [])]:
        obj["metadata"]["ownerReferences"] = [owner.reference()]
    hashes = {w["metadata"]["labels"][naming.LABEL_CONFIG_HASH] for w in workloads}
    return Children(workloads=workloads, services=services, config_hash=hashes.pop(),
                    budgets=budgets, pool=pool, picker=picker)


def _pool_options(spec: OptimizedEndpointSpec) -> render.InferencePoolOptions | None:
    wanted = spec.gateway.inference_pool if spec.gateway is not None else None
    if wanted is None or not wanted.enabled:
        return None
    return render.InferencePoolOptions(endpoint_picker=wanted.endpoint_picker,
                                       failure_mode=wanted.failure_mode)


def _is_picker(obj: Obj) -> bool:
    return render.gateway.LABEL_PICKER_FOR in (obj["metadata"].get("labels") or {})


PLAN_KEY = "plan.json"
# With replicas.owner external: a KEDA ScaledObject for the endpoint (keda.py), ready to apply.
KEDA_KEY = "keda-scaledobject.yaml"


def plan_config_map(owner: Owner, plan: Plan, *, request_digest: str, config_hash: str,
                    keda: Obj | None = None) -> Obj:
    """ConfigMap <name>-plan: the whole plan as canonical JSON, and what it was made from;
    and `keda`, a ScaledObject sample, as YAML."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": f"{owner.name}-plan", "namespace": owner.namespace,
            "labels": {"app.kubernetes.io/managed-by": "trilemma",
                       "app.kubernetes.io/component": "plan",
                       naming.LABEL_ENDPOINT: owner.name,
                       naming.LABEL_CONFIG_HASH: config_hash},
            "annotations": {naming.ANNOTATION_REQUEST_DIGEST: request_digest},
            "ownerReferences": [owner.reference()],
        },
        "data": {PLAN_KEY: canonical_json(plan.to_dict()),
                 **({KEDA_KEY: yaml.safe_dump(keda, sort_keys=False)} if keda else {})},
    }


def stored_plan(config_map: Obj | None) -> Plan | None:
    """The plan a plan ConfigMap holds, decoded: the one place the operator reads stored plans.
    None when there is none that decodes (absent, written by an older format, edited by hand):
    the caller then plans again, as for a missing one."""
    try:
        text = ((config_map or {}).get("data") or {})[PLAN_KEY]
        return Plan.from_dict(json.loads(text))
    except (KeyError, TypeError, ValueError):  # MalformedPlan and bad JSON are ValueErrors
        return None


def pod_monitor(owner: Owner) -> Obj:
    """Scrapes every engine pod of the endpoint, whichever configuration hash it runs."""
    return {
        "apiVersion": PODMONITOR_API, "kind": "PodMonitor",
        "metadata": {"name": owner.name, "namespace": owner.namespace,
                     "labels": {"app.kubernetes.io/managed-by": "trilemma",
                                naming.LABEL_ENDPOINT: owner.name},
                     "ownerReferences": [owner.reference()]},
        "spec": {
            "selector": {"matchLabels": {naming.LABEL_ENDPOINT: owner.name,
                                         "app.kubernetes.io/managed-by": "trilemma"}},
            # Become the series labels trilemma_dev_endpoint / _config_hash, which the
            # closed loop's queries select on.
            "podTargetLabels": [naming.LABEL_ENDPOINT, naming.LABEL_CONFIG_HASH],
            "podMetricsEndpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
        },
    }


def service_selector(service: Obj | None) -> dict[str, str] | None:
    """The pods a live Service sends traffic to (None: no Service)."""
    return None if service is None else dict(service.get("spec", {}).get("selector") or {})


def service_hash(service: Obj) -> str | None:
    """The configuration hash a Service currently sends traffic to."""
    return (service_selector(service) or {}).get(naming.LABEL_CONFIG_HASH)
