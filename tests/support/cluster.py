"""The operator as users run it, on the real control plane of trilemma.simfleet.cluster.

- `install_operator(cluster, helm)`: the CRDs from crds/ applied with kubectl (the server
  compiles every schema and CEL rule), and the chart's ServiceAccount and RBAC rendered by helm;
- `OperatorProcess`: `kopf run --module=trilemma.operator.handlers` (the image's command) in a
  subprocess that authenticates with that ServiceAccount's token, not as admin, so a permission
  the chart forgets fails a test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from trilemma.simfleet.cluster import LocalCluster
from trilemma.simfleet.prometheus_server import free_port

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NS = "trilemma-system"
# RBAC refusals: Kopf's own calls quote the server (`... is forbidden: User "..." cannot ...`),
# the operator's client says `HTTP 403` (operator/kube.py); bodies the server rejects: 422.
# (Not a bare "422": log lines carry milliseconds.)
_REFUSED = re.compile(r"forbidden: User .* cannot |HTTP 403\b|HTTP 422\b|status=422\b|"
                      r"'code': 422\b|Unprocessable")
# 403s that are a namespace's policy, not a missing permission: a ResourceQuota refusing a
# child (the tenant-safety scenario provokes one on purpose).
_NOT_OURS = re.compile(r"exceeded quota")
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def render_chart(helm: str, *args: str) -> list[dict[str, Any]]:
    text = subprocess.run([helm, "template", "trilemma", str(ROOT / "charts" / "trilemma"),
                           "--namespace", OPERATOR_NS, *args], capture_output=True, text=True,
                          check=True).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def install_operator(cluster: LocalCluster, helm: str) -> Path:
    """CRDs and the chart's RBAC; returns a kubeconfig with the operator's ServiceAccount."""
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    for crd in ("optimizedendpoints.trilemma.dev", "hardwarepools.trilemma.dev"):
        cluster.wait_established(crd)
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}}])
    rbac = [d for d in render_chart(helm) if d["kind"] in RBAC_KINDS]
    assert {d["kind"] for d in rbac} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    cluster.apply(rbac)
    account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
    return cluster.service_account_kubeconfig(OPERATOR_NS, account)


class OperatorProcess:
    """One operator replica. `peering`: None runs standalone (the chart's default with one
    replica); a name joins that ClusterKopfPeering (active/standby replicas). `namespace`:
    serve that namespace only (the chart's watchNamespaces), else all of them."""

    def __init__(self, kubeconfig: Path, workdir: Path, *, peering: str | None = None,
                 resync_s: float = 1.0, env: dict[str, str] | None = None,
                 name: str = "operator", namespace: str | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log = workdir / f"{name}.log"
        self.peering = peering
        self.scope = [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
        self.port = free_port()
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TRILEMMA_METRICS_PORT": "0",
                    "TRILEMMA_RESYNC_SECONDS": f"{resync_s:g}",
                    "TRILEMMA_CACHE_DIR": str(workdir / "cache"), "POD_ID": name,
                    **(env or {})}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> OperatorProcess:
        mode = [f"--peering={self.peering}"] if self.peering else ["--standalone"]
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "--module=trilemma.operator.handlers",
                 *self.scope, *mode, f"--liveness=http://127.0.0.1:{self.port}/healthz"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"the operator exited with {self.popen.returncode}:\n"
                                     f"{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator was not live in {timeout_s:.0f} s:\n"
                                     f"{self.tail()}")
            time.sleep(0.3)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (Kopf finishes what it is doing), or SIGKILL: a crash mid-work."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def problems(self) -> list[str]:
        """Log lines that say RBAC refused a call or the server rejected a body (_REFUSED).
        Not Kopf's every 403: an Event posted into a namespace being deleted is refused with
        403 too, and that is the namespace's doing."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines()
                if _REFUSED.search(line) and not _NOT_OURS.search(line)]
