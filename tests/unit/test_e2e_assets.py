"""The e2e test's assets (tests/e2e/), checked without a cluster, Docker or kubectl.

What a cluster run would find out too late: manifests the API server or the operator would
refuse; a pool too small for a rollout's two configurations; a spec change that does not change
the plan; a rendered `vllm serve` command that the shim and the sim-server cannot run; checks in
run_e2e.py that expect children other than the operator's own. Here the manifests go through
the CRD schemas and the pydantic models, the plans through the real search and renderer, the
engine command through the shim into a live sim-server, and run_e2e.py's checks through the
children the operator builds for those plans.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests import tools
from trilemma.operator import children, endpoint, naming, status
from trilemma.operator.optimize import (
    Models,
    default_planner,
    model_choice,
    plan_request,
    request_digest,
)
from trilemma.operator.resources import HardwarePoolSpec, OptimizedEndpointSpec, to_wire
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import Plan, ServingConfig
from trilemma.simfleet import cli_server, engine_flags
from trilemma.simfleet.cluster import DEFAULT_NODES

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "e2e"
SHIM = E2E / "sim" / "vllm"
CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))


def _driver() -> ModuleType:
    # run_e2e.py is a script, not a package module; registered in sys.modules because its
    # dataclasses look their module up there.
    spec = importlib.util.spec_from_file_location("trilemma_e2e_driver", E2E / "run_e2e.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


drv = _driver()
CRDS = {doc["spec"]["names"]["kind"]: doc
        for doc in (yaml.safe_load(p.read_text(encoding="utf-8")) for p in CRD_FILES)}
SPEC_MODELS = {"OptimizedEndpoint": OptimizedEndpointSpec, "HardwarePool": HardwarePoolSpec}
MANIFEST_FILES = sorted(drv.MANIFESTS.glob("*.yaml"))
POOL = drv.load_manifest(drv.POOL_FILE)
POOL_SPEC = HardwarePoolSpec.model_validate(POOL["spec"])
ENDPOINT = drv.load_manifest(drv.ENDPOINT_FILE)
CHANGED = drv.load_manifest(drv.CHANGED_ENDPOINT_FILE)
INVALID = drv.load_manifest(drv.INVALID_ENDPOINT_FILE)
NAMESPACE = drv.load_manifest(drv.NAMESPACE_FILE)
GPU, RESOURCE = drv.pool_resource(POOL)
NODE_POOL = drv.load_manifest(drv.NODE_GPU_POOL_FILE)  # --no-containers
NODE_POOL_SPEC = HardwarePoolSpec.model_validate(NODE_POOL["spec"])


# ---- manifests ---------------------------------------------------------------------------------


def test_every_manifest_file_is_loaded_by_the_driver():
    used = {drv.NAMESPACE_FILE, drv.POOL_FILE, drv.NODE_GPU_POOL_FILE, drv.ENDPOINT_FILE,
            drv.CHANGED_ENDPOINT_FILE, drv.INVALID_ENDPOINT_FILE}
    assert set(MANIFEST_FILES) == used


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_is_valid_for_the_api_server_and_the_operator(path):
    doc = drv.load_manifest(path)
    if doc["kind"] in CRDS:
        crd = CRDS[doc["kind"]]
        assert doc["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
        assert not errors, errors
        SPEC_MODELS[doc["kind"]].model_validate(doc["spec"])
        namespaced = crd["spec"]["scope"] == "Namespaced"
        assert ("namespace" in doc["metadata"]) == namespaced
    else:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_endpoints_live_in_the_namespace_and_use_the_pool_and_the_sim_image():
    for doc in (ENDPOINT, CHANGED, INVALID):
        assert doc["metadata"]["namespace"] == NAMESPACE["metadata"]["name"]
        assert doc["spec"]["hardwarePoolRef"]["name"] == POOL["metadata"]["name"]
        assert doc["spec"]["engine"] == {"name": "vllm", "vllmImage": drv.MANIFEST_SIM_IMAGE}
    # The simulated engine emulates the pool's GPU, so its timing is the one planned for.
    for doc in (ENDPOINT, CHANGED):
        env = {e["name"]: e["value"] for e in doc["spec"]["serving"]["env"]}
        assert env["TRILEMMA_SIM_GPU"] == GPU
    replaced = drv.endpoint_manifest(drv.ENDPOINT_FILE, "registry.example:5000/sim:abc")
    assert replaced["spec"]["engine"]["vllmImage"] == "registry.example:5000/sim:abc"


def test_the_pool_is_fake_gpus_that_one_patched_node_holds():
    assert RESOURCE != "nvidia.com/gpu"  # never competes with a real device plugin
    group = POOL_SPEC.gpus[0]
    assert group.effective_resource_name == RESOURCE
    assert group.count <= drv.FAKE_GPUS_PER_NODE
    assert group.effective_gpus_per_node <= drv.FAKE_GPUS_PER_NODE


def test_the_gpu_node_pool_is_the_fake_pool_on_the_kwok_h100_nodes(tmp_path):
    # The same pool for the planner: name, GPU, count, GPUs per node, price; the search gets
    # the same request but for where the pods go (node selector, tolerations, resource).
    assert NODE_POOL["metadata"] == POOL["metadata"]
    fake, real = POOL_SPEC.gpus[0], NODE_POOL_SPEC.gpus[0]
    placement = {"node_selector", "tolerations", "resource_name"}
    assert real.model_dump(exclude=placement) == fake.model_dump(exclude=placement)
    spec = OptimizedEndpointSpec.model_validate(ENDPOINT["spec"])
    assert spec.model is not None
    choice, served = model_choice(spec.model, None, None, tmp_path)
    models = Models(choices=[choice], checkpoints={choice.id: served})
    requests = [plan_request(spec, models, pool).model_dump(
        exclude={"hardware": {"gpus": {0: placement}}}) for pool in (POOL_SPEC, NODE_POOL_SPEC)]
    assert requests[0] == requests[1]
    # Where the pods go: the cluster suite's (and `trilemma dev-cluster`'s) H100 nodes, with
    # their own nvidia.com/gpu, past their GPU taint; not the L40S nodes.
    assert real.effective_resource_name == "nvidia.com/gpu"
    nodes = [m for g in DEFAULT_NODES for m in g.manifests()]
    group = drv.pool_group(NODE_POOL)
    assert drv.gpu_nodes(nodes, group, "nvidia.com/gpu", real.effective_gpus_per_node) == [
        "h100-0", "h100-1"]
    assert drv.gpu_nodes(nodes, {**group, "tolerations": []}, "nvidia.com/gpu", 1) == []
    assert drv.gpu_nodes(nodes, {**group, "nodeSelector": {}}, "nvidia.com/gpu", 1) == [
        "h100-0", "h100-1"]  # the L40S nodes' second taint is not tolerated


def test_the_spec_change_is_prompts_four_times_as_long_and_nothing_else():
    before = json.loads(json.dumps(ENDPOINT))
    after = json.loads(json.dumps(CHANGED))
    old = before["spec"]["workload"].pop("promptTokens")
    new = after["spec"]["workload"].pop("promptTokens")
    assert before == after
    assert new == {**old, "mean": old["mean"] * 4, "p90": old["p90"] * 4}


def test_the_invalid_endpoint_passes_the_schema_but_names_an_unknown_model(tmp_path):
    spec = OptimizedEndpointSpec.model_validate(INVALID["spec"])
    assert spec.model is not None
    with pytest.raises(InputError) as err:
        model_choice(spec.model, None, None, tmp_path)
    # The operator's status message is "<field>=<value!r>: <why>" (endpoint.input_message);
    # run_e2e.py expects it to name the model.
    assert err.value.field == "model.id"
    assert INVALID["spec"]["model"]["id"] in repr(err.value.value)


# ---- plans: what the operator will deploy for these manifests ---------------------------------


@dataclass(frozen=True)
class Deployed:
    spec: OptimizedEndpointSpec
    plan: Plan
    config: ServingConfig
    digest: str
    served: str
    kids: children.Children

    @property
    def engine(self) -> dict[str, Any]:
        return drv.engine_container(self.kids.workloads[0])


def _deploy(doc: dict[str, Any], tmp: Path) -> Deployed:
    """What reconcile does for a fresh endpoint on the whole pool: plan, render, customize."""
    spec = OptimizedEndpointSpec.model_validate(doc["spec"])
    assert spec.model is not None
    choice, served = model_choice(spec.model, None, None, tmp)
    models = Models(choices=[choice], checkpoints={choice.id: served})
    request = plan_request(spec, models, POOL_SPEC)
    plan = default_planner(request)
    config = plan.recommended.config
    owner = children.Owner(doc["metadata"]["name"], doc["metadata"]["namespace"], "uid-1")
    kids = children.build(config, spec, owner, POOL_SPEC.group(config.worker.gpu),
                          served_model=served)
    return Deployed(spec=spec, plan=plan, config=config,
                    digest=request_digest(request, models), served=served, kids=kids)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Any:
    """Both plans, and each one's engine started as the e2e cluster runs it: `vllm serve ARGS`
    on the shim (the first boots while the second search runs). At teardown the engines'
    logs must show they started and ignored no flag."""
    tmp = tmp_path_factory.mktemp("models")
    started: dict[str, Sim] = {}
    plans = []
    try:
        for doc in (ENDPOINT, CHANGED):
            d = _deploy(doc, tmp)
            plans.append(d)
            started[d.kids.config_hash] = _start_sim(d.engine["args"], _free_port())
        yield tuple(plans), started
    finally:
        for sim in started.values():
            if not sim.start_line and sim.proc.poll() is None:
                _wait_healthy(sim)  # let it print its start line before it is stopped
            sim.proc.terminate()
        logs = {h: sim.proc.communicate(timeout=10) for h, sim in started.items()}
    for config_hash, (out, err) in logs.items():
        log = started[config_hash].start_line + out + err
        drv.check_engine_log(f"sim {config_hash}", log)
        assert "warning" not in err, err


@pytest.fixture(scope="module")
def deployed(engines) -> tuple[Deployed, Deployed]:
    return engines[0]


def test_both_plans_are_one_deployment_of_vllm_serve_on_fake_gpus(deployed):
    for d in deployed:
        assert [w["kind"] for w in d.kids.workloads] == ["Deployment"]
        assert [s["metadata"]["name"] for s in d.kids.services] == [ENDPOINT["metadata"]["name"]]
        engine = d.engine
        assert engine["command"] == drv.ENGINE_COMMAND
        assert engine["image"] == drv.MANIFEST_SIM_IMAGE
        assert set(engine["resources"]["limits"]) == {RESOURCE}
        assert {"name": "TRILEMMA_SIM_GPU", "value": GPU} in engine["env"]
        assert d.config.worker.gpu == GPU


def test_the_spec_change_plans_a_new_configuration_and_the_pool_holds_both(deployed):
    old, new = deployed
    assert old.kids.config_hash != new.kids.config_hash
    gpus = [sum(status.config_gpus(d.config).values()) for d in deployed]
    assert sum(gpus) <= POOL_SPEC.gpus[0].count  # both run during the rollout
    for d in deployed:
        per_pod = int(d.engine["resources"]["limits"][RESOURCE])
        assert per_pod <= drv.FAKE_GPUS_PER_NODE


def test_the_sim_server_reads_back_exactly_the_planned_worker(deployed):
    for d in deployed:
        argv = [*d.engine["command"], *d.engine["args"]]
        flags = engine_flags.parse_vllm_args(argv, gpu=GPU)
        assert flags.ignored == ()
        assert flags.no_effect == ()
        assert flags.config.worker == d.config.worker
        assert flags.config.model == d.served
        port = d.kids.services[0]["spec"]["ports"][0]["port"]
        assert flags.port == port == d.engine["ports"][0]["containerPort"]


def test_the_rollout_check_gets_a_prompt_only_the_new_configuration_fits(deployed):
    old, new = (d.engine["args"] for d in deployed)
    prompt = drv.long_prompt(old, new, 8)
    assert prompt is not None
    old_limit = int(drv.flag_value(old, "--max-model-len"))
    new_limit = int(drv.flag_value(new, "--max-model-len"))
    assert len(prompt) + 8 == old_limit + 1 <= new_limit
    assert drv.long_prompt(new, old, 8) is None


# ---- run_e2e.py's checks against the operator's own children ----------------------------------


def _cluster_view(d: Deployed) -> tuple[dict[str, Any], list[Any], list[Any], list[Any]]:
    """The endpoint, Deployments, Services and ConfigMaps as a cluster would hold them once
    the operator has deployed `d` and the Deployment is available."""
    choice = d.plan.recommended
    endpoint = json.loads(json.dumps(ENDPOINT))
    endpoint["metadata"]["uid"] = "uid-1"
    endpoint["metadata"]["generation"] = 1
    endpoint["status"] = {
        "phase": "Ready", "observedGeneration": 1, "servingHash": d.kids.config_hash,
        "activeConfiguration": to_wire(status.active_configuration(
            choice, config_hash=d.kids.config_hash, served_model=d.served,
            engine_args=list(d.engine["args"]), applied=True)),
        "lastOptimization": {"requestDigest": d.digest},
    }
    deploys = json.loads(json.dumps(d.kids.workloads))
    for w in deploys:
        w["status"] = {"availableReplicas": w["spec"]["replicas"]}
    owner = children.Owner(ENDPOINT["metadata"]["name"], ENDPOINT["metadata"]["namespace"],
                           "uid-1")
    cm = children.plan_config_map(owner, d.plan, request_digest=d.digest,
                                  config_hash=d.kids.config_hash)
    return endpoint, deploys, json.loads(json.dumps(d.kids.services)), [cm]


def test_check_children_accepts_what_the_operator_deploys(deployed):
    for d in deployed:
        summary = drv.check_children(*_cluster_view(d), sim_image=drv.MANIFEST_SIM_IMAGE,
                                     gpu_resource=RESOURCE)
        assert f"{ENDPOINT['metadata']['name']}-{d.kids.config_hash}" in summary


def _break_selector(view: Any) -> None:
    view[2][0]["spec"]["selector"][naming.LABEL_CONFIG_HASH] = "0ld0ld00"


def _break_owner(view: Any) -> None:
    view[1][0]["metadata"]["ownerReferences"][0]["uid"] = "someone-else"


def _break_image(view: Any) -> None:
    drv.engine_container(view[1][0])["image"] = "vllm/vllm-openai:v0.10.1"


def _leftover(view: Any) -> None:
    stale = json.loads(json.dumps(view[1][0]))
    stale["metadata"]["name"] = f"{ENDPOINT['metadata']['name']}-0ld0ld00"
    view[1].append(stale)


def _break_plan(view: Any) -> None:
    view[3][0]["data"]["plan.json"] = "{not json"


def _unavailable(view: Any) -> None:
    view[1][0]["status"] = {}


@pytest.mark.parametrize(("breakage", "expected"), [
    (_break_selector, "selects"), (_break_owner, "ownerReference"), (_break_image, "image"),
    (_leftover, "expected exactly Deployment"), (_break_plan, "not JSON"),
    (_unavailable, "available"),
])
def test_check_children_names_what_is_wrong(deployed, breakage, expected):
    view = list(_cluster_view(deployed[0]))
    breakage(view)
    with pytest.raises(drv.CheckFailed, match=expected):
        drv.check_children(*view, sim_image=drv.MANIFEST_SIM_IMAGE, gpu_resource=RESOURCE)


def _kubectl_table(endpoint: dict[str, Any]) -> str:
    """`kubectl get oe NAME` as kubectl prints it: the CRD's printer columns, upper-cased,
    left-aligned with three spaces of padding."""
    columns = CRDS["OptimizedEndpoint"]["spec"]["versions"][0]["additionalPrinterColumns"]

    def value(path: str) -> str:
        node: Any = endpoint
        for key in path.strip(".").split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return "<none>" if node is None else str(node)

    header = ["NAME", *(c["name"].upper() for c in columns)]
    row = [endpoint["metadata"]["name"],
           *("5m" if c["type"] == "date" else value(c["jsonPath"]) for c in columns)]
    widths = [max(len(h), len(v)) + 3 for h, v in zip(header, row, strict=True)]
    return "\n".join("".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in (header, row)) + "\n"


def test_printer_columns_check_reads_kubectls_table(deployed):
    endpoint = _cluster_view(deployed[0])[0]
    endpoint["status"]["costPerHour"] = 2.5
    table = _kubectl_table(endpoint)
    assert " " in endpoint["status"]["activeConfiguration"]["short"]  # e.g. "fp8 TP1 ngramx4"
    shown = drv.check_printer_columns(table, endpoint)
    assert f"CONFIG={endpoint['status']['activeConfiguration']['short']}" in shown
    endpoint["status"]["phase"] = "Deploying"  # the table above still shows Ready
    with pytest.raises(drv.CheckFailed, match="PHASE: shown 'Ready', status says 'Deploying'"):
        drv.check_printer_columns(table, endpoint)


# ---- the shim, a live sim-server, and the in-cluster client ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_port(args: list[str], port: int) -> list[str]:
    i = args.index("--port")
    return [*args[:i + 1], str(port), *args[i + 2:]]


def test_the_shim_passes_the_rendered_command_to_sim_server_unchanged(deployed, tmp_path):
    # A `trilemma` that records its argv stands in for the real one.
    fake = tmp_path / "trilemma"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "argv"
    engine = deployed[0].engine
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "ARGV_OUT": str(out), "TRILEMMA_SIM_GPU": GPU, "TRILEMMA_SIM_TIME_SCALE": "0.5"}
    subprocess.run(["sh", str(SHIM), *engine["command"][1:], *engine["args"]], env=env,
                   check=True, timeout=10)
    argv = out.read_text().splitlines()
    assert argv == ["sim-server", "--gpu", GPU, "--time-scale", "0.5", "--", *engine["args"]]
    # ... which the sim-server's own parser takes, every rendered flag landing after "--".
    parser = cli_server.argparse.ArgumentParser()
    cli_server.add_arguments(parser)
    ns = parser.parse_args(argv[1:])
    assert (ns.gpu, ns.time_scale, ns.engine_args) == (GPU, 0.5, engine["args"])


def test_the_shim_refuses_anything_but_serve():
    done = subprocess.run(["sh", str(SHIM), "--version"], capture_output=True, text=True,
                          timeout=10, check=False)
    assert done.returncode == 2
    assert "only 'vllm serve" in done.stderr


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_shim_parses(shell):
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    subprocess.run([shell, "-n", str(SHIM)], check=True, timeout=10)
    assert os.access(SHIM, os.X_OK)


@dataclass
class Sim:
    """A live sim-server started through the shim with a plan's rendered arguments."""

    proc: subprocess.Popen[str]
    port: int
    start_line: str = ""


def _start_sim(args: list[str], port: int) -> Sim:
    # The shim execs `trilemma` from PATH, as in the image: this interpreter's scripts first.
    path = os.pathsep.join([str(SHIM.parent), str(Path(sys.executable).parent),
                            os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "TRILEMMA_SIM_GPU": GPU}
    proc = subprocess.Popen(["vllm", "serve", *_with_port(args, port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Sim(proc=proc, port=port)


def _wait_healthy(sim: Sim, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.proc.poll() is not None:
            raise AssertionError(f"the sim-server exited {sim.proc.returncode}: "
                                 f"{sim.proc.stderr.read() if sim.proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{sim.port}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    else:
        raise AssertionError("the sim-server did not answer /health")
    assert sim.proc.stdout is not None
    sim.start_line = sim.proc.stdout.readline()  # printed, flushed, before it serves


@pytest.fixture(scope="module")
def sims(engines) -> dict[str, Sim]:
    """The live engines by configuration hash, each answering /health."""
    started: dict[str, Sim] = engines[1]
    for sim in started.values():
        if not sim.start_line:
            _wait_healthy(sim)
    return started


def _client(port: int, body: dict[str, Any]) -> tuple[int, str]:
    """run_e2e.py's in-cluster client script, run here against 127.0.0.1."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    done = subprocess.run([sys.executable, "-c", drv.CLIENT_SCRIPT, url, json.dumps(body), "10"],
                          capture_output=True, text=True, timeout=60, check=False)
    return drv.parse_client_log(done.stdout + done.stderr)


def test_rendered_commands_serve_through_the_shim_and_answer_the_client(deployed, sims):
    old, new = deployed
    old_port, new_port = sims[old.kids.config_hash].port, sims[new.kids.config_hash].port
    model = old.served
    # The first request of the e2e test, through the old configuration.
    code, text = _client(old_port, drv.completion_request(
        model, prompt="Say hello to the trilemma e2e test.", max_tokens=16))
    assert code == 200, text
    assert drv.check_completion(json.loads(text), model=model, max_tokens=16).strip()
    # The post-rollout request: refused by the old configuration, served by the new one.
    prompt = drv.long_prompt(old.engine["args"], new.engine["args"], 8)
    body = drv.completion_request(model, prompt=prompt, max_tokens=8)
    code, text = _client(old_port, body)
    assert code == 400 and "maximum context length" in text
    code, text = _client(new_port, body)
    assert code == 200, text
    reply = json.loads(text)
    drv.check_completion(reply, model=model, max_tokens=8)
    assert reply["usage"]["prompt_tokens"] == len(prompt)


def test_check_completion_names_what_is_not_openai_shaped():
    reply = {"id": "x", "object": "chat.completion", "model": "m",
             "choices": [{"text": "", "finish_reason": "length"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}
    with pytest.raises(drv.CheckFailed) as err:
        drv.check_completion(reply, model="m", max_tokens=8)
    for part in ("object=", "choices[0].text", "completion_tokens"):
        assert part in str(err.value)


def test_check_engine_log_catches_ignored_flags():
    started = "sim-server: m as 1x [bf16 TP1] on h100_sxm (vllm) listening on 0.0.0.0:8000\n"
    drv.check_engine_log("p", started)
    with pytest.raises(drv.CheckFailed, match="ignored"):
        drv.check_engine_log("p", "trilemma sim-server: warning: ignoring vLLM flags the "
                                  "simulator does not model: --foo\n" + started)
    with pytest.raises(drv.CheckFailed, match="start line"):
        drv.check_engine_log("p", "INFO vllm starting\n")
    with pytest.raises(drv.CheckFailed, match="start line"):  # a warning is not a start
        drv.check_engine_log("p", "trilemma sim-server: warning: max_model_len too long\n")


def test_client_pod_is_a_valid_pod_running_the_client_script():
    pod = drv.client_pod("c", "ns", "img:e2e", "http://x/v1/completions", {"a": 1}, 60)
    kubernetes_validate.validate(pod, "1.30", strict=True)
    assert pod["spec"]["containers"][0]["command"][:3] == ["python", "-c", drv.CLIENT_SCRIPT]
    compile(drv.CLIENT_SCRIPT, "client", "exec")


# ---- the driver itself -------------------------------------------------------------------------


def test_driver_compiles_and_is_ruff_clean(tmp_path):
    py_compile.compile(str(E2E / "run_e2e.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    done = subprocess.run([ruff, "check", str(E2E), str(Path(__file__))], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_driver_needs_kubeconfig_and_a_tagged_image(monkeypatch, capsys):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert drv.main([]) == 2
    assert "KUBECONFIG" in capsys.readouterr().err
    monkeypatch.setenv("KUBECONFIG", "/nonexistent")
    monkeypatch.setenv("IMAGE", "trilemma:latest")
    assert drv.main([]) == 2
    assert "latest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        drv.main(["--help"])
    assert done.value.code == 0


@pytest.mark.parametrize(("image", "parts"), [
    ("trilemma:e2e", ("trilemma", "e2e")),
    ("localhost:5000/team/trilemma:v1", ("localhost:5000/team/trilemma", "v1")),
])
def test_split_image(image, parts):
    assert drv.split_image(image) == parts


@pytest.mark.parametrize("image", ["trilemma", "localhost:5000/trilemma", "t@sha256:00"])
def test_split_image_wants_a_tag(image):
    with pytest.raises(drv.UsageError):
        drv.split_image(image)


@pytest.mark.parametrize("image", ["localhost:5000/trilemma:e2e", "trilemma:1"])
def test_the_chart_installs_the_image_the_driver_names(image):
    helm = tools.require_tool("helm")
    done = subprocess.run(
        [helm, "template", drv.RELEASE, str(drv.CHART), "--namespace", drv.RELEASE_NAMESPACE,
         *drv.helm_values_args(image)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    deploys = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Deployment"]
    (container,) = deploys[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    assert container["imagePullPolicy"] == "IfNotPresent"
    labels = deploys[0]["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == drv.RELEASE  # the driver's log selector


def test_gpu_patches_address_the_extended_resource_by_json_pointer():
    assert drv.gpu_capacity_patch("example.com/gpu", 8) == [
        {"op": "add", "path": "/status/capacity/example.com~1gpu", "value": "8"}]
    assert drv.gpu_capacity_removal("example.com/gpu") == [
        {"op": "remove", "path": "/status/capacity/example.com~1gpu"}]


def test_schedulable_skips_cordoned_and_tainted_nodes():
    assert drv.schedulable({"spec": {}})
    assert drv.schedulable({"spec": {"taints": [{"key": "a", "effect": "PreferNoSchedule"}]}})
    assert not drv.schedulable({"spec": {"unschedulable": True}})
    assert not drv.schedulable({"spec": {"taints": [
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}})


def test_flag_value_reads_both_spellings():
    assert drv.flag_value(["m", "--max-model-len", "2560"], "--max-model-len") == "2560"
    assert drv.flag_value(["--max-model-len=4096"], "--max-model-len") == "4096"
    assert drv.flag_value(["--max-num-seqs", "8"], "--max-model-len") is None


def test_dockerfile_sim_adds_the_shim_to_the_operator_image():
    text = (E2E / "Dockerfile.sim").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "ARG BASE=trilemma:dev"
    assert lines[1] == "FROM ${BASE}"
    assert "COPY sim/vllm /usr/local/bin/vllm" in lines
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    base_user = [ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines()
                 if ln.startswith("USER ")][-1]
    assert users[-1] == base_user  # back to the operator image's non-root user
    # The context is tests/e2e: everything COPY names must be there.
    for ln in lines:
        if ln.startswith("COPY "):
            assert (E2E / ln.split()[1]).exists(), ln


# ---- the driver's whole run against a scripted stand-in for a cluster -------------------------
# Not a test of the operator (tests/operator runs the real one): a fake kubectl/helm whose
# "operator" deploys exactly the children computed above, one step per poll, and whose Service
# routes the client pod's request to the live sim-servers. It runs run_e2e.run() end to end, so
# the driver's own flow (its kubectl calls, waits, field names, the order of its checks) has run
# once before anyone points it at a real cluster.

KINDS = {"optimizedendpoints.trilemma.dev": "OptimizedEndpoint", "oe": "OptimizedEndpoint",
         "hardwarepools.trilemma.dev": "HardwarePool", "nodes": "Node", "node": "Node",
         "deployments": "Deployment", "deployment": "Deployment", "services": "Service",
         "service": "Service", "configmaps": "ConfigMap", "pods": "Pod", "pod": "Pod",
         "namespace": "Namespace"}
CLUSTER_SCOPED = {"Node", "Namespace", "HardwarePool"}
UID = "uid-1"  # the owner uid the children above were built with


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in re.split(r",(?![^()]*\))", selector):
        if m := re.fullmatch(r"(\S+) in \((.*)\)", term):
            if labels.get(m[1]) not in m[2].split(","):
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


class FakeCluster(drv.Cluster):
    def __init__(self, plans: dict[str, Deployed], sims: dict[str, Sim],
                 timeline: Any) -> None:
        super().__init__("kubectl", "helm", timeline)
        self.plans = plans  # canonical spec JSON -> what the operator deploys for it
        self.sims = sims
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.client_logs: dict[str, str] = {}
        self._put({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "fake-node"}, "spec": {},
                   "status": {"capacity": {"cpu": "8"}, "allocatable": {"cpu": "8"}}})

    # -- storage --
    def _key(self, kind: str, ns: str | None, name: str) -> tuple[str, str | None, str]:
        kind = KINDS.get(kind, kind)
        return kind, None if kind in CLUSTER_SCOPED else ns, name

    def _put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[self._key(obj["kind"], meta.get("namespace"), meta["name"])] = obj

    def _drop(self, kind: str, ns: str | None, name: str) -> None:
        self.objects.pop(self._key(kind, ns, name), None)

    def _find(self, kind: str, ns: str | None, selector: str | None = None) -> list[Any]:
        kind = KINDS.get(kind, kind)
        return [o for (k, n, _), o in self.objects.items() if k == kind
                and (ns is None or n == ns)
                and _matches(o["metadata"].get("labels") or {}, selector)]

    # -- drv.Cluster's interface --
    def get(self, kind: str, name: str, namespace: str | None = None) -> Any:
        if KINDS.get(kind) == "OptimizedEndpoint":
            self._operate(namespace, name)
        found = self.objects.get(self._key(kind, namespace, name))
        return json.loads(json.dumps(found)) if found is not None else None

    def list(self, kind: str, namespace: str | None, selector: str | None = None) -> Any:
        if KINDS.get(kind) == "Pod":
            self._engine_pods(namespace)
        return json.loads(json.dumps(self._find(kind, namespace, selector)))

    def apply(self, doc: dict[str, Any]) -> None:
        doc = json.loads(json.dumps(doc))
        key = self._key(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        old = self.objects.get(key)
        if doc["kind"] == "OptimizedEndpoint":
            meta = doc["metadata"]
            meta["uid"] = UID if meta["name"] == ENDPOINT["metadata"]["name"] else "uid-2"
            meta["generation"] = (old["metadata"]["generation"] + (old["spec"] != doc["spec"])
                                  if old else 1)
            doc["status"] = old.get("status", {}) if old else {}
        if doc["kind"] == "Pod":
            self._run_client(doc)
        self.objects[key] = doc

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> Any:
        self.calls.append(("helm", *args))
        return subprocess.CompletedProcess(["helm", *args], 0, "", "")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> Any:
        self.calls.append(("kubectl", *args))
        out = self._kubectl(list(args))
        return subprocess.CompletedProcess(["kubectl", *args], 0, out, "")

    def _kubectl(self, args: list[str]) -> str:
        verb = args[0]
        ns = args[args.index("-n") + 1] if "-n" in args else None
        if verb == "version":
            return json.dumps({"serverVersion": {"gitVersion": "v1.30.0-fake"}})
        if args[:2] == ["config", "current-context"]:
            return "fake\n"
        if verb in ("wait", "apply") or (verb == "patch" and "finalizers" in args[-1]):
            return ""  # CRDs established; finalizers are the fake operator's no-op
        if verb == "patch" and args[1] == "node":
            node = self.objects[self._key("Node", None, args[2])]
            for op in json.loads(args[args.index("-p") + 1]):
                key = op["path"].rsplit("/", 1)[1].replace("~1", "/").replace("~0", "~")
                for field in ("capacity", "allocatable"):  # the kubelet copies it over
                    if op["op"] == "add":
                        node["status"][field][key] = op["value"]
                    else:
                        node["status"][field].pop(key, None)
            return ""
        if (verb == "get" and KINDS.get(args[1]) == "OptimizedEndpoint" and "-o" not in args
                and not args[2].startswith("-")):
            endpoint = self.get("oe", args[2], ns)
            endpoint["status"]["costPerHour"] = 2.5
            return _kubectl_table(endpoint)
        if verb == "logs" and "-c" in args:
            pod = self.objects[self._key("Pod", ns, args[3])]
            return self.sims[pod["metadata"]["labels"][naming.LABEL_CONFIG_HASH]].start_line
        if verb == "logs" and "-l" not in args:
            return self.client_logs[args[3]]
        if verb == "delete":
            kind = KINDS.get(args[1], args[1])
            names = [a for a in args[2:] if not a.startswith("-")
                     and a != ns and not a.startswith("--")]
            for name in names:
                if kind == "OptimizedEndpoint":  # the operator's finalizer: children first
                    sel = f"{naming.LABEL_ENDPOINT}={name}"
                    for k in ("Deployment", "Service", "ConfigMap", "Pod"):
                        for obj in self._find(k, ns, sel):
                            self._drop(k, ns, obj["metadata"]["name"])
                if kind == "Namespace":
                    for key in [k for k in self.objects if k[1] == name]:
                        del self.objects[key]
                self._drop(kind, ns, name)
            return ""
        if verb in ("get", "logs"):
            return ""  # diagnostics
        raise AssertionError(f"the fake cluster does not know `kubectl {' '.join(args)}`")

    # -- the fake operator: one step per read of the endpoint --
    def _operate(self, ns: str | None, name: str) -> None:
        ep = self.objects.get(self._key("OptimizedEndpoint", ns, name))
        if ep is None:
            return
        st, gen = ep["status"], ep["metadata"]["generation"]
        spec = OptimizedEndpointSpec.model_validate(ep["spec"])
        if st.get("observedGeneration") != gen:
            try:
                assert spec.model is not None
                model_choice(spec.model, None, None, Path("/nonexistent"))
            except InputError as err:
                message = endpoint.input_message(err)
                ep["status"] = {"phase": "Failed", "message": message,
                                "observedGeneration": gen, "conditions": [
                                    {"type": "Validated", "status": "False",
                                     "reason": "UnknownModel", "message": message}]}
                return
            d = self.plans[json.dumps(ep["spec"], sort_keys=True)]
            target = d.kids.config_hash
            serving = st.get("servingHash")
            for w in d.kids.workloads:
                self._put(json.loads(json.dumps(w)))
            if serving is None:
                for svc in d.kids.services:
                    self._put(json.loads(json.dumps(svc)))
                serving = target
            owner = children.Owner(name, ns or "", UID)
            self._put(children.plan_config_map(owner, d.plan, request_digest=d.digest,
                                               config_hash=target))
            choice = d.plan.recommended
            st.update({
                "phase": "Deploying", "observedGeneration": gen, "servingHash": serving,
                "activeConfiguration": to_wire(status.active_configuration(
                    choice, config_hash=target, served_model=d.served,
                    engine_args=list(d.engine["args"]), applied=True)),
                "lastOptimization": {"requestDigest": d.digest, "candidates": 1000,
                                     "durationSeconds": 3.0},
                "rollout": {"fromHash": None if serving == target else serving,
                            "toHash": target, "state": "Progressing"}})
            return
        rollout = st.get("rollout") or {}
        if rollout.get("state") != "Progressing":
            return
        deploy = self.objects[self._key("Deployment", ns, f"{name}-{rollout['toHash']}")]
        if not deploy.get("status"):
            deploy["status"] = {"availableReplicas": deploy["spec"]["replicas"]}
            return
        if rollout["fromHash"]:
            svc = self.objects[self._key("Service", ns, name)]
            svc["spec"]["selector"][naming.LABEL_CONFIG_HASH] = rollout["toHash"]
            self._drop("Deployment", ns, f"{name}-{rollout['fromHash']}")
            for pod in self._find("Pod", ns, f"{naming.LABEL_CONFIG_HASH}={rollout['fromHash']}"):
                self._drop("Pod", ns, pod["metadata"]["name"])
        st.update({"phase": "Ready", "servingHash": rollout["toHash"],
                   "rollout": {**rollout, "state": "Complete"}})

    def _engine_pods(self, ns: str | None) -> None:
        for deploy in self._find("Deployment", ns):
            if deploy.get("status"):
                template = deploy["spec"]["template"]
                self._put({"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": f"{deploy['metadata']['name']}-x1", "namespace": ns,
                    "labels": template["metadata"]["labels"]},
                    "spec": {**template["spec"], "nodeName": "fake-node"},
                    "status": {"phase": "Running"}})

    def _run_client(self, pod: dict[str, Any]) -> None:
        """kube-proxy and DNS: the Service name resolves to its selected hash's sim-server."""
        command = pod["spec"]["containers"][0]["command"]
        url = command[3]
        m = re.fullmatch(r"http://([^.]+)\.([^.]+)\.svc:(\d+)(/.*)", url)
        assert m, url
        svc = self.objects[self._key("Service", m[2], m[1])]
        assert int(m[3]) == svc["spec"]["ports"][0]["port"]
        sim = self.sims[svc["spec"]["selector"][naming.LABEL_CONFIG_HASH]]
        local = f"http://127.0.0.1:{sim.port}{m[4]}"
        done = subprocess.run([sys.executable, "-c", command[2], local, *command[4:]],
                              capture_output=True, text=True, timeout=60, check=False)
        self.client_logs[pod["metadata"]["name"]] = done.stdout + done.stderr
        pod["status"] = {"phase": "Succeeded" if done.returncode == 0 else "Failed"}


def _fake_run(deployed, sims, monkeypatch, *, same_plan: bool = False,
              containers: bool = True) -> tuple[Any, Any]:
    monkeypatch.setattr(drv, "POLL_S", 0.0)
    monkeypatch.setenv("KUBECONFIG", "/fake/kubeconfig")
    old, new = deployed
    plans = {json.dumps(ENDPOINT["spec"], sort_keys=True): old,
             json.dumps(CHANGED["spec"], sort_keys=True): old if same_plan else new}
    settings = drv.Settings(image=drv.DEFAULT_IMAGE, sim_image=drv.MANIFEST_SIM_IMAGE,
                            build_image=False, build_sim_image=False, kind_cluster=None,
                            keep=False, ready_timeout=30, container_tool="docker",
                            containers=containers)
    timeline = drv.Timeline()
    cluster = FakeCluster(plans, sims, timeline)
    return drv.E2E(settings, cluster, timeline), cluster


def test_the_whole_driver_runs_through_against_a_scripted_cluster(deployed, sims, monkeypatch,
                                                                  capsys):
    e2e, cluster = _fake_run(deployed, sims, monkeypatch)
    drv.run(e2e, e2e.t)
    e2e.cleanup(uninstall=True)
    out = capsys.readouterr().out
    assert [ok for _, _, ok in e2e.t.steps] == [True] * len(e2e.t.steps)
    assert "completion only the new configuration fits (max-model-len)" in out
    old, new = (d.kids.config_hash for d in deployed)
    assert f"Service e2e-chat: {old} -> {new}" in out
    assert ("helm", *drv.helm_install_args(drv.DEFAULT_IMAGE)) in cluster.calls
    node = cluster.objects[("Node", None, "fake-node")]
    assert RESOURCE not in node["status"]["capacity"]  # the fake GPUs are taken back
    assert [k for k in cluster.objects if k[0] != "Node"] == []  # nothing left behind


def test_the_driver_stops_at_once_when_the_spec_change_keeps_the_plan(deployed, sims,
                                                                      monkeypatch):
    e2e, _ = _fake_run(deployed, sims, monkeypatch, same_plan=True)
    started = time.monotonic()
    with pytest.raises(drv.CheckFailed, match="planned as the same configuration"):
        drv.run(e2e, e2e.t)
    assert time.monotonic() - started < 20
    assert e2e.t.steps[-1][2] is False


def test_waits_ride_out_a_few_failed_commands_but_not_more(monkeypatch, capsys):
    monkeypatch.setattr(drv, "POLL_S", 0.0)
    cluster = drv.Cluster("kubectl", "helm", drv.Timeline())
    answers = iter([drv.CommandFailed("`kubectl get` failed (exit 1):\nrefused"),
                    drv.CommandFailed("again"), (True, "ok")])

    def flaky() -> tuple[bool, str]:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cluster.wait_for("flaky", flaky, timeout=5)
    assert "(retrying) `kubectl get` failed (exit 1):" in capsys.readouterr().out

    def broken() -> tuple[bool, str]:
        raise drv.CommandFailed("down")

    with pytest.raises(drv.CommandFailed, match="down"):
        cluster.wait_for("broken", broken, timeout=5)

    def wrong() -> tuple[bool, str]:
        raise drv.CheckFailed("went Failed")

    with pytest.raises(drv.CheckFailed, match="went Failed"):  # a verdict is not retried
        cluster.wait_for("wrong", wrong, timeout=5)


def test_main_reports_a_failure_with_diagnostics_and_still_cleans_up(deployed, sims,
                                                                     monkeypatch, capsys):
    _, cluster = _fake_run(deployed, sims, monkeypatch, same_plan=True)

    def fake_cluster(kubectl: str, helm: str, timeline: Any) -> FakeCluster:
        cluster.timeline = timeline  # main's own timeline
        return cluster

    monkeypatch.setattr(drv, "Cluster", fake_cluster)
    monkeypatch.setattr(drv, "_tool", lambda name: name)
    monkeypatch.setenv("IMAGE", drv.DEFAULT_IMAGE)  # given: nothing to build
    monkeypatch.setenv("SIM_IMAGE", drv.MANIFEST_SIM_IMAGE)
    monkeypatch.delenv("KIND_CLUSTER", raising=False)
    assert drv.main([]) == 1
    out, err = capsys.readouterr()
    assert "E2E FAILED: e2e-chat: the spec change was planned as the same configuration" in err
    assert "$ kubectl get events -n trilemma-e2e" in out  # diagnostics
    assert "ok  clean up" in out and out.rstrip().endswith("E2E FAILED")
    assert [k for k in cluster.objects if k[0] != "Node"] == []
    assert ("helm", "uninstall", drv.RELEASE, "--namespace", drv.RELEASE_NAMESPACE,
            "--wait") in cluster.calls


def test_no_containers_installs_patches_and_sends_nothing_and_says_what_it_skips(
        deployed, sims, monkeypatch, capsys):
    # The operator's children for the same plans on the GPU-node pool (the same request).
    owner = children.Owner(ENDPOINT["metadata"]["name"], ENDPOINT["metadata"]["namespace"], UID)
    on_nodes = tuple(replace(d, kids=children.build(
        d.config, d.spec, owner, NODE_POOL_SPEC.group(d.config.worker.gpu),
        served_model=d.served)) for d in deployed)
    e2e, cluster = _fake_run(on_nodes, sims, monkeypatch, containers=False)
    cluster._put(DEFAULT_NODES[0].manifests()[0])  # a kwok H100 node: 8 nvidia.com/gpu
    drv.run(e2e, e2e.t)
    e2e.cleanup(uninstall=True)
    out = capsys.readouterr().out
    skipped = {"install the chart", "completion through the Service",
               "completion through the Service after the rollout"}
    assert {n for n, _, ok in e2e.t.steps if ok is None} == skipped
    assert all(ok for n, _, ok in e2e.t.steps if n not in skipped)
    for name in skipped:
        assert f"--  skipped {name}: --no-containers: " in out
    assert "skipped: the engine's start line in the pod log" in out
    assert "no node patched" in out
    assert [c for c in cluster.calls if c[0] == "helm"] == []
    assert [c for c in cluster.calls if c[1] in ("logs", "patch") and "node" in c] == []
    assert not [c for c in cluster.calls if c[1] == "logs"]  # no pod has a log to read
    assert cluster.client_logs == {}  # no client pod
    assert f"Service e2e-chat: {on_nodes[0].kids.config_hash} -> " \
           f"{on_nodes[1].kids.config_hash}" in out
    assert [k for k in cluster.objects if k[0] != "Node"] == []
    summary = e2e.t.summary()
    assert "  skipped completion through the Service " in summary


def test_no_containers_refuses_image_settings_and_needs_no_helm(monkeypatch):
    args = drv.parse_args(["--no-containers"])
    env = {"KUBECONFIG": "/k"}
    settings = drv.settings_from(env, args)
    assert not settings.containers and not settings.build_image and not settings.build_sim_image
    assert settings.kind_cluster is None
    with pytest.raises(drv.UsageError, match="unset IMAGE"):
        drv.settings_from({**env, "IMAGE": "x:1"}, args)
