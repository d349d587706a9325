"""Benchmark: N OptimizedEndpoints created at once against KMock; how fast does the
operator (its own process) get each one's children and status into the API?

    python -m tests.benchmarks.operator_create --endpoints 100

Prints p50/p95/max of create -> children present (Deployment, Service, plan ConfigMap) and
create -> status written (phase Deploying with the plan), and the operator's resident memory
afterwards. The search is excluded: the operator process plans with one precomputed plan (the
real search's result for the same spec, timed once and printed beside).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import kmock

from tests.support.kube import Api, ForgetfulEmulator, declare_resources, write_kubeconfig
from trilemma.optimizer.search import SearchSettings, plan
from trilemma.optimizer.spec import parse_spec

NS = "bench"
GPUS = 4096
SPEC: dict[str, Any] = {
    "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
    "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                 "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
                 "arrivals": {"kind": "poisson", "requestsPerSecond": 5}},
    "slo": {"ttftMs": {"p90": 1000}, "tpotMs": {"p90": 50}},
    "engine": {"name": "vllm"},
    "bounds": {"allowDisaggregation": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def real_plan(spec: dict[str, Any] | None = None,
              gpus: int = GPUS) -> tuple[dict[str, Any], float]:
    """The real search's plan for `spec` (SPEC) on `gpus` H100s, and how long it took."""
    request = parse_spec({k: v for k, v in (spec or SPEC).items() if k != "engine"} | {
        "hardware": {"gpus": [{"gpu": "h100_sxm", "count": gpus}]},
        "bounds": {"allowDisaggregation": False, "engines": ["vllm"]}})
    start = time.perf_counter()
    result = plan(request, settings=SearchSettings(workers=1)).to_dict()
    return result, time.perf_counter() - start


async def _wait_live(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {proc.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the operator did not become live")


async def run(endpoints: int, timeout: float) -> dict[str, Any]:
    plan_dict, search_s = real_plan()
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan_dict))
        async with ForgetfulEmulator() as server, kmock.Server(server):
            declare_resources(server)
            config = Path(tmp) / "kubeconfig"
            write_kubeconfig(config, str(server.url).rstrip("/"))
            port = _free_port()
            env = {**os.environ, "KUBECONFIG": str(config), "TRILEMMA_METRICS_PORT": "0",
                   "TRILEMMA_RESYNC_SECONDS": "60"}
            env.pop("KUBERNETES_SERVICE_HOST", None)
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.benchmarks.operator_process", "--plan",
                 str(plan_file), "--liveness-port", str(port)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                await _wait_live(port, proc)
                result = await _measure(Api(server), endpoints, timeout, proc.pid, search_s)
                result["requests"] = dict(server.served.most_common())
                return result
            finally:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def _measure(api: Api, endpoints: int, timeout: float, pid: int,
                   search_s: float) -> dict[str, Any]:
    rss_idle = _rss_mib(pid)
    cpu_before = _cpu_s(pid)
    await api.create({"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
                      "metadata": {"name": "gpus"},
                      "spec": {"gpus": [{"gpu": "h100_sxm", "count": GPUS}]}})
    names = [f"ep-{i:03d}" for i in range(endpoints)]
    created: dict[str, float] = {}
    children: dict[str, float] = {}
    written: dict[str, float] = {}

    async def create(name: str) -> None:
        body = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
                "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
                "spec": {**SPEC, "hardwarePoolRef": {"name": "gpus"}}}
        created[name] = time.perf_counter()
        await api.create(body)

    start = time.perf_counter()
    await asyncio.gather(*(create(n) for n in names))
    marks = ForgetfulEmulator.marks
    hashes: dict[str, str] = {}
    while len(written) < endpoints or len(children) < endpoints:
        if time.perf_counter() - start > timeout:
            break
        for (res, _ns, name), obj in list(api.server.objects.items()):
            if res.plural == "deployments" and not obj.deleted:
                labels = obj.raw.get("metadata", {}).get("labels") or {}
                hashes[labels.get("trilemma.dev/endpoint", "")] = name
        for name in names:
            created[name] = marks.get(f"optimizedendpoints/{name}", created[name])
            parts = [marks.get(f"deployments/{hashes.get(name)}"),
                     marks.get(f"services/{name}"), marks.get(f"configmaps/{name}-plan")]
            if name not in children and all(parts):
                children[name] = max(p for p in parts if p is not None)
            stamp = marks.get(f"phase/{name}/Deploying")
            if name not in written and stamp is not None:
                written[name] = stamp
        await asyncio.sleep(0.05)
    total = time.perf_counter() - start
    to_children = [children[n] - created[n] for n in children]
    to_status = [written[n] - created[n] for n in written]
    return {
        "endpoints": endpoints, "children_done": len(children), "status_done": len(written),
        "children_p50_s": statistics.median(to_children) if to_children else None,
        "children_p95_s": _quantile(to_children, 0.95) if to_children else None,
        "children_max_s": max(to_children) if to_children else None,
        "status_p50_s": statistics.median(to_status) if to_status else None,
        "status_p95_s": _quantile(to_status, 0.95) if to_status else None,
        "status_max_s": max(to_status) if to_status else None,
        "wall_s": total, "rss_idle_mib": rss_idle, "rss_after_mib": _rss_mib(pid),
        "operator_cpu_ms_per_endpoint": (_cpu_s(pid) - cpu_before) * 1000 / endpoints,
        "search_s_excluded": search_s,
    }


def report(r: dict[str, Any]) -> str:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    return "\n".join([
        f"{r['endpoints']} OptimizedEndpoints created at once against KMock "
        f"(operator in its own process, plans precomputed)",
        f"  create -> children present : p50 {s(r['children_p50_s'])}  p95 "
        f"{s(r['children_p95_s'])}  max {s(r['children_max_s'])}  "
        f"({r['children_done']}/{r['endpoints']})",
        f"  create -> status written   : p50 {s(r['status_p50_s'])}  p95 "
        f"{s(r['status_p95_s'])}  max {s(r['status_max_s'])}  "
        f"({r['status_done']}/{r['endpoints']})",
        f"  all done in {r['wall_s']:.1f} s; operator RSS {r['rss_idle_mib']:.0f} MiB idle, "
        f"{r['rss_after_mib']:.0f} MiB after; operator CPU "
        f"{r['operator_cpu_ms_per_endpoint']:.0f} ms per endpoint",
        f"  API requests per endpoint: {sum(r['requests'].values()) / r['endpoints']:.1f} "
        "(the emulator, single-threaded Python, is the bottleneck: see the README)",
        f"  (excluded: one real search for this spec takes {r['search_s_excluded']:.1f} s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.endpoints, args.timeout))
    print(json.dumps(result, indent=2) if args.json else report(result))
    done = result["children_done"] == result["status_done"] == args.endpoints
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
