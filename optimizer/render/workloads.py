"""RenderPlan -> Kubernetes objects as plain dicts (never templated YAML text).

Last step of rendering. One Deployment per single-node pod kind (a LeaderWorkerSet when a
replica spans nodes), named <name>-<role>-<hash8>, and Services named after the endpoint that
select the active config hash, so a new plan rolls out as new objects beside the old ones.
Each workload gets a PodDisruptionBudget of the same name, and its pods a preStop drain and a
grace period sized from the plan's predicted latency (drain.py says why).
"""

from __future__ import annotations

from typing import Any

from trilemma.optimizer.render.drain import Drain, plan_drain
from trilemma.optimizer.render.ir import RenderedWorker, RenderPlan, Role

STARTUP_BUDGET_S = 600     # weights download and CUDA graph capture: 10 minutes to first /health
STARTUP_PERIOD_S = 10
LWS_API = "leaderworkerset.x-k8s.io/v1"
PDB_API = "policy/v1"
CACHE_MOUNT = "/root/.cache/huggingface"
# What every engine container can give up and still serve: no privilege escalation, no Linux
# capabilities (NCCL over NVLink/PCIe and CUDA IPC need none; shared memory is the dshm
# emptyDir). Not runAsNonRoot: the vLLM and SGLang images run as root and write /root/.cache,
# so engine pods meet Pod Security "baseline", not "restricted" (README, threat model).
CONTAINER_SECURITY: Obj = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

Obj = dict[str, Any]


def labels(plan: RenderPlan, role: Role, *, part: str | None = None) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": plan.engine.value,
        "app.kubernetes.io/instance": f"{plan.name}-{plan.config_hash}",
        "app.kubernetes.io/component": part or role.value,
        "app.kubernetes.io/managed-by": "trilemma",
        "trilemma.dev/endpoint": plan.name,
        "trilemma.dev/config-hash": plan.config_hash,
    }


def _config_pods(plan: RenderPlan) -> dict[str, str]:
    return {"trilemma.dev/endpoint": plan.name, "trilemma.dev/config-hash": plan.config_hash}


def selector(plan: RenderPlan, component: str) -> dict[str, str]:
    return {**_config_pods(plan), "app.kubernetes.io/component": component}


LABEL_PART = "trilemma.dev/part"


def object_name(plan: RenderPlan, role: Role, part: str = "") -> str:
    """<name>[-role][-part]-<hash8>: a mixed plan's part ("p1", at most 3 characters up to
    p99) is shorter than "-prefill", so children.MAX_NAME holds for it too."""
    middle = "" if role is Role.SERVER else f"-{role.value}"
    middle += f"-{part}" if part else ""
    return f"{plan.name}{middle}-{plan.config_hash}"


def _own(plan: RenderPlan, worker: RenderedWorker, part: str | None = None) -> dict[str, str]:
    """A workload's (or its pods') labels: a mixed plan's part labelled, so that each GPU
    type's workload selects its own pods while the Service selects them all."""
    out = labels(plan, worker.role, part=part)
    if worker.part:
        out[LABEL_PART] = worker.part
    return out


def _own_selector(plan: RenderPlan, worker: RenderedWorker, component: str) -> dict[str, str]:
    out = selector(plan, component)
    if worker.part:
        out[LABEL_PART] = worker.part
    return out


def _probe(path: str, period: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _probes(worker: RenderedWorker) -> Obj:
    if not worker.serves_http:
        return {}
    return {"startupProbe": _probe("/health", STARTUP_PERIOD_S,
                                   STARTUP_BUDGET_S // STARTUP_PERIOD_S),
            "readinessProbe": _probe("/health", 5, 3),
            "livenessProbe": _probe("/health", 10, 3)}


def _env(plan: RenderPlan, worker: RenderedWorker) -> list[Obj]:
    env: list[Obj] = [{"name": k, "value": v} for k, v in worker.env]
    if any("NixlConnector" in a for a in worker.argv()):
        # NIXL's side channel must advertise the pod's own address to its peer pool.
        env.append({"name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    if plan.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": plan.hf_token_secret, "key": "token", "optional": True}}})
    return env


def _pre_stop(plan: RenderPlan, worker: RenderedWorker, drain: Drain, follower: bool) -> Obj:
    if worker.role is Role.ROUTER:
        return {"exec": {"command": drain.router_pre_stop()}}
    # Followers serve nothing but must outlive their leader's drain: they watch the leader.
    host = "$LWS_LEADER_ADDRESS" if follower else "127.0.0.1"
    return {"exec": {"command": drain.pre_stop(plan.port, host=host)}}


def _container(plan: RenderPlan, worker: RenderedWorker, drain: Drain, *,
               follower: bool = False) -> Obj:
    resource = plan.scheduling(worker).gpu_resource
    gpus = {resource: str(worker.gpus_per_pod)} if worker.gpus_per_pod else {}
    serves = worker.serves_http and not follower
    container: Obj = {
        "name": "engine" if worker.role is not Role.ROUTER else "router",
        "image": plan.image,
        "command": list(worker.command),
        "args": worker.argv(follower=follower),
        "resources": {"limits": dict(gpus), "requests": dict(gpus)} if gpus else {},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "lifecycle": {"preStop": _pre_stop(plan, worker, drain, follower)},
        "securityContext": dict(CONTAINER_SECURITY),
    }
    if serves:
        container["ports"] = [{"name": "http", "containerPort": plan.port}]
        container.update(_probes(worker))
    env = _env(plan, worker)
    if env:
        container["env"] = env
    if plan.model_cache_pvc and worker.role is not Role.ROUTER:
        container["volumeMounts"].append({"name": "model-cache", "mountPath": CACHE_MOUNT})
    return container


def _volumes(plan: RenderPlan, worker: RenderedWorker) -> list[Obj]:
    # NCCL and the engines' IPC use /dev/shm; the container default of 64 MiB is too small.
    volumes: list[Obj] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if plan.model_cache_pvc and worker.role is not Role.ROUTER:
        volumes.append({"name": "model-cache",
                        "persistentVolumeClaim": {"claimName": plan.model_cache_pvc}})
    return volumes


def pod_template(plan: RenderPlan, worker: RenderedWorker, drain: Drain, *,
                 part: str | None = None, follower: bool = False) -> Obj:
    spec: Obj = {
        "containers": [_container(plan, worker, drain, follower=follower)],
        "volumes": _volumes(plan, worker),
        "terminationGracePeriodSeconds": drain.grace_s,
        # The engines never call the Kubernetes API: no token for a compromised pod to use.
        "automountServiceAccountToken": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }
    where = plan.scheduling(worker)
    if worker.gpus_per_pod:
        if where.node_selector:
            spec["nodeSelector"] = dict(where.node_selector)
        if where.tolerations:
            spec["tolerations"] = [dict(t) for t in where.tolerations]
    return {"metadata": {"labels": _own(plan, worker, part)}, "spec": spec}


def deployment(plan: RenderPlan, worker: RenderedWorker, drain: Drain) -> Obj:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": object_name(plan, worker.role, worker.part),
                     "namespace": plan.namespace, "labels": _own(plan, worker)},
        "spec": {"replicas": worker.replicas,
                 "selector": {"matchLabels": _own_selector(plan, worker, worker.role.value)},
                 "template": pod_template(plan, worker, drain)},
    }


def leader_worker_set(plan: RenderPlan, worker: RenderedWorker, drain: Drain) -> Obj:
    """One replica = a group of `nodes` pods; the leader serves HTTP, the others join it."""
    leader = f"{worker.role.value}-leader"
    follower = f"{worker.role.value}-worker"
    return {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
        "metadata": {"name": object_name(plan, worker.role, worker.part),
                     "namespace": plan.namespace, "labels": _own(plan, worker)},
        "spec": {
            "replicas": worker.replicas,
            "leaderWorkerTemplate": {
                "size": worker.nodes,
                # A lost node breaks the replica's collectives: restart the whole group.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pod_template(plan, worker, drain, part=leader),
                "workerTemplate": pod_template(plan, worker, drain, part=follower,
                                               follower=True),
            },
        },
    }


def service(plan: RenderPlan, name: str, component: str, *, extra_ports: int = 0) -> Obj:
    ports: list[Obj] = [{"name": "http", "port": plan.port, "targetPort": "http",
                         "protocol": "TCP"}]
    if extra_ports:
        ports.append({"name": "bootstrap", "port": extra_ports, "targetPort": extra_ports,
                      "protocol": "TCP"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": plan.namespace,
                     "labels": labels(plan, Role.SERVER, part="service")},
        "spec": {"selector": selector(plan, component), "ports": ports},
    }


def _serving_component(worker: RenderedWorker) -> str:
    return f"{worker.role.value}-leader" if worker.nodes > 1 else worker.role.value


def front_component(plan: RenderPlan) -> str:
    """The component the endpoint Service <name> selects: the serving pods (a multi-node
    replica's leaders) of an aggregated plan, the router of a disaggregated one."""
    if _aggregated(plan):
        return _serving_component(plan.workers[0])
    return Role.ROUTER.value


def _aggregated(plan: RenderPlan) -> bool:
    """Every workload serves (one, or a mixed plan's one per GPU type): no router."""
    return all(w.role is Role.SERVER for w in plan.workers)


def workload(plan: RenderPlan, worker: RenderedWorker, drain: Drain) -> Obj:
    if worker.nodes > 1:
        return leader_worker_set(plan, worker, drain)
    return deployment(plan, worker, drain)


def disruption_budget(plan: RenderPlan, worker: RenderedWorker) -> Obj:
    """At most one pod of the workload evicted at a time (drain.py: why 1, even for one
    replica). A multi-node replica is one group of pods that fails as a whole, which a
    pod-counting budget cannot express; one pod at a time over all its groups' pods keeps
    at most one group down, and the group's recreation blocks the next eviction until it is
    ready again. Unready pods serve nothing, so they may always go (AlwaysAllow)."""
    if worker.nodes > 1:
        parts = [f"{worker.role.value}-leader", f"{worker.role.value}-worker"]
        match: Obj = {"matchLabels": {**_config_pods(plan), **(
                          {LABEL_PART: worker.part} if worker.part else {})},
                      "matchExpressions": [{"key": "app.kubernetes.io/component",
                                            "operator": "In", "values": parts}]}
    else:
        match = {"matchLabels": _own_selector(plan, worker, worker.role.value)}
    return {
        "apiVersion": PDB_API, "kind": "PodDisruptionBudget",
        "metadata": {"name": object_name(plan, worker.role, worker.part),
                     "namespace": plan.namespace, "labels": _own(plan, worker)},
        "spec": {"maxUnavailable": 1, "selector": match,
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def build(plan: RenderPlan, *, bootstrap_port: int = 0,
          e2e_p99_ms: float | None = None) -> list[Obj]:
    """Every object, in apply order: workloads, the Services that front them, then one
    PodDisruptionBudget per workload. `e2e_p99_ms` (the plan's predicted p99 end-to-end
    latency) sizes the pods' grace period.

    Disaggregated: the endpoint Service fronts the router; <name>-prefill and <name>-decode
    Services give the router stable addresses for the two pools.
    """
    drain = plan_drain(e2e_p99_ms)
    objects = [workload(plan, w, drain) for w in plan.workers]
    budgets = [disruption_budget(plan, w) for w in plan.workers]
    front = service(plan, plan.name, front_component(plan))
    if _aggregated(plan):
        return [*objects, front, *budgets]
    prefill, decode = plan.worker(Role.PREFILL), plan.worker(Role.DECODE)
    return [*objects, front,
            service(plan, f"{plan.name}-prefill", _serving_component(prefill),
                    extra_ports=bootstrap_port),
            service(plan, f"{plan.name}-decode", _serving_component(decode)), *budgets]
