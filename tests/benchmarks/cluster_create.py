"""Benchmark: N OptimizedEndpoints created at once on the real control plane
(trilemma.simfleet.cluster: etcd, kube-apiserver, controllers, scheduler, kwok GPU nodes).

    python -m tests.benchmarks.cluster_create --endpoints 100

The operator runs in its own process as its ServiceAccount (the chart's RBAC), planning with
one precomputed plan so the figures exclude the search (the real search's time for the spec is
printed beside). A watch on each kind timestamps, per endpoint: create -> children present
(Deployment, Service, plan ConfigMap), create -> status written (phase Deploying), create ->
Ready (pods scheduled onto fake GPU nodes, Ready, the Deployment Available, the operator's
status Ready). Also: the operator's API requests per endpoint (the API server's audit log),
its CPU time and resident memory, and the CPU time of every process on the machine's cores
(control plane, operator, this benchmark's watches) until the last endpoint's children were
present and until the last was Ready: what bounds the latency when the cores are saturated.

`--floor` runs no operator: the benchmark creates each endpoint and then, at once, the very
children the operator renders for it (Deployment, Service, plan ConfigMap, owned by the
endpoint). Its create -> children is what the control plane alone needs for the same objects
on the same cores: a lower bound for any operator.

Needs `bash .ci/install-kube` and helm (`.ci/fetch-helm`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config, watch

from tests.benchmarks.operator_create import SPEC as KMOCK_SPEC
from tests.benchmarks.operator_create import _cpu_s, _quantile, _rss_mib, _wait_live, real_plan
from tests.support.cluster import OPERATOR_NS, install_operator
from tests.tools import find_tool
from trilemma.operator import apply as applying
from trilemma.operator import children
from trilemma.operator.optimize import model_choice
from trilemma.operator.resources import HardwarePoolSpec, OptimizedEndpointSpec
from trilemma.optimizer.search import Plan
from trilemma.simfleet.cluster import LocalCluster, NodeGroup
from trilemma.simfleet.prometheus_server import free_port

NS = "bench"
GPUS_PER_NODE = 8
GROUP, VERSION = "trilemma.dev", "v1alpha1"
# The KMock benchmark's endpoint at its cheapest (one GPU each), so that every endpoint's pods
# fit on the fake nodes and become Ready.
SPEC: dict[str, Any] = {**KMOCK_SPEC, "objective": "min_cost"}


class Seen:
    """First time each (kind, endpoint) milestone was seen by a watch."""

    def __init__(self) -> None:
        self.at: dict[tuple[str, str], float] = {}

    def mark(self, what: str, endpoint: str | None) -> None:
        if endpoint:
            self.at.setdefault((what, endpoint), time.perf_counter())


async def _watch(list_fn: Any, seen: Seen, judge: Any, stop: asyncio.Event,
                 **kwargs: Any) -> None:
    w = watch.Watch()
    while not stop.is_set():
        try:
            async for event in w.stream(list_fn, timeout_seconds=30, **kwargs):
                judge(seen, event["object"])
                if stop.is_set():
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # a dropped watch is restarted, as a controller does
            await asyncio.sleep(0.2)


def _label(obj: Any) -> str | None:
    """The endpoint label of a typed object (Deployment, Service, ConfigMap)."""
    return (obj.metadata.labels or {}).get("trilemma.dev/endpoint")


def _judge_child(kind: str) -> Any:
    def judge(seen: Seen, obj: Any) -> None:
        seen.mark(kind, _label(obj))
        if kind == "deployment" and (obj.status.available_replicas or 0) >= max(
                obj.spec.replicas or 0, 1):
            seen.mark("available", _label(obj))  # what the endpoint's Ready waits for
    return judge


def _judge_endpoint(seen: Seen, obj: dict[str, Any]) -> None:
    name = obj["metadata"]["name"]
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Deploying", "Ready"):
        seen.mark("status", name)
    if phase == "Ready":
        seen.mark("ready", name)


def _children_renderer(plan: dict[str, Any], pool: dict[str, Any],
                       tmp: Path) -> Callable[[str, str], list[dict[str, Any]]]:
    """(endpoint name, uid) -> the children the operator creates for SPEC with `plan`, as it
    creates them (rendered by its own code, stamped with the applied hash)."""
    spec = OptimizedEndpointSpec.model_validate({**SPEC, "hardwarePoolRef": {"name": "gpus"}})
    assert spec.model is not None
    _, served = model_choice(spec.model, None, None, tmp)
    config = Plan.from_dict(plan).recommended.config
    group = HardwarePoolSpec.model_validate(pool).group(config.worker.gpu)

    def render(name: str, uid: str) -> list[dict[str, Any]]:
        owner = children.Owner(name, NS, uid)
        kids = children.build(config, spec, owner, group, served_model=served)
        plan_map = children.plan_config_map(owner, Plan.from_dict(plan), request_digest="floor",
                                            config_hash=kids.config_hash)
        return [applying.with_hash(o)
                for o in [plan_map, *kids.workloads, *kids.budgets, *kids.services]]
    return render


async def run(endpoints: int, timeout: float, *, floor: bool = False) -> dict[str, Any]:
    helm = find_tool("helm")
    if helm is None:
        raise SystemExit("helm not found: run .ci/fetch-helm")
    plan_dict, search_s = real_plan(SPEC, GPUS_PER_NODE)
    gpus = Plan.from_dict(plan_dict).recommended.config.gpus
    nodes = [NodeGroup("h100", -(-endpoints * gpus // GPUS_PER_NODE) + 1, GPUS_PER_NODE)]
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(nodes=nodes) as cluster:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan_dict))
        kubeconfig = install_operator(cluster, helm)
        pool = {"gpus": [{"gpu": "h100_sxm", "count": GPUS_PER_NODE * len(
            cluster.get("nodes")["items"]), "gpusPerNode": GPUS_PER_NODE}]}
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                       {"apiVersion": f"{GROUP}/{VERSION}", "kind": "HardwarePool",
                        "metadata": {"name": "gpus"}, "spec": pool}])
        if floor:
            pids = {p.name: p.popen.pid for p in cluster.processes}
            pids["benchmark"] = os.getpid()
            render = _children_renderer(plan_dict, pool, Path(tmp))
            result = await _measure(cluster, endpoints, timeout, pids, direct=render)
            result["search_s_excluded"] = search_s
            return result
        port = free_port()
        log = (Path(tmp) / "operator.log").open("wb")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TRILEMMA_METRICS_PORT": "0",
               "TRILEMMA_RESYNC_SECONDS": "5"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.operator_process", "--plan",
             str(plan_file), "--liveness-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            await _wait_live(port, proc)
            pids = {p.name: p.popen.pid for p in cluster.processes}
            pids.update({"operator": proc.pid, "benchmark": os.getpid()})
            result = await _measure(cluster, endpoints, timeout, pids)
            if result["ready_done"] < endpoints:
                print(cluster.kubectl("get", "oe", "-n", NS).stdout[-3000:], file=sys.stderr)
                print((Path(tmp) / "operator.log").read_text()[-3000:], file=sys.stderr)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        user = f"system:serviceaccount:{OPERATOR_NS}:"
        requests = {e["auditID"]: e for e in cluster.audit()
                    if e["user"]["username"].startswith(user)}
        result["operator_requests_per_endpoint"] = len(requests) / endpoints
        kinds: dict[str, int] = {}
        for e in requests.values():
            ref = e.get("objectRef") or {}
            key = f"{e['verb']} {ref.get('resource', '?')}" + (
                f"/{ref['subresource']}" if ref.get("subresource") else "")
            kinds[key] = kinds.get(key, 0) + 1
        result["operator_requests"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
        result["search_s_excluded"] = search_s
        return result


def _cpu_all(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process (0 for one that is gone)."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = _cpu_s(pid)
        except OSError:
            out[name] = 0.0
    return out


async def _measure(cluster: LocalCluster, endpoints: int, timeout: float,
                   pids: dict[str, int], *,
                   direct: Callable[[str, str], list[dict[str, Any]]] | None = None
                   ) -> dict[str, Any]:
    """`direct`: no operator runs; each endpoint's children (rendered by `direct`) are
    created by the benchmark itself as soon as the endpoint is, and the wait ends when all
    children are present."""
    pid = pids.get("operator", os.getpid())
    await config.load_kube_config(str(cluster.admin_kubeconfig))
    async with client.ApiClient() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        seen, stop = Seen(), asyncio.Event()
        watches = [
            asyncio.create_task(_watch(apps.list_namespaced_deployment, seen,
                                       _judge_child("deployment"), stop, namespace=NS)),
            asyncio.create_task(_watch(core.list_namespaced_service, seen,
                                       _judge_child("service"), stop, namespace=NS)),
            asyncio.create_task(_watch(core.list_namespaced_config_map, seen,
                                       _judge_child("configmap"), stop, namespace=NS)),
            asyncio.create_task(_watch(custom.list_namespaced_custom_object, seen,
                                       _judge_endpoint, stop, group=GROUP, version=VERSION,
                                       namespace=NS, plural="optimizedendpoints")),
        ]
        await asyncio.sleep(1.0)  # the watches are open before the first create
        rss_idle, cpu_before = _rss_mib(pid), _cpu_s(pid)
        names = [f"ep-{i:03d}" for i in range(endpoints)]
        created: dict[str, float] = {}

        async def create(name: str) -> None:
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "OptimizedEndpoint",
                    "metadata": {"name": name, "namespace": NS},
                    "spec": {**SPEC, "hardwarePoolRef": {"name": "gpus"}}}
            created[name] = time.perf_counter()
            made = await custom.create_namespaced_custom_object(GROUP, VERSION, NS,
                                                                "optimizedendpoints", body)
            if direct is not None:
                makers = {"ConfigMap": core.create_namespaced_config_map,
                          "Deployment": apps.create_namespaced_deployment,
                          "Service": core.create_namespaced_service}
                await asyncio.gather(*(makers[o["kind"]](NS, o)
                                       for o in direct(name, made["metadata"]["uid"])))

        cpu_start = _cpu_all(pids)
        cpu_children: dict[str, float] | None = None
        start = time.perf_counter()
        await asyncio.gather(*(create(n) for n in names))
        goals = ("available", "service", "configmap") if direct else ("ready",)
        while (not all((k, n) in seen.at for n in names for k in goals)
               and time.perf_counter() - start < timeout):
            await asyncio.sleep(0.2)
            if cpu_children is None and all((k, n) in seen.at for n in names
                                            for k in ("deployment", "service", "configmap")):
                cpu_children = _cpu_all(pids)  # within 0.2 s of the last child
                children_wall = time.perf_counter() - start
        wall = time.perf_counter() - start
        cpu_ready = _cpu_all(pids)
        if cpu_children is None and all((k, n) in seen.at for n in names  # in the last 0.2 s
                                        for k in ("deployment", "service", "configmap")):
            cpu_children, children_wall = cpu_ready, wall
        stop.set()
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)

    def durations(*kinds: str) -> list[float]:
        out = []
        for n in names:
            stamps = [seen.at.get((k, n)) for k in kinds]
            if all(s is not None for s in stamps):
                out.append(max(s for s in stamps if s is not None) - created[n])
        return out

    result: dict[str, Any] = {"endpoints": endpoints, "wall_s": wall,
                              "rss_idle_mib": rss_idle, "rss_after_mib": _rss_mib(pid),
                              "operator_cpu_ms_per_endpoint":
                                  (_cpu_s(pid) - cpu_before) * 1000 / endpoints,
                              "cores": os.cpu_count(), "floor": direct is not None,
                              # until the wait ended: all Ready (--floor: all Available)
                              "ready_wall_s": wall,
                              "cpu_s_until_ready": {k: cpu_ready[k] - cpu_start[k]
                                                    for k in pids}}
    if cpu_children is not None:
        result["children_wall_s"] = children_wall
        result["cpu_s_until_children"] = {k: cpu_children[k] - cpu_start[k] for k in pids}
    for key, kinds in (("children", ("deployment", "service", "configmap")),
                       ("status", ("status",)), ("available", ("available",)),
                       ("ready", ("ready",))):
        values = durations(*kinds)
        result[f"{key}_done"] = len(values)
        result[f"{key}_p50_s"] = statistics.median(values) if values else None
        result[f"{key}_p95_s"] = _quantile(values, 0.95) if values else None
        result[f"{key}_max_s"] = max(values) if values else None
    return result


def report(r: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    if r["floor"]:
        lines = [f"{r['endpoints']} OptimizedEndpoints created at once on the real control "
                 "plane, NO operator (--floor): each endpoint's children created by the "
                 "benchmark right after the endpoint"]
        milestones = (("children", "create -> children present"),
                      ("available", "create -> Deployment Available"))
    else:
        lines = [f"{r['endpoints']} OptimizedEndpoints created at once on the real control "
                 "plane (kube-apiserver + etcd + controllers + scheduler + kwok; operator in "
                 "its own process as its ServiceAccount, plans precomputed)"]
        milestones = (("children", "create -> children present"),
                      ("status", "create -> status written  "),
                      ("available", "create -> Deployment Available"),
                      ("ready", "create -> Ready           "))
    for key, label in milestones:
        lines.append(f"  {label}: p50 {s(r[key + '_p50_s'])}  p95 {s(r[key + '_p95_s'])}  "
                     f"max {s(r[key + '_max_s'])}  ({r[key + '_done']}/{r['endpoints']})")
    if not r["floor"]:
        lines += [
            f"  all Ready in {r['wall_s']:.1f} s; operator RSS {r['rss_idle_mib']:.0f} MiB "
            f"idle, {r['rss_after_mib']:.0f} MiB after; operator CPU "
            f"{r['operator_cpu_ms_per_endpoint']:.0f} ms per endpoint",
            f"  operator API requests per endpoint: {r['operator_requests_per_endpoint']:.1f} "
            "(the API server's audit log; watches count once): "
            + ", ".join(f"{k} {v / r['endpoints']:.1f}"
                        for k, v in r["operator_requests"].items() if v >= r["endpoints"] / 2)]
    lines.append(f"  (excluded: one real search for this spec takes "
                 f"{r['search_s_excluded']:.1f} s)")
    for key, wall_key, what in (("cpu_s_until_children", "children_wall_s",
                                 "every child present"),
                                ("cpu_s_until_ready", "ready_wall_s",
                                 "all Available" if r["floor"] else "all Ready")):
        if key not in r:
            continue
        cpu, wall = r[key], r[wall_key]
        lines.append(
            f"  CPU until {what} ({wall:.1f} s, {r['cores']} cores: "
            f"{sum(cpu.values()) / (wall * r['cores']):.0%} busy): "
            + ", ".join(f"{k} {v:.1f} s"
                        for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--floor", action="store_true",
                        help="no operator: create each endpoint's children directly, right "
                             "after the endpoint (the control plane's own create -> children)")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.endpoints, args.timeout, floor=args.floor))
    print(json.dumps(result, indent=2) if args.json else report(result))
    done = result["children_done" if args.floor else "ready_done"]
    return 0 if done == args.endpoints else 1


if __name__ == "__main__":
    raise SystemExit(main())
