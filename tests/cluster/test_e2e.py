"""tests/e2e/run_e2e.py on the suite's real control plane, as a user runs it (a subprocess with
kubectl and an admin KUBECONFIG), in its --no-containers mode: the operator is the session's
(`kopf run` as the chart's ServiceAccount, outside the cluster), the pool the kwok nodes' own
`nvidia.com/gpu`, and the two checks that need a running engine are skipped, saying so.
Every other check of the script runs: plan -> children -> Ready, printer columns, a spec change
rolled out to a new hash, an unknown model Failed, deletion removing the children.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "e2e" / "run_e2e.py"
# The summary table the script prints last: "  <status> <step name>  <seconds>s|-".
ROW = re.compile(r"^  (ok|FAILED|skipped)\s+(.+?)\s+(?:\d+\.\d+s|-)(?:\s|$)")

EXPECTED = [
    ("ok", "preflight: cluster reachable"),
    ("ok", "remove leftovers of earlier runs"),
    ("skipped", "install the chart"),
    ("ok", "apply the current CRDs"),
    ("ok", "nodes advertise nvidia.com/gpu for the pool"),
    ("ok", "apply namespace, HardwarePool, OptimizedEndpoint"),
    ("ok", "wait for phase Ready (plan, deploy, engine up)"),
    ("ok", "check Deployment, Service, ConfigMap, engine pods"),
    ("ok", "check `kubectl get oe` printer columns"),
    ("skipped", "completion through the Service"),
    ("ok", "spec change (prompts x4): new hash rolled out, old one gone"),
    ("ok", "check the children of the new configuration"),
    ("skipped", "completion through the Service after the rollout"),
    ("ok", "invalid endpoint (unknown model) -> Failed with a message"),
    ("ok", "delete the endpoints: children gone"),
    ("ok", "clean up (endpoints, pool, namespace, release, fake GPUs)"),
]


def timeline(out: str) -> list[tuple[str, str]]:
    table = out.split("\nTimeline:\n", 1)[1]
    return [(m[1], m[2]) for line in table.splitlines() if (m := ROW.match(line))]


def test_run_e2e_without_containers_passes_every_check_it_can(
        cluster: LocalCluster, operator: OperatorProcess) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig),
           "PATH": f"{cluster.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    for var in ("IMAGE", "SIM_IMAGE", "KIND_CLUSTER"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-containers",
                           "--ready-timeout", "240"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    out = done.stdout
    assert done.returncode == 0, f"{out[-8000:]}\n{done.stderr[-4000:]}"
    assert out.rstrip().endswith("E2E PASSED")
    assert timeline(out) == EXPECTED, out[-4000:]
    # Skipped steps say why, in the run and in the summary.
    for step in ("completion through the Service", "install the chart",
                 "completion through the Service after the rollout"):
        assert out.count(f"--  skipped {step}: ") == 1, step
    assert "(--no-containers: the pods run no container (kwok marks them Running and Ready), " \
           "so no engine answers)" in out
    assert "skipped: the engine's start line in the pod log" in out
    # The checks ran on what the operator made: a rollout from one hash to another.
    rolled = re.search(r"Service e2e-chat: ([0-9a-f]{8}) -> ([0-9a-f]{8})", out)
    assert rolled and rolled[1] != rolled[2], out[-4000:]
    assert "e2e-unknown-model: Failed, Validated=False UnknownModel" in out
    # No node was patched: the kwok nodes' own GPUs were used.
    assert "no node patched" in out
    assert operator.problems() == [], operator.problems()
