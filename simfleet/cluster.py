"""A real Kubernetes control plane on loopback, with fake GPU nodes: what the cluster tests,
`trilemma dev-cluster` and `trilemma demo` run the operator against when the binaries exist.

    etcd  <-  kube-apiserver (127.0.0.1, TLS, Node+RBAC authorizers, ServiceAccount tokens,
              the default admission plugins, PodSecurity included)
          <-  kube-controller-manager (garbage collector, Deployment/ReplicaSet, EndpointSlice,
              namespace, ServiceAccount and token controllers)
          <-  kube-scheduler
          <-  kwok: manages the fake nodes (heartbeats) and the pods bound to them (Running,
              Ready), so Deployments really schedule, roll out and become Available.

The binaries come from `.ci/install-kube` (built from the Go modules k8s.io/kubernetes,
sigs.k8s.io/kwok, go.etcd.io/etcd). What stays emulated: the kubelet (kwok marks pods Ready
without running a container) and the GPUs (a node advertises `nvidia.com/gpu` capacity).
Everything lives in one temporary folder; `stop` ends every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trilemma.simfleet import pki
from trilemma.simfleet.prometheus_server import free_port

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
            "kwok")
INSTALL_HINT = "run `bash .ci/install-kube` (needs Go >= 1.24), or set TRILEMMA_KUBE_BIN"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
# Resource names of the kinds ClusterApi reads and writes.
PLURALS = {"OptimizedEndpoint": "optimizedendpoints", "HardwarePool": "hardwarepools",
           "Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
           "Namespace": "namespaces", "Event": "events", "Pod": "pods"}
# The annotation kwok selects the nodes it manages by (kwok's own convention).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


def cache_root() -> Path:
    """Where .ci/install-kube caches builds, one folder per version set (the same default)."""
    configured = os.environ.get("TRILEMMA_KUBE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "trilemma" / "kube"


def _complete(folder: Path) -> bool:
    return all(os.access(folder / b, os.X_OK) for b in BINARIES)


def find_kube_bin() -> Path | None:
    """The folder with every binary: $TRILEMMA_KUBE_BIN, else the newest complete build in the
    cache. An explicit folder that lacks a binary is an error, not a fallthrough."""
    explicit = os.environ.get("TRILEMMA_KUBE_BIN")
    if explicit:
        folder = Path(explicit)
        if not _complete(folder):
            missing = [b for b in BINARIES if not os.access(folder / b, os.X_OK)]
            raise FileNotFoundError(f"TRILEMMA_KUBE_BIN={explicit} lacks {', '.join(missing)}")
        return folder
    builds = [p / "bin" for p in cache_root().glob("*") if _complete(p / "bin")]
    return max(builds, key=lambda p: p.stat().st_mtime) if builds else None


@dataclass(frozen=True)
class NodeGroup:
    """`count` fake nodes named `<prefix>-<i>`, each with `gpus` GPUs of `resource`."""

    prefix: str
    count: int
    gpus: int
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    resource: str = "nvidia.com/gpu"

    def manifests(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.count):
            name = f"{self.prefix}-{i}"
            capacity = {"cpu": "192", "memory": "2Ti", "pods": "110",
                        "ephemeral-storage": "4Ti", self.resource: str(self.gpus)}
            out.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {KWOK_ANNOTATION: "fake"},
                             "labels": {"kubernetes.io/hostname": name,
                                        "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64", "type": "kwok",
                                        **self.labels}},
                "spec": {"taints": [dict(t) for t in self.taints]},
                "status": {"allocatable": capacity, "capacity": capacity,
                           "nodeInfo": {"kubeletVersion": "fake", "architecture": "amd64",
                                        "operatingSystem": "linux"}},
            })
        return out


# The example pool's GPUs (examples/operator/hardwarepool.yaml): two 8-GPU H100 nodes and two
# 4-GPU L40S nodes, labelled and tainted as NVIDIA's GPU operator does.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
DEFAULT_NODES = (
    NodeGroup("h100", 2, 8, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, (GPU_TAINT,)),
    NodeGroup("l40s", 2, 4, {"nvidia.com/gpu.product": "NVIDIA-L40S"},
              (GPU_TAINT, {"key": "pool", "value": "inference", "effect": "NoSchedule"})),
)


class ClusterError(RuntimeError):
    pass


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class LocalCluster:
    """Start with `start()` (or as a context manager); `stop()` ends it all.

    admin_kubeconfig: a kubeconfig with cluster-admin rights (system:masters), for the test
    itself and kubectl; `service_account_kubeconfig` gives one with a ServiceAccount's token.
    """

    def __init__(self, bin_dir: Path | None = None, workdir: Path | None = None,
                 nodes: Sequence[NodeGroup] = DEFAULT_NODES, *,
                 die_with_parent: bool = True) -> None:
        found = bin_dir or find_kube_bin()
        if found is None:
            raise ClusterError(f"no Kubernetes binaries in {cache_root()}: {INSTALL_HINT}")
        self.bin = found
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="trilemma-cluster-"))
        self.nodes = tuple(nodes)
        # A test run killed outright (SIGKILL, a CI timeout) runs no teardown: the kernel then
        # ends the control plane with it. `trilemma dev-cluster up --detach` turns this off.
        self.die_with_parent = die_with_parent
        self.processes: list[_Process] = []
        self.etcd_port = free_port()
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.pki = self.workdir / "pki"
        self.admin_kubeconfig = self.workdir / "admin.kubeconfig"
        self.audit_log = self.workdir / "audit.log"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ca = pki.Authority(self.pki)
        serving = ca.issue("apiserver", "kube-apiserver", hosts=(
            "127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        admin = ca.issue("admin", "trilemma-admin", org="system:masters")
        sa = pki.service_account_keys(self.pki)
        self._write_kubeconfig(self.admin_kubeconfig, {"client-certificate": str(admin.cert),
                                                       "client-key": str(admin.key)})
        peer = free_port()
        self._spawn("etcd", [
            "--name=local", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=local=http://127.0.0.1:{peer}",
            # A throwaway store: durability costs seconds of fsync on a busy disk.
            "--unsafe-no-fsync", "--log-level=warn"])
        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.path}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",  # on top of the default set
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cert-dir={self.pki}", "--profiling=false", "--v=0",
            f"--audit-policy-file={self._audit_policy()}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-mode=blocking"])
        self._wait_ready(deadline)
        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.admin_kubeconfig}", "--leader-elect=false",
            "--secure-port=0", f"--service-account-private-key-file={sa.key}",
            f"--root-ca-file={ca.path}", "--use-service-account-credentials=false",
            f"--cluster-cidr={POD_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*", "--concurrent-gc-syncs=10", "--v=0"])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={self.admin_kubeconfig}", "--leader-elect=false", "--secure-port=0",
            "--v=0"])
        self._spawn("kwok", [
            f"--kubeconfig={self.admin_kubeconfig}", "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            # kwok's default stages: nodes Ready with heartbeats; pods bound to a fake node
            # Running and Ready with an IP from the CIDR (so EndpointSlices list them).
            f"--cidr={POD_CIDR}", "--node-ip=127.0.0.1", "--server-address=",
            # Heartbeats as a kubelet sends them, by renewing the node's Lease: without it
            # kwok patches node status too rarely, the node lifecycle controller marks the
            # nodes NotReady after its grace period, and takes every pod out of its Service.
            "--node-lease-duration-seconds=40"])
        if self.nodes:
            self.apply([m for g in self.nodes for m in g.manifests()])
        self._wait_nodes_ready(deadline)
        self._wait_default_service_account(deadline)

    def stop(self) -> None:
        # Everything before etcd: an API server whose etcd is gone hangs in its shutdown.
        for batch in ([p for p in self.processes if p.name != "etcd"],
                      [p for p in self.processes if p.name == "etcd"]):
            for proc in batch:
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGTERM)
            for proc in batch:
                try:
                    proc.popen.wait(10)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait(5)
        self.processes.clear()
        if self._own_workdir and os.environ.get("TRILEMMA_KEEP_CLUSTER") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers for callers -----------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None,
                timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """kubectl against this cluster (admin unless `kubeconfig`); raises ClusterError with
        kubectl's own message when `check` and it fails."""
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
               *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def apply(self, objects: Sequence[dict[str, Any]] | str, *,
              kubeconfig: Path | None = None) -> None:
        text = objects if isinstance(objects, str) else yaml.safe_dump_all(list(objects))
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text,
                     kubeconfig=kubeconfig)

    def get(self, kind: str, name: str | None = None,
            namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if namespace:
            args[1:1] = ["-n", namespace]
        # `kubectl get -o json` prints one object (a List when no name is given).
        found: dict[str, Any] = json.loads(self.kubectl(*args).stdout)
        return found

    def wait_established(self, crd: str, timeout_s: float = 60.0) -> None:
        """Until the CRD is served. (`kubectl wait` fails outright while a new CRD has no
        conditions yet, so this polls.)"""
        def established() -> bool:
            found = self.get("crd", crd)
            return any(c["type"] == "Established" and c["status"] == "True"
                       for c in found.get("status", {}).get("conditions") or [])

        self._poll(time.monotonic() + timeout_s, f"CRD {crd} Established", established)

    def service_account_kubeconfig(self, namespace: str, name: str,
                                   duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name (a bound token from
        the TokenRequest API, as a pod's projected token is)."""
        token = self.kubectl("create", "token", name, "-n", namespace,
                             f"--duration={duration}").stdout.strip()
        path = self.workdir / f"{namespace}-{name}.kubeconfig"
        self._write_kubeconfig(path, {"token": token})
        return path

    def logs(self, name: str, lines: int = 40) -> str:
        proc = next((p for p in self.processes if p.name == name), None)
        if proc is None or not proc.log.exists():
            return ""
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for proc in self.processes:
            if proc.popen.poll() is not None:
                raise ClusterError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                                   f"{self.logs(proc.name)}")

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's events so far: every write to trilemma.dev objects, with the request
        body and the object the server stored (what a status write really left behind), and
        every request a ServiceAccount made (without bodies)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    # -- internals ---------------------------------------------------------------------------

    def _audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "RequestResponse", "verbs": ["create", "patch", "update"],
                 "resources": [{"group": "trilemma.dev"}]},
                # Every request of a ServiceAccount (the operator's; the control plane's own
                # components authenticate as admin): what the benchmark counts.
                {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                {"level": "None"}]}))
        return path

    def _write_kubeconfig(self, path: Path, user: dict[str, str]) -> None:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "local", "user": user}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local"}}]}))
        path.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        handle = log.open("ab")
        popen = subprocess.Popen([str(self.bin / name), *args], stdout=handle,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True,
                                 preexec_fn=_die_with_parent if self.die_with_parent else None)
        handle.close()
        self.processes.append(_Process(name, popen, log))

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _wait_ready(self, deadline: float) -> None:
        context = self._ssl()
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"{self.server}/readyz", context=context, timeout=5) as resp:
                if resp.status == 200:
                    return
            time.sleep(0.3)
        raise ClusterError(f"kube-apiserver not ready:\n{self.logs('kube-apiserver')}")

    def _poll(self, deadline: float, what: str, check: Callable[[], bool]) -> None:
        while True:
            self.check_alive()
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def _wait_nodes_ready(self, deadline: float) -> None:
        want = sum(g.count for g in self.nodes)

        def ready() -> bool:
            items = self.get("nodes")["items"]
            return sum(1 for n in items for c in (n.get("status") or {}).get("conditions") or []
                       if c["type"] == "Ready" and c["status"] == "True") >= want

        self._poll(deadline, f"{want} kwok nodes Ready", ready)

    def _wait_default_service_account(self, deadline: float) -> None:
        # Pods are refused until the ServiceAccount controller made `default` in a namespace.
        def made() -> bool:
            done = self.kubectl("get", "serviceaccount", "default", "-n", "default",
                                check=False)
            return done.returncode == 0

        self._poll(deadline, "the default ServiceAccount", made)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it exits (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ClusterApi:
    """A real cluster seen through the calls the demo makes of the emulator's `Api`: sync
    reads (get, list) over HTTPS with the admin certificate, cheap enough to poll from the
    event loop, and async writes (create, merge-patch) through kubectl in a thread."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self._context = cluster._ssl()

    def _url(self, api_version: str, kind: str, namespace: str | None, name: str = "") -> str:
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return (f"{self.cluster.server}{prefix}{scope}/{PLURALS[kind]}"
                + (f"/{name}" if name else ""))

    def _read(self, url: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(url, context=self._context, timeout=10) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> dict[str, Any] | None:
        return self._read(self._url(api_version, kind, namespace, name))

    def list(self, api_version: str, kind: str,
             namespace: str | None = None) -> list[dict[str, Any]]:
        found = self._read(self._url(api_version, kind, namespace)) or {}
        return sorted(found.get("items") or [], key=lambda o: o["metadata"]["name"])

    async def create(self, obj: dict[str, Any]) -> None:
        # The server assigns uid and generation; an emulator's caller may have set them.
        meta = {k: v for k, v in obj["metadata"].items() if k not in ("uid", "generation")}
        await asyncio.to_thread(self.cluster.kubectl, "create", "-f", "-",
                                input=json.dumps({**obj, "metadata": meta}))

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
                    patch: dict[str, Any]) -> None:
        args = ["patch", f"{PLURALS[kind]}.{api_version.split('/')[0]}"
                if "/" in api_version else PLURALS[kind], name, "--type=merge",
                "-p", json.dumps(patch)]
        if namespace:
            args += ["-n", namespace]
        await asyncio.to_thread(self.cluster.kubectl, *args)
