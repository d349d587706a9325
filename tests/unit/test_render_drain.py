"""Pod termination: the grace period from the plan's latency, the preStop drain, the PDBs."""

import io
import json
import math
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine, QuantRecipe
from trilemma.optimizer.render import drain
from trilemma.optimizer.render.command import render_command
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S_VERSION = "1.30.0"
AGGREGATED = ServingConfig(model="Qwen/Qwen3-8B", replicas=3,
                           worker=WorkerConfig(gpu="h100_sxm", tp=2))
MULTI_NODE = ServingConfig(model="deepseek-ai/DeepSeek-V3", replicas=2,
                           worker=WorkerConfig(gpu="h100_sxm", tp=8, pp=2,
                                               quant=QuantRecipe.FP8))
DISAGGREGATED = ServingConfig(model="Qwen/Qwen3-8B", engine=Engine.SGLANG,
                              mode=Mode.DISAGGREGATED, worker=WorkerConfig(gpu="h100_sxm"),
                              replicas=2, prefill=WorkerConfig(gpu="h100_sxm", tp=2),
                              prefill_replicas=1)


@pytest.mark.parametrize(("p99_ms", "grace"), [
    (12_345.0, 50),      # 15 + 2 x 12.345 + 10 = 49.69 -> 50
    (None, 145),         # unknown: the 60 s default
    (float("nan"), 145),
    (0.0, 145),
    (1.0, drain.MIN_GRACE_S),
    (10_000_000.0, drain.MAX_GRACE_S),
    (math.inf, drain.MAX_GRACE_S),
])
def test_the_grace_period_is_the_sleep_plus_twice_the_p99_plus_the_exit_reserve(p99_ms, grace):
    planned = drain.plan_drain(p99_ms)
    assert planned.grace_s == grace
    assert planned.sleep_s + planned.budget_s + drain.EXIT_RESERVE_S <= grace


def test_every_pod_gets_the_grace_period_and_a_drain_bounded_by_it():
    options = render.RenderOptions(e2e_p99_ms=40_000.0)
    for cfg in (AGGREGATED, MULTI_NODE):
        for obj in render.manifests(cfg, name="chat", engine="vllm", options=options):
            for pod in _pods(obj):
                assert pod["spec"]["terminationGracePeriodSeconds"] == 105
                hook = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
                assert hook[:2] == ["python3", "-c"] and hook[3:] != []
                assert int(hook[3]) + int(hook[6]) + drain.EXIT_RESERVE_S == 105
    lws = render.manifests(MULTI_NODE, name="ds", engine="vllm")[0]
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    assert worker["lifecycle"]["preStop"]["exec"]["command"][4] == "$LWS_LEADER_ADDRESS"


def test_the_router_waits_out_the_whole_budget():
    objects = render.manifests(DISAGGREGATED, name="chat")
    (router,) = [o for o in objects if o["metadata"]["name"].startswith("chat-router-")
                 and o["kind"] == "Deployment"]
    hook = router["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]
    assert hook["exec"]["command"] == ["sleep", str(145 - drain.EXIT_RESERVE_S)]


@pytest.mark.parametrize("cfg", [AGGREGATED, MULTI_NODE, DISAGGREGATED])
def test_each_workload_has_a_pdb_over_exactly_its_own_pods(cfg):
    objects = render.manifests(cfg, name="chat", namespace="llm")
    workloads = [o for o in objects if o["kind"] in ("Deployment", "LeaderWorkerSet")]
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert objects[-len(budgets):] == budgets  # applied after what they protect
    assert [b["metadata"]["name"] for b in budgets] == [w["metadata"]["name"]
                                                        for w in workloads]
    for workload, pdb in zip(workloads, budgets, strict=True):
        kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
        assert pdb["metadata"]["labels"] == workload["metadata"]["labels"]
        assert pdb["metadata"]["namespace"] == "llm"
        assert pdb["spec"]["maxUnavailable"] == 1
        pods = _pods(workload)
        assert all(_selects(pdb["spec"]["selector"], p["metadata"]["labels"]) for p in pods)
        for other in workloads:
            if other is not workload:
                assert not any(_selects(pdb["spec"]["selector"], p["metadata"]["labels"])
                               for p in _pods(other))
        if workload["kind"] == "Deployment":
            assert pdb["spec"]["selector"] == workload["spec"]["selector"]


def test_a_new_configuration_gets_its_own_pdb():
    wider = ServingConfig(model="Qwen/Qwen3-8B", replicas=3,
                          worker=WorkerConfig(gpu="h100_sxm", tp=4))
    old, new = (render.manifests(c, name="chat")[-1] for c in (AGGREGATED, wider))
    assert old["metadata"]["name"] != new["metadata"]["name"]
    hashes = {o["spec"]["selector"]["matchLabels"]["trilemma.dev/config-hash"]
              for o in (old, new)}
    assert len(hashes) == 2


def test_render_command_sizes_the_grace_period_from_the_plan_files_prediction(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"recommended": {"config": AGGREGATED.to_dict(),
                                                "prediction": {"e2e_p99_ms": 20_000.0}}}))
    out = io.StringIO()
    render_command(path, "vllm", name="chat", namespace="llm", image=None, out=out)
    assert "terminationGracePeriodSeconds: 65\n" in out.getvalue()


def _pods(obj):
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    if obj["kind"] == "LeaderWorkerSet":
        lws = obj["spec"]["leaderWorkerTemplate"]
        return [lws["leaderTemplate"], lws["workerTemplate"]]
    return []


def _selects(selector, labels):
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


class _Metrics(BaseHTTPRequestHandler):
    busy: ClassVar[list[float]] = [3.0, 1.0, 0.0, 0.0]  # one reading per poll; last repeats
    reads = 0

    def do_GET(self):  # http.server calls it by this name
        type(self).reads += 1
        value = self.busy[min(self.reads, len(self.busy)) - 1]
        body = (f"# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {value}\n'
                f'vllm:num_requests_waiting{{model_name="m"}} 0.0\n').encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _hook(port, budget):
    command = drain.Drain(grace_s=60, sleep_s=0).pre_stop(port)
    command[0], command[6] = sys.executable, str(budget)
    return command


def test_the_prestop_script_waits_until_the_engine_is_idle_twice():
    _Metrics.busy, _Metrics.reads = [3.0, 1.0, 0.0, 0.0], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run(_hook(server.server_address[1], 30), check=True, timeout=30)
        assert _Metrics.reads == 4  # read 3, 1, 0, 0 and stopped: idle twice
    finally:
        server.shutdown()


def test_the_prestop_script_gives_up_at_its_budget_or_when_the_engine_is_gone():
    _Metrics.busy, _Metrics.reads = [5.0], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        done = subprocess.run(_hook(server.server_address[1], 1), timeout=30)
        assert done.returncode == 0 and time.monotonic() - started < 10
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert subprocess.run(_hook(free, 30), timeout=5).returncode == 0
