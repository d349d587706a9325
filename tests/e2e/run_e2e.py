#!/usr/bin/env python3
"""End-to-end test of the trilemma operator on any Kubernetes cluster (kind is the documented one).

    KUBECONFIG=/tmp/trilemma-e2e.kubeconfig KIND_CLUSTER=trilemma-e2e \\
        python tests/e2e/run_e2e.py

Builds the operator image (the repository's Dockerfile) and the test-only sim image
(tests/e2e/Dockerfile.sim: a `vllm` shim over `trilemma sim-server`), installs the Helm chart,
gives the nodes a fake GPU extended resource, and drives the manifests in tests/e2e/manifests/
through the operator: plan -> Deployment/Service/ConfigMap -> Ready -> a real completion through
the Service -> a spec change rolled out to a new configuration hash -> an invalid endpoint
failing with a message -> deletion removing the children. Prints a timeline and exits 1 at the
first failed check, 2 on bad usage. tests/e2e/README.md has the details and the limits.

    KUBECONFIG=... python tests/e2e/run_e2e.py --no-containers

is the same test on a cluster whose pods run no containers: kwok's fake nodes, as in
`trilemma dev-cluster` and the cluster suite's control plane (tests/cluster/test_e2e.py runs
it there on every CI run). It builds, loads and installs nothing: the operator must already be
running against the cluster, outside it (the cluster test runs `kopf run` as the chart's
ServiceAccount). The pool is manifests/hardwarepool-gpu-nodes.yaml, on the nodes' own
`nvidia.com/gpu`, and no node is patched. The checks that need a running engine (its start
line in the pod log, the completions through the Service) are skipped, each with a line in
the output saying why; every other check runs unchanged.

Cluster access is kubectl and helm as subprocesses (what a person debugging a failure would
type); the only Python dependencies are PyYAML and the trilemma package itself (for the label
keys and phases, so the test and the operator cannot drift apart). Everything that does not
need a cluster (names, patches, the checks themselves) is a plain function that
tests/unit/test_e2e_assets.py exercises against the operator's own rendered children.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trilemma.operator import naming
from trilemma.operator.resources import EndpointPhase

ROOT = Path(__file__).resolve().parents[2]
E2E = Path(__file__).resolve().parent
MANIFESTS = E2E / "manifests"
CHART = ROOT / "charts" / "trilemma"
CHART_CRDS = CHART / "crds"
SIM_DOCKERFILE = E2E / "Dockerfile.sim"

NAMESPACE_FILE = MANIFESTS / "namespace.yaml"
POOL_FILE = MANIFESTS / "hardwarepool.yaml"
NODE_GPU_POOL_FILE = MANIFESTS / "hardwarepool-gpu-nodes.yaml"  # --no-containers
ENDPOINT_FILE = MANIFESTS / "endpoint.yaml"
CHANGED_ENDPOINT_FILE = MANIFESTS / "endpoint-longer-prompts.yaml"
INVALID_ENDPOINT_FILE = MANIFESTS / "endpoint-invalid.yaml"

# Non-"latest" tags: the engine Deployments the operator renders set no imagePullPolicy, and
# Kubernetes defaults it to Always for :latest, which would bypass `kind load`.
DEFAULT_IMAGE = "trilemma:e2e"
DEFAULT_SIM_IMAGE = "trilemma-sim:e2e"
# The engine image written in the manifests; replaced by the sim image actually used.
MANIFEST_SIM_IMAGE = DEFAULT_SIM_IMAGE
RELEASE = "trilemma"
RELEASE_NAMESPACE = "trilemma-system"
FAKE_GPUS_PER_NODE = 8
ENGINE_COMMAND = ["vllm", "serve"]  # what optimizer/render/vllm_flags.py renders
# The sim-server's start line (simfleet/cli_server.py): "sim-server: MODEL as ... listening on".
SIM_STARTED = re.compile(r"^sim-server: .* listening on \S+", re.MULTILINE)
SIM_IGNORED = "ignoring vLLM flags"  # its warning for flags it does not model
CLIENT_MARK = "E2E-RESPONSE "
# Why --no-containers skips what it skips, as the timeline says it.
NO_ENGINE = ("--no-containers: the pods run no container (kwok marks them Running and Ready), "
             "so no engine")

# Seconds. Generous for a laptop kind cluster; --ready-timeout raises the first wait.
READY_TIMEOUT = 600.0
ROLLOUT_TIMEOUT = 600.0
FAILED_TIMEOUT = 120.0
GONE_TIMEOUT = 180.0
CLIENT_TIMEOUT = 180.0
POLL_S = 2.0
COMMAND_RETRIES = 3  # consecutive kubectl failures a wait tolerates

Obj = dict[str, Any]


class CheckFailed(Exception):
    """A check of the e2e test failed; the message says what was expected and what was seen."""


class CommandFailed(CheckFailed):
    """kubectl or helm failed (exit status or timeout), as opposed to a check seeing a wrong
    value; waits ride out a few in a row (an API server restarting, a dropped connection)."""


class UsageError(Exception):
    """The test cannot start: a missing tool, variable or malformed argument (exit 2)."""


# ---- pure helpers (unit-tested without a cluster) ---------------------------------------------


def load_manifest(path: Path) -> Obj:
    """The single YAML document in `path`."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    if len(docs) != 1:
        raise UsageError(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


def endpoint_manifest(path: Path, sim_image: str) -> Obj:
    """An OptimizedEndpoint manifest with its vLLM image set to the sim image under test."""
    doc = load_manifest(path)
    doc["spec"].setdefault("engine", {})["vllmImage"] = sim_image
    return doc


def split_image(image: str) -> tuple[str, str]:
    """(repository, tag) as the chart's image.repository / image.tag take them."""
    if "@" in image:
        raise UsageError(f"{image}: digests are not supported (the chart joins repository:tag); "
                         "give a tag")
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:  # "host:5000/name" has a colon but no tag
        raise UsageError(f"{image}: give an explicit tag, e.g. {image}:e2e")
    return repo, tag


def helm_values_args(image: str) -> list[str]:
    """The chart values the test installs with: the operator image, never pulled if loaded."""
    repo, tag = split_image(image)
    # --set-string: --set makes a tag such as 1 a number, which values.schema.json refuses.
    return ["--set-string", f"image.repository={repo}", "--set-string", f"image.tag={tag}",
            "--set", "image.pullPolicy=IfNotPresent"]


def helm_install_args(image: str) -> list[str]:
    return ["upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
            "--create-namespace", *helm_values_args(image), "--wait", "--timeout", "5m"]


def _json_pointer(key: str) -> str:
    # RFC 6901: "example.com/gpu" -> "example.com~1gpu".
    return key.replace("~", "~0").replace("/", "~1")


def gpu_capacity_patch(resource: str, count: int) -> list[Obj]:
    """JSON patch for a node's status subresource advertising `count` of `resource`
    (kubernetes.io/docs/tasks/administer-cluster/extended-resource-node/)."""
    return [{"op": "add", "path": f"/status/capacity/{_json_pointer(resource)}",
             "value": str(count)}]


def gpu_capacity_removal(resource: str) -> list[Obj]:
    return [{"op": "remove", "path": f"/status/capacity/{_json_pointer(resource)}"}]


def _tolerated(taint: Obj, tolerations: Sequence[Obj]) -> bool:
    """Whether a taint is tolerated (the rules of the pod spec's `tolerations`)."""
    for tol in tolerations:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator", "Equal") == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == \
                taint.get("value", ""):
            return True
    return False


def schedulable(node: Obj, group: Obj | None = None) -> bool:
    """Whether the engine pods of the pool's GPU group (`group`: its nodeSelector and
    tolerations; None: ordinary pods, which tolerate nothing) may land on the node."""
    spec = node.get("spec", {})
    if spec.get("unschedulable"):
        return False
    tolerations = (group or {}).get("tolerations") or []
    if any(t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(t, tolerations)
           for t in spec.get("taints") or []):
        return False
    labels = node.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in ((group or {}).get("nodeSelector") or {}).items())


def gpu_nodes(nodes: list[Obj], group: Obj, resource: str, at_least: int) -> list[str]:
    """The nodes the group's engine pods may land on that have `at_least` of `resource`
    allocatable."""
    out = []
    for node in nodes:
        have = (node.get("status", {}).get("allocatable") or {}).get(resource, "0")
        if schedulable(node, group) and int(have) >= at_least:
            out.append(node["metadata"]["name"])
    return out


def pool_group(pool: Obj) -> Obj:
    """The e2e pool's single GPU group (it must name its resourceName)."""
    groups = pool["spec"]["gpus"]
    if len(groups) != 1 or not groups[0].get("resourceName"):
        raise UsageError(f"HardwarePool {pool['metadata']['name']}: expected one GPU group "
                         "with a resourceName")
    return dict(groups[0])


def pool_resource(pool: Obj) -> tuple[str, str]:
    """(GPU key, extended resource name) of the e2e pool's single group."""
    group = pool_group(pool)
    return group["gpu"], group["resourceName"]


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in an argv, else None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def parse_table(text: str) -> list[dict[str, str]]:
    """kubectl's default table output as one dict per row, keyed by the header.

    Cells are sliced at the header's column offsets (kubectl left-aligns every column), so
    values holding single spaces ("fp8 TP1 ngramx4") stay whole.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def owned_by(obj: Obj, endpoint: Obj) -> bool:
    """Whether `obj` names the endpoint as its controlling owner (uid included)."""
    meta = endpoint["metadata"]
    return any(r.get("kind") == "OptimizedEndpoint" and r.get("name") == meta["name"]
               and r.get("uid") == meta.get("uid") and r.get("controller") is True
               for r in obj.get("metadata", {}).get("ownerReferences") or [])


def _names(objs: list[Obj]) -> str:
    return ", ".join(sorted(o["metadata"]["name"] for o in objs)) or "none"


def engine_container(deployment: Obj) -> Obj:
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == "engine":
            return c
    raise CheckFailed(f"Deployment {deployment['metadata']['name']} has no 'engine' container")


def check_children(endpoint: Obj, deployments: list[Obj], services: list[Obj],
                   configmaps: list[Obj], *, sim_image: str, gpu_resource: str) -> str:
    """What a Ready endpoint must own, checked against its status; returns a summary line.

    The lists hold the objects labelled with the endpoint (trilemma.dev/endpoint=<name>).
    """
    meta, spec, status = endpoint["metadata"], endpoint["spec"], endpoint.get("status") or {}
    name = meta["name"]
    active = status.get("activeConfiguration") or {}
    config_hash = active.get("hash")
    if not config_hash:
        raise CheckFailed(f"{name}: status.activeConfiguration.hash is empty")
    if status.get("servingHash") != config_hash:
        raise CheckFailed(f"{name}: status.servingHash={status.get('servingHash')!r}, "
                          f"expected the active configuration {config_hash!r}")

    # One Deployment <name>-<hash8>, owned by the endpoint, running the plan's engine command.
    wanted = f"{name}-{config_hash}"
    if [d["metadata"]["name"] for d in deployments] != [wanted]:
        raise CheckFailed(f"{name}: expected exactly Deployment {wanted}, found "
                          f"{_names(deployments)}")
    deploy = deployments[0]
    if not owned_by(deploy, endpoint):
        raise CheckFailed(f"Deployment {wanted}: no controller ownerReference to "
                          f"OptimizedEndpoint {name} (uid {meta.get('uid')}): "
                          f"{deploy['metadata'].get('ownerReferences')}")
    if deploy["metadata"].get("labels", {}).get(naming.LABEL_CONFIG_HASH) != config_hash:
        raise CheckFailed(f"Deployment {wanted}: label {naming.LABEL_CONFIG_HASH} is not "
                          f"{config_hash}")
    engine = engine_container(deploy)
    if engine.get("image") != sim_image:
        raise CheckFailed(f"Deployment {wanted}: engine image {engine.get('image')!r}, "
                          f"expected spec.engine.vllmImage {sim_image!r}")
    if engine.get("command") != ENGINE_COMMAND:
        raise CheckFailed(f"Deployment {wanted}: engine command {engine.get('command')}, "
                          f"expected {ENGINE_COMMAND} (the sim image's shim stands in for it)")
    if engine.get("args") != active.get("engineArgs"):
        raise CheckFailed(f"Deployment {wanted}: engine args {engine.get('args')} differ from "
                          f"status.activeConfiguration.engineArgs {active.get('engineArgs')}")
    limits = (engine.get("resources") or {}).get("limits") or {}
    if gpu_resource not in limits:
        raise CheckFailed(f"Deployment {wanted}: engine limits {limits} do not request "
                          f"{gpu_resource} (the pool's resourceName)")
    env = {e["name"]: e.get("value") for e in engine.get("env") or []}
    for extra in (spec.get("serving") or {}).get("env") or []:
        if env.get(extra["name"]) != extra.get("value", ""):
            raise CheckFailed(f"Deployment {wanted}: env {extra['name']} is "
                              f"{env.get(extra['name'])!r}, spec.serving.env says "
                              f"{extra.get('value')!r}")
    replicas = deploy["spec"].get("replicas", 1)
    if replicas != active.get("replicas"):
        raise CheckFailed(f"Deployment {wanted}: {replicas} replicas, the plan has "
                          f"{active.get('replicas')}")
    available = (deploy.get("status") or {}).get("availableReplicas") or 0
    if available < replicas:
        raise CheckFailed(f"Deployment {wanted}: {available}/{replicas} replicas available "
                          "while the endpoint says Ready")

    # The Service <name>, owned, selecting exactly the active hash.
    fronts = [s for s in services if s["metadata"]["name"] == name]
    if not fronts:
        raise CheckFailed(f"{name}: no Service {name} (Services found: {_names(services)})")
    svc = fronts[0]
    if not owned_by(svc, endpoint):
        raise CheckFailed(f"Service {name}: no controller ownerReference to the endpoint")
    selected = (svc["spec"].get("selector") or {}).get(naming.LABEL_CONFIG_HASH)
    if selected != config_hash:
        raise CheckFailed(f"Service {name}: selects {naming.LABEL_CONFIG_HASH}={selected!r}, "
                          f"expected {config_hash!r}")

    # The ConfigMap <name>-plan: the plan as JSON, stamped with the hash and request digest.
    plan_name = f"{name}-plan"
    plans = [c for c in configmaps if c["metadata"]["name"] == plan_name]
    if not plans:
        raise CheckFailed(f"{name}: no ConfigMap {plan_name} (found {_names(configmaps)})")
    cm = plans[0]
    if not owned_by(cm, endpoint):
        raise CheckFailed(f"ConfigMap {plan_name}: no controller ownerReference to the endpoint")
    try:
        plan = json.loads((cm.get("data") or {})["plan.json"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckFailed(f"ConfigMap {plan_name}: data['plan.json'] is not JSON: {err}") from None
    if not isinstance(plan, dict) or "config" not in (plan.get("recommended") or {}):
        raise CheckFailed(f"ConfigMap {plan_name}: plan.json has no recommended.config")
    if cm["metadata"].get("labels", {}).get(naming.LABEL_CONFIG_HASH) != config_hash:
        raise CheckFailed(f"ConfigMap {plan_name}: label {naming.LABEL_CONFIG_HASH} is not "
                          f"{config_hash}")
    digest = (cm["metadata"].get("annotations") or {}).get(naming.ANNOTATION_REQUEST_DIGEST)
    if digest != (status.get("lastOptimization") or {}).get("requestDigest"):
        raise CheckFailed(f"ConfigMap {plan_name}: request digest {digest!r} is not "
                          "status.lastOptimization.requestDigest")
    return (f"Deployment {wanted} ({available}/{replicas} available, {limits[gpu_resource]} "
            f"{gpu_resource} each), Service {name} -> {config_hash}, ConfigMap {plan_name} "
            f"({len(cm['data']['plan.json'])} bytes of JSON)")


def check_printer_columns(table: str, endpoint: Obj) -> str:
    """`kubectl get oe <name>` shows the active model, GPU, configuration and phase."""
    rows = [r for r in parse_table(table) if r.get("NAME") == endpoint["metadata"]["name"]]
    if len(rows) != 1:
        raise CheckFailed(f"kubectl get oe: no row for {endpoint['metadata']['name']}:\n{table}")
    row = rows[0]
    status = endpoint["status"]
    active = status["activeConfiguration"]
    expected = {"MODEL": active["model"], "GPU": active["gpu"], "CONFIG": active["short"],
                "REPLICAS": str(active["replicas"]), "PHASE": status["phase"]}
    wrong = {k: (row.get(k), v) for k, v in expected.items() if row.get(k) != v}
    if wrong:
        shown = "; ".join(f"{k}: shown {got!r}, status says {want!r}"
                          for k, (got, want) in wrong.items())
        raise CheckFailed(f"kubectl get oe printer columns: {shown}\n{table}")
    return "  ".join(f"{k}={row[k]}" for k in ("MODEL", "GPU", "CONFIG", "REPLICAS", "PHASE"))


def check_engine_log(pod: str, log: str) -> None:
    """The simulated engine started, and modelled every flag the plan rendered."""
    if not SIM_STARTED.search(log):
        raise CheckFailed(f"pod {pod}: no 'sim-server: ... listening on' start line; is the "
                          f"engine image the sim image?\n{log[-2000:]}")
    for line in log.splitlines():
        if SIM_IGNORED in line:
            raise CheckFailed(f"pod {pod}: the sim-server ignored flags the plan rendered: "
                              f"{line.strip()}")


def completion_request(model: str, *, prompt: str | list[int], max_tokens: int) -> Obj:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def check_completion(reply: Obj, *, model: str, max_tokens: int) -> str:
    """An OpenAI /v1/completions answer for `model`; returns the generated text."""
    problems = []
    if reply.get("object") != "text_completion":
        problems.append(f"object={reply.get('object')!r}, expected 'text_completion'")
    if reply.get("model") != model:
        problems.append(f"model={reply.get('model')!r}, expected {model!r}")
    if not str(reply.get("id") or ""):
        problems.append("no id")
    choices = reply.get("choices")
    text = ""
    if not isinstance(choices, list) or len(choices) != 1:
        problems.append(f"choices={choices!r}, expected one choice")
    else:
        text = choices[0].get("text")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"choices[0].text={text!r}, expected generated text")
        if choices[0].get("finish_reason") not in ("length", "stop"):
            problems.append(f"finish_reason={choices[0].get('finish_reason')!r}")
    usage = reply.get("usage") or {}
    completion = usage.get("completion_tokens")
    if not isinstance(completion, int) or not 0 < completion <= max_tokens:
        problems.append(f"usage.completion_tokens={completion!r}, expected 1..{max_tokens}")
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int) or prompt < 1:
        problems.append(f"usage.prompt_tokens={prompt!r}")
    elif usage.get("total_tokens") != prompt + (completion or 0):
        problems.append(f"usage.total_tokens={usage.get('total_tokens')!r} is not the sum")
    if problems:
        raise CheckFailed("the completion is not OpenAI-shaped: " + "; ".join(problems)
                          + f"\n{json.dumps(reply)[:2000]}")
    return str(text)


# The in-cluster client: sends one completion to the Service by its DNS name, retrying while
# DNS or the Service's endpoints catch up, and prints the HTTP status and body on one line.
# Runs with the sim image's Python (stdlib only), so no extra image is needed.
CLIENT_SCRIPT = r"""
import json, sys, time, urllib.error, urllib.request
url, body, budget = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
deadline = time.monotonic() + budget
while True:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    except (urllib.error.URLError, OSError) as err:
        if time.monotonic() > deadline:
            print("E2E-ERROR", repr(err), flush=True)
            sys.exit(1)
        time.sleep(2)
        continue
    if status in (502, 503, 504) and time.monotonic() < deadline:
        time.sleep(2)
        continue
    print("E2E-RESPONSE " + json.dumps({"status": status, "body": text}), flush=True)
    sys.exit(0 if status == 200 else 1)
"""


def client_pod(name: str, namespace: str, image: str, url: str, body: Obj,
               budget_s: float) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "trilemma-e2e",
                                "app.kubernetes.io/component": "client"}},
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": int(budget_s) + 60,
            "containers": [{
                "name": "client", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-c", CLIENT_SCRIPT, url, json.dumps(body),
                            str(budget_s)],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
            }],
        },
    }


def parse_client_log(log: str) -> tuple[int, str]:
    """(HTTP status, body text) from the client pod's output."""
    for line in reversed(log.splitlines()):
        if line.startswith(CLIENT_MARK):
            answer = json.loads(line[len(CLIENT_MARK):])
            return int(answer["status"]), str(answer["body"])
    raise CheckFailed(f"the client pod printed no answer:\n{log[-2000:]}")


def long_prompt(old_args: Sequence[str], new_args: Sequence[str],
                max_tokens: int) -> list[int] | None:
    """Token ids that only the new configuration can take: longer than the old one's
    --max-model-len allows with `max_tokens`, within the new one's. None if there are none."""
    old, new = flag_value(old_args, "--max-model-len"), flag_value(new_args, "--max-model-len")
    if old is None or new is None or int(new) <= int(old) or int(old) <= max_tokens:
        return None
    # One token past what the old configuration accepts (prompt + max_tokens > its limit).
    # Token-id prompts are counted exactly by OpenAI servers (vLLM and the sim alike).
    return [1000 + i % 1000 for i in range(int(old) - max_tokens + 1)]


# ---- the cluster side ------------------------------------------------------------------------


@dataclass
class Timeline:
    """Prints each step and note with the time since the start; keeps step durations."""

    start: float = field(default_factory=time.monotonic)
    # (name, seconds, ok); ok is None for a step skipped (its reason in `skipped`).
    steps: list[tuple[str, float, bool | None]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.start:7.1f}s]"

    def note(self, text: str) -> None:
        print(f"{self.stamp()}     {text}", flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"{self.stamp()} ==> {name}", flush=True)
        began = time.monotonic()
        try:
            yield
        except BaseException:
            took = time.monotonic() - began
            self.steps.append((name, took, False))
            print(f"{self.stamp()} FAILED {name} ({took:.1f}s)", flush=True)
            raise
        took = time.monotonic() - began
        self.steps.append((name, took, True))
        print(f"{self.stamp()} ok  {name} ({took:.1f}s)", flush=True)

    def skip(self, name: str, why: str) -> None:
        """A step this run does not do, said as loudly as one it does."""
        print(f"{self.stamp()} --  skipped {name}: {why}", flush=True)
        self.steps.append((name, 0.0, None))
        self.skipped[name] = why

    def summary(self) -> str:
        width = max((len(n) for n, _, _ in self.steps), default=10)
        lines = []
        for n, t, ok in self.steps:
            if ok is None:
                lines.append(f"  {'skipped':7} {n:<{width}} {'-':>7}   ({self.skipped[n]})")
            else:
                lines.append(f"  {'ok' if ok else 'FAILED':7} {n:<{width}} {t:7.1f}s")
        lines.append(f"  {'':7} {'total':<{width}} {time.monotonic() - self.start:7.1f}s")
        return "\n".join(lines)


class Cluster:
    """kubectl and helm against $KUBECONFIG."""

    def __init__(self, kubectl: str, helm: str, timeline: Timeline) -> None:
        self.kubectl_bin = kubectl
        self.helm_bin = helm
        self.timeline = timeline

    def _run(self, argv: list[str], *, stdin: str | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"`{shlex.join(argv)}` did not finish in {timeout:.0f}s") \
                from None
        if check and done.returncode != 0:
            raise CommandFailed(f"`{shlex.join(argv)}` failed (exit {done.returncode}):\n"
                              f"{(done.stderr or done.stdout).strip()[-3000:]}")
        return done

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self._run([self.kubectl_bin, *args], stdin=stdin, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self._run([self.helm_bin, *args], check=check, timeout=timeout)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        ns = ["-n", namespace] if namespace else []
        out = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found").stdout
        return json.loads(out) if out.strip() else None

    def list(self, kind: str, namespace: str | None, selector: str | None = None) -> list[Obj]:
        ns = ["-n", namespace] if namespace else []
        sel = ["-l", selector] if selector else []
        return list(json.loads(self.kubectl("get", kind, *ns, *sel, "-o", "json").stdout)
                    .get("items", []))

    def apply(self, doc: Obj) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(doc))

    def wait_for(self, what: str, probe: Callable[[], tuple[bool, str]],
                 timeout: float) -> None:
        """Poll `probe` (done, state) until done; each new state goes to the timeline."""
        deadline = time.monotonic() + timeout
        last = None
        errors = 0
        while True:
            try:
                done, state = probe()
                errors = 0
            except CommandFailed as err:
                errors += 1
                if errors >= COMMAND_RETRIES:
                    raise
                done, state = False, f"(retrying) {str(err).splitlines()[0]}"
            if state != last:
                self.timeline.note(state)
                last = state
            if done:
                return
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}; "
                                  f"last seen: {state}")
            time.sleep(POLL_S)


def _pod_places(pods: list[Obj]) -> list[str]:
    return [f"{p['metadata']['name']} on {p['spec'].get('nodeName')}" for p in pods]


def _oe_state(ep: Obj | None) -> str:
    if ep is None:
        return "not found"
    st = ep.get("status") or {}
    active = st.get("activeConfiguration") or {}
    rollout = st.get("rollout") or {}
    parts = [f"phase={st.get('phase', '-')}"]
    if active:
        parts.append(f"config={active.get('hash')} [{active.get('short')}]")
    if st.get("servingHash"):
        parts.append(f"serving={st['servingHash']}")
    if rollout:
        parts.append(f"rollout {rollout.get('fromHash') or 'none'} -> {rollout.get('toHash')} "
                     f"{rollout.get('state')}")
    message = st.get("message")
    return " ".join(parts) + (f": {message}" if message else "")


@dataclass
class Settings:
    image: str
    sim_image: str
    build_image: bool
    build_sim_image: bool
    kind_cluster: str | None
    keep: bool
    ready_timeout: float
    container_tool: str
    # False (--no-containers): nothing built or installed, the operator runs outside the
    # cluster, the nodes' own GPUs, no check that needs a running engine.
    containers: bool = True


class E2E:
    def __init__(self, settings: Settings, cluster: Cluster, timeline: Timeline) -> None:
        self.s = settings
        self.k = cluster
        self.t = timeline
        self.namespace_doc = load_manifest(NAMESPACE_FILE)
        self.pool = load_manifest(POOL_FILE if settings.containers else NODE_GPU_POOL_FILE)
        self.endpoint = endpoint_manifest(ENDPOINT_FILE, settings.sim_image)
        self.changed = endpoint_manifest(CHANGED_ENDPOINT_FILE, settings.sim_image)
        self.invalid = endpoint_manifest(INVALID_ENDPOINT_FILE, settings.sim_image)
        self.ns = self.namespace_doc["metadata"]["name"]
        self.name = self.endpoint["metadata"]["name"]
        self.gpu, self.resource = pool_resource(self.pool)
        self.group = pool_group(self.pool)
        self.patched_nodes: list[str] = []
        self.created_release_namespace = False
        self.touched = False  # whether this run changed the cluster (and must clean up)

    # -- steps -----------------------------------------------------------------------------

    def preflight(self) -> None:
        version = self.k.kubectl("version", "-o", "json", timeout=30)
        server = json.loads(version.stdout).get("serverVersion", {}).get("gitVersion", "?")
        context = self.k.kubectl("config", "current-context", check=False).stdout.strip()
        nodes = self.k.list("nodes", None)
        self.t.note(f"KUBECONFIG={os.environ['KUBECONFIG']} context={context or '?'} "
                    f"server {server}; nodes: {_names(nodes)}")
        if not nodes:
            raise CheckFailed("the cluster has no nodes")
        if self.s.containers:
            self.t.note(f"operator image {self.s.image}, engine image {self.s.sim_image}")
        else:
            self.t.note(f"--no-containers: no image built or loaded, no release installed; "
                        f"the operator runs outside the cluster; engine image "
                        f"{self.s.sim_image} is never pulled")

    def build(self) -> None:
        tool = self.s.container_tool
        if self.s.build_image:
            self._stream([tool, "build", "-t", self.s.image, str(ROOT)])
        if self.s.build_sim_image:
            self._stream([tool, "build", "-t", self.s.sim_image, "--build-arg",
                          f"BASE={self.s.image}", "-f", str(SIM_DOCKERFILE), str(E2E)])

    def load_into_kind(self) -> None:
        assert self.s.kind_cluster
        for image in (self.s.image, self.s.sim_image):
            self._stream(["kind", "load", "docker-image", image, "--name", self.s.kind_cluster])

    def _stream(self, argv: list[str]) -> None:
        self.t.note("$ " + shlex.join(argv))
        if subprocess.run(argv, check=False).returncode != 0:  # output goes to the console
            raise CheckFailed(f"`{shlex.join(argv)}` failed")

    def install(self) -> None:
        if self.s.containers:
            # Only a namespace this run created is deleted at the end.
            self.created_release_namespace = self.k.get("namespace", RELEASE_NAMESPACE) is None
            self.k.helm(*helm_install_args(self.s.image))
        # Helm installs crds/ on the first install only: apply the chart's CRDs so a cluster
        # kept from an earlier run tests today's schemas (charts/README.md, "CRDs").
        self.k.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART_CRDS))
        for crd in sorted(CHART_CRDS.glob("*.yaml")):
            crd_name = load_manifest(crd)["metadata"]["name"]
            self.k.kubectl("wait", "--for=condition=Established", f"crd/{crd_name}",
                           "--timeout=60s")
        if self.s.containers:
            pods = self.k.list("pods", RELEASE_NAMESPACE,
                               f"app.kubernetes.io/instance={RELEASE}")
            self.t.note(f"operator pods: {_names(pods)}")

    def fake_gpus(self) -> None:
        """Nodes the engine pods may land on with the pool's GPUs per node allocatable: the
        ones already there, else every node patched with FAKE_GPUS_PER_NODE of them."""
        per_node = int(self.group.get("gpusPerNode") or FAKE_GPUS_PER_NODE)
        nodes = self.k.list("nodes", None)
        have = gpu_nodes(nodes, self.group, self.resource, per_node)
        if have:
            self.t.note(f"nodes already advertise {per_node}+ {self.resource} for the pool: "
                        f"{', '.join(have)}; no node patched")
            return
        if not self.s.containers:
            raise CheckFailed(f"no node the pool {self.pool['metadata']['name']} selects "
                              f"({self.group.get('nodeSelector')}) advertises {per_node} "
                              f"{self.resource}; --no-containers patches no node")
        patch = json.dumps(gpu_capacity_patch(self.resource, FAKE_GPUS_PER_NODE))
        for node in nodes:
            node_name = node["metadata"]["name"]
            self.k.kubectl("patch", "node", node_name, "--subresource=status", "--type=json",
                           "-p", patch)
            self.patched_nodes.append(node_name)

        def advertised() -> tuple[bool, str]:
            ready = gpu_nodes(self.k.list("nodes", None), self.group, self.resource,
                              FAKE_GPUS_PER_NODE)
            return bool(ready), (f"schedulable nodes with {FAKE_GPUS_PER_NODE} allocatable "
                                 f"{self.resource}: {', '.join(ready) or 'none yet'}")

        # The kubelet copies the new capacity into allocatable on its next status sync.
        self.k.wait_for(f"allocatable {self.resource}", advertised, 120)

    def create(self) -> None:
        for doc in (self.namespace_doc, self.pool, self.endpoint):
            self.k.apply(doc)
            self.t.note(f"applied {doc['kind']} {doc['metadata']['name']}")

    def _endpoint(self, name: str | None = None) -> Obj | None:
        return self.k.get("optimizedendpoints.trilemma.dev", name or self.name, self.ns)

    def _settled(self, *, not_hash: str | None = None) -> Callable[[], tuple[bool, str]]:
        """Probe: the endpoint has handled its current generation and serves it, Ready."""
        def probe() -> tuple[bool, str]:
            ep = self._endpoint()
            state = _oe_state(ep)
            if ep is None:
                raise CheckFailed(f"OptimizedEndpoint {self.name} disappeared")
            st = ep.get("status") or {}
            if st.get("phase") in (EndpointPhase.FAILED.value, EndpointPhase.INFEASIBLE.value):
                raise CheckFailed(f"OptimizedEndpoint {self.name} went {st['phase']}: "
                                  f"{st.get('message')}")
            active = (st.get("activeConfiguration") or {}).get("hash")
            current = st.get("observedGeneration") == ep["metadata"].get("generation")
            if current and not_hash is not None and active == not_hash:
                # The operator handled the change and kept the configuration: no rollout
                # will ever come, so say so now instead of at the timeout.
                raise CheckFailed(f"{self.name}: the spec change was planned as the same "
                                  f"configuration {active}; nothing to roll out")
            done = (current and st.get("phase") == EndpointPhase.READY.value
                    and active is not None and st.get("servingHash") == active)
            return done, state
        return probe

    def wait_ready(self) -> Obj:
        try:
            self.k.wait_for(f"OptimizedEndpoint {self.name} Ready", self._settled(),
                            self.s.ready_timeout)
        except CheckFailed as err:
            ep = self._endpoint()
            if not self.s.containers and ep is not None and not ep["metadata"].get(
                    "finalizers"):
                raise CheckFailed(f"{err}; no operator took the endpoint (it has no "
                                  "finalizer): --no-containers runs none, start one against "
                                  "this cluster") from None
            raise
        ep = self._endpoint()
        assert ep is not None
        opt = ep["status"].get("lastOptimization") or {}
        pred = ep["status"].get("predictions") or {}
        self.t.note(f"plan: {ep['status']['activeConfiguration']['summary']}, "
                    f"{opt.get('candidates')} configurations in {opt.get('durationSeconds')}s; "
                    f"predicted TTFT p90 {pred.get('ttftP90Ms')} ms, TPOT p90 "
                    f"{pred.get('tpotP90Ms')} ms, ${ep['status'].get('costPerHour')}/h")
        return ep

    def check_children(self) -> Obj:
        ep = self._endpoint()
        assert ep is not None
        sel = f"{naming.LABEL_ENDPOINT}={self.name}"
        summary = check_children(
            ep, self.k.list("deployments", self.ns, sel), self.k.list("services", self.ns, sel),
            self.k.list("configmaps", self.ns, sel), sim_image=self.s.sim_image,
            gpu_resource=self.resource)
        self.t.note(summary)
        config_hash = ep["status"]["activeConfiguration"]["hash"]
        pods = self.k.list("pods", self.ns, f"{sel},{naming.LABEL_CONFIG_HASH}={config_hash}")
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        if not running:
            raise CheckFailed(f"no running engine pod for {config_hash}: {_names(pods)}")
        if not self.s.containers:
            self.t.note(f"{', '.join(_pod_places(running))} Running; skipped: the engine's "
                        f"start line in the pod log ({NO_ENGINE} wrote one)")
            return ep
        for pod in running:
            pod_name = pod["metadata"]["name"]
            log = self.k.kubectl("logs", "-n", self.ns, pod_name, "-c", "engine").stdout
            check_engine_log(pod_name, log)
            start = SIM_STARTED.search(log)
            assert start is not None  # check_engine_log passed
            self.t.note(f"{pod_name} on {pod['spec'].get('nodeName')}: {start[0]}")
        return ep

    def check_columns(self, ep: Obj) -> None:
        table = self.k.kubectl("get", "oe", self.name, "-n", self.ns).stdout
        self.t.note(check_printer_columns(table, ep))

    def complete(self, ep: Obj, *, prompt: str | list[int], max_tokens: int) -> str:
        """One completion through the endpoint's Service, from a pod in the cluster."""
        svc = self.k.get("service", self.name, self.ns)
        if svc is None:
            raise CheckFailed(f"Service {self.name} is gone")
        port = next(p["port"] for p in svc["spec"]["ports"] if p.get("name") == "http")
        url = f"http://{self.name}.{self.ns}.svc:{port}/v1/completions"
        model = ep["status"]["activeConfiguration"]["model"]
        body = completion_request(model, prompt=prompt, max_tokens=max_tokens)
        pod_name = f"e2e-client-{int(time.time() * 1000) % 10**9}"
        self.k.apply(client_pod(pod_name, self.ns, self.s.sim_image, url, body,
                                CLIENT_TIMEOUT - 30))
        shown = prompt if isinstance(prompt, str) else f"<{len(prompt)} token ids>"
        self.t.note(f"POST {url} model={model} prompt={shown!r} max_tokens={max_tokens}")
        try:
            def finished() -> tuple[bool, str]:
                pod = self.k.get("pod", pod_name, self.ns)
                phase = (pod or {}).get("status", {}).get("phase", "Pending")
                return phase in ("Succeeded", "Failed"), f"client pod {pod_name}: {phase}"

            self.k.wait_for(f"client pod {pod_name}", finished, CLIENT_TIMEOUT)
            log = self.k.kubectl("logs", "-n", self.ns, pod_name).stdout
        finally:
            self.k.kubectl("delete", "pod", pod_name, "-n", self.ns, "--wait=false",
                           "--ignore-not-found", check=False)
        status, text = parse_client_log(log)
        if status != 200:
            raise CheckFailed(f"POST {url}: HTTP {status}: {text[:2000]}")
        try:
            reply = json.loads(text)
        except ValueError:
            raise CheckFailed(f"POST {url}: the answer is not JSON: {text[:2000]}") from None
        generated = check_completion(reply, model=model, max_tokens=max_tokens)
        self.t.note(f"HTTP 200 {reply.get('id')}: {generated!r} "
                    f"(usage {json.dumps(reply.get('usage'))})")
        return generated

    def change_spec(self, before: Obj) -> Obj:
        old_hash = before["status"]["activeConfiguration"]["hash"]
        self.k.apply(self.changed)
        self.t.note(f"applied {CHANGED_ENDPOINT_FILE.name}: prompts x4; old configuration "
                    f"{old_hash}")
        self.k.wait_for(f"{self.name} Ready on a configuration other than {old_hash}",
                        self._settled(not_hash=old_hash), ROLLOUT_TIMEOUT)
        after = self._endpoint()
        assert after is not None
        new_hash = after["status"]["activeConfiguration"]["hash"]
        rollout = after["status"].get("rollout") or {}
        if (rollout.get("fromHash"), rollout.get("toHash"), rollout.get("state")) != (
                old_hash, new_hash, "Complete"):
            raise CheckFailed(f"status.rollout={rollout}, expected {old_hash} -> {new_hash} "
                              "Complete")

        def old_gone() -> tuple[bool, str]:
            left = self.k.get("deployment", f"{self.name}-{old_hash}", self.ns)
            return left is None, (f"Deployment {self.name}-{old_hash}: "
                                  f"{'gone' if left is None else 'still there'}")

        self.k.wait_for(f"the old Deployment {self.name}-{old_hash} to go", old_gone,
                        GONE_TIMEOUT)
        svc = self.k.get("service", self.name, self.ns) or {}
        selected = (svc.get("spec", {}).get("selector") or {}).get(naming.LABEL_CONFIG_HASH)
        if selected != new_hash:
            raise CheckFailed(f"Service {self.name} selects {selected!r}, expected {new_hash}")
        self.t.note(f"Service {self.name}: {old_hash} -> {new_hash} "
                    f"[{after['status']['activeConfiguration']['short']}]")
        return after

    def invalid_endpoint(self) -> None:
        name = self.invalid["metadata"]["name"]
        model = self.invalid["spec"]["model"]["id"]
        self.k.apply(self.invalid)

        def failed() -> tuple[bool, str]:
            ep = self._endpoint(name)
            st = (ep or {}).get("status") or {}
            if st.get("phase") in (EndpointPhase.READY.value, EndpointPhase.DEPLOYING.value):
                raise CheckFailed(f"{name} (unknown model {model}) reached {st['phase']}")
            return st.get("phase") == EndpointPhase.FAILED.value, f"{name}: {_oe_state(ep)}"

        self.k.wait_for(f"{name} Failed", failed, FAILED_TIMEOUT)
        ep = self._endpoint(name)
        assert ep is not None
        message = ep["status"].get("message") or ""
        if model not in message:
            raise CheckFailed(f"{name}: status.message {message!r} does not name the model "
                              f"{model!r}")
        validated = [c for c in ep["status"].get("conditions") or []
                     if c.get("type") == "Validated"]
        if not validated or validated[0].get("status") != "False" or \
                validated[0].get("reason") != "UnknownModel":
            raise CheckFailed(f"{name}: expected condition Validated=False reason UnknownModel, "
                              f"got {validated}")
        made = [o for kind in ("deployments", "services")
                for o in self.k.list(kind, self.ns, f"{naming.LABEL_ENDPOINT}={name}")]
        if made:
            raise CheckFailed(f"{name} failed validation yet has children: {_names(made)}")
        healthy = self._endpoint()
        if ((healthy or {}).get("status") or {}).get("phase") != EndpointPhase.READY.value:
            raise CheckFailed(f"{self.name} left Ready while {name} failed: "
                              f"{_oe_state(healthy)}")
        self.t.note(f"{name}: Failed, Validated=False UnknownModel: {message}")

    def delete_endpoints(self) -> None:
        names = [self.name, self.invalid["metadata"]["name"]]
        # Waits for the operator's finalizer: it deletes the children, then lets go.
        self.k.kubectl("delete", "optimizedendpoints.trilemma.dev", *names, "-n", self.ns,
                       "--wait=true", "--timeout=120s", timeout=150)
        selector = f"{naming.LABEL_ENDPOINT} in ({','.join(names)})"

        def gone() -> tuple[bool, str]:
            left = {kind: self.k.list(kind, self.ns, selector)
                    for kind in ("deployments", "services", "configmaps", "pods")}
            state = "; ".join(f"{kind}: {_names(objs)}" for kind, objs in left.items())
            return not any(left.values()), f"left: {state}"

        self.k.wait_for("the endpoints' children to go", gone, GONE_TIMEOUT)

    # -- cleanup and diagnostics -----------------------------------------------------------

    def clean_endpoints(self) -> None:
        """Remove endpoints from this or an earlier run, even without a running operator."""
        names = [self.name, self.invalid["metadata"]["name"]]
        done = self.k.kubectl("delete", "optimizedendpoints.trilemma.dev", *names, "-n",
                              self.ns, "--ignore-not-found", "--wait=true", "--timeout=60s",
                              check=False, timeout=90)
        if done.returncode != 0 and "the server doesn't have a resource type" not in \
                done.stderr:
            # No operator to run the finalizer (uninstalled, crashed): drop it by hand.
            for ep_name in names:
                self.k.kubectl("patch", "optimizedendpoints.trilemma.dev", ep_name, "-n",
                               self.ns, "--type=merge", "-p",
                               '{"metadata":{"finalizers":null}}', check=False)

    def cleanup(self, *, uninstall: bool) -> None:
        self.touched = True
        self.clean_endpoints()
        self.k.kubectl("delete", "hardwarepools.trilemma.dev",
                       self.pool["metadata"]["name"], "--ignore-not-found", check=False)
        self.k.kubectl("delete", "namespace", self.ns, "--ignore-not-found", "--wait=true",
                       "--timeout=180s", check=False, timeout=200)
        if uninstall and self.s.containers:
            self.k.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait",
                        check=False)
            if self.created_release_namespace:
                self.k.kubectl("delete", "namespace", RELEASE_NAMESPACE, "--ignore-not-found",
                               "--wait=false", check=False)
        if uninstall:
            removal = json.dumps(gpu_capacity_removal(self.resource))
            for node in self.patched_nodes:
                self.k.kubectl("patch", "node", node, "--subresource=status", "--type=json",
                               "-p", removal, check=False)

    def diagnostics(self) -> None:
        commands = [
            ["get", "optimizedendpoints.trilemma.dev", "-A"],
            ["get", "optimizedendpoints.trilemma.dev", "-n", self.ns, "-o", "yaml"],
            ["get", "deployments,replicasets,pods,services,configmaps", "-n", self.ns, "-o",
             "wide"],
            ["get", "events", "-n", self.ns, "--sort-by=.lastTimestamp"],
        ]
        if self.s.containers:  # else no pod has a log; the operator's is wherever it runs
            commands += [
                ["logs", "-n", RELEASE_NAMESPACE, "-l",
                 f"app.kubernetes.io/instance={RELEASE}", "--tail=120"],
                ["logs", "-n", self.ns, "-l", naming.LABEL_ENDPOINT, "--all-containers",
                 "--prefix", "--tail=40"],
            ]
        print("\n---- diagnostics " + "-" * 60, flush=True)
        for args in commands:
            try:
                done = self.k.kubectl(*args, check=False, timeout=60)
                text = (done.stdout + done.stderr).strip()
            except CommandFailed as err:  # diagnostics never hide the failure they explain
                text = str(err)
            print(f"$ kubectl {shlex.join(args)}\n{text[-6000:]}\n", flush=True)


def run(e2e: E2E, timeline: Timeline) -> None:
    s = e2e.s
    with timeline.step("preflight: cluster reachable"):
        e2e.preflight()
    if s.build_image or s.build_sim_image:
        with timeline.step("build images"):
            e2e.build()
    if s.kind_cluster:
        with timeline.step(f"load images into kind cluster {s.kind_cluster}"):
            e2e.load_into_kind()
    with timeline.step("remove leftovers of earlier runs"):
        e2e.cleanup(uninstall=False)
    if s.containers:
        with timeline.step("install the chart (helm --wait) and the current CRDs"):
            e2e.install()
        with timeline.step(f"advertise {FAKE_GPUS_PER_NODE} fake {e2e.resource} per node"):
            e2e.fake_gpus()
    else:
        timeline.skip("install the chart", "--no-containers: the operator already runs, "
                                          "outside the cluster")
        with timeline.step("apply the current CRDs"):
            e2e.install()
        with timeline.step(f"nodes advertise {e2e.resource} for the pool"):
            e2e.fake_gpus()
    with timeline.step("apply namespace, HardwarePool, OptimizedEndpoint"):
        e2e.create()
    with timeline.step("wait for phase Ready (plan, deploy, engine up)"):
        e2e.wait_ready()
    with timeline.step("check Deployment, Service, ConfigMap, engine pods"):
        ready = e2e.check_children()
    with timeline.step("check `kubectl get oe` printer columns"):
        e2e.check_columns(ready)
    if s.containers:
        with timeline.step("completion through the Service"):
            e2e.complete(ready, prompt="Say hello to the trilemma e2e test.", max_tokens=16)
    else:
        timeline.skip("completion through the Service", f"{NO_ENGINE} answers")
    old_args = ready["status"]["activeConfiguration"]["engineArgs"]
    with timeline.step("spec change (prompts x4): new hash rolled out, old one gone"):
        changed = e2e.change_spec(ready)
    with timeline.step("check the children of the new configuration"):
        changed = e2e.check_children()
    prompt = long_prompt(old_args, changed["status"]["activeConfiguration"]["engineArgs"], 8)
    if not s.containers:
        timeline.skip("completion through the Service after the rollout",
                      f"{NO_ENGINE} answers")
    elif prompt is not None:
        with timeline.step("completion only the new configuration fits (max-model-len)"):
            e2e.complete(changed, prompt=prompt, max_tokens=8)
    else:
        with timeline.step("completion through the Service after the rollout"):
            e2e.complete(changed, prompt="And hello again.", max_tokens=8)
    with timeline.step("invalid endpoint (unknown model) -> Failed with a message"):
        e2e.invalid_endpoint()
    with timeline.step("delete the endpoints: children gone"):
        e2e.delete_endpoints()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_e2e.py",
        description="End-to-end test of the trilemma operator on the cluster of $KUBECONFIG "
                    "(tests/e2e/README.md).",
        epilog="Environment: KUBECONFIG (required), IMAGE / SIM_IMAGE (use these images "
               "instead of building them), KIND_CLUSTER (kind load the images into it), "
               "CONTAINER_TOOL (default docker).")
    p.add_argument("--keep", action="store_true",
                   help="leave the release, namespace, pool and fake GPUs in place (success or "
                        "failure) for inspection")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT,
                   help=f"seconds to wait for the first Ready (default {READY_TIMEOUT:.0f})")
    p.add_argument("--no-containers", action="store_true",
                   help="for a cluster whose pods run no containers (kwok, `trilemma "
                        "dev-cluster`): build, load and install nothing (an operator must "
                        "already run against the cluster), use the nodes' own nvidia.com/gpu "
                        f"({NODE_GPU_POOL_FILE.name}), skip the checks that need a running "
                        "engine, saying so")
    return p.parse_args(argv)


def settings_from(env: dict[str, str], args: argparse.Namespace) -> Settings:
    if not env.get("KUBECONFIG"):
        raise UsageError("set KUBECONFIG to the test cluster's kubeconfig (this test installs "
                         "a release and patches node status; it never falls back to "
                         "~/.kube/config), e.g. KUBECONFIG=/tmp/trilemma-e2e.kubeconfig")
    if args.no_containers:
        ignored = [v for v in ("IMAGE", "SIM_IMAGE", "KIND_CLUSTER") if env.get(v)]
        if ignored:
            raise UsageError(f"--no-containers builds, loads and installs no image: unset "
                             f"{', '.join(ignored)}")
        return Settings(image=DEFAULT_IMAGE, sim_image=MANIFEST_SIM_IMAGE, build_image=False,
                        build_sim_image=False, kind_cluster=None, keep=args.keep,
                        ready_timeout=args.ready_timeout, container_tool="", containers=False)
    image = env.get("IMAGE") or DEFAULT_IMAGE
    sim_image = env.get("SIM_IMAGE") or DEFAULT_SIM_IMAGE
    for img in (image, sim_image):
        if split_image(img)[1] == "latest":
            raise UsageError(f"{img}: use a tag other than latest (pods pull :latest Always, "
                             "which defeats `kind load`)")
    return Settings(image=image, sim_image=sim_image, build_image=not env.get("IMAGE"),
                    build_sim_image=not env.get("SIM_IMAGE"),
                    kind_cluster=env.get("KIND_CLUSTER") or None, keep=args.keep,
                    ready_timeout=args.ready_timeout,
                    container_tool=env.get("CONTAINER_TOOL") or "docker")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} not found on PATH (tests/e2e/README.md lists the prerequisites)")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    timeline = Timeline()
    try:
        settings = settings_from(dict(os.environ), args)
        kubectl = _tool("kubectl")
        # --no-containers installs no release: no helm needed (nor called).
        helm = _tool("helm") if settings.containers else "helm"
        if settings.build_image or settings.build_sim_image:
            _tool(settings.container_tool)
        if settings.kind_cluster:
            _tool("kind")
        e2e = E2E(settings, Cluster(kubectl, helm, timeline), timeline)
    except UsageError as err:
        print(f"run_e2e.py: {err}", file=sys.stderr)
        return 2
    ok = False
    try:
        run(e2e, timeline)
        ok = True
    except CheckFailed as err:
        print(f"\nE2E FAILED: {err}", file=sys.stderr, flush=True)
        if e2e.touched:  # before that, nothing of this run is in the cluster to look at
            e2e.diagnostics()
    except KeyboardInterrupt:
        print("\nE2E interrupted", file=sys.stderr, flush=True)
    finally:
        if settings.keep:
            timeline.note("--keep: leaving the release, namespace, pool and fake GPUs")
        elif e2e.touched:
            try:
                with timeline.step("clean up (endpoints, pool, namespace, release, fake GPUs)"):
                    e2e.cleanup(uninstall=True)
            except CheckFailed as err:
                # The verdict stands; say what may be left behind.
                print(f"cleanup incomplete: {err}", file=sys.stderr, flush=True)
        print("\nTimeline:\n" + timeline.summary(), flush=True)
    print("E2E PASSED" if ok else "E2E FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
