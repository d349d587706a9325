"""`trilemma dev-cluster up|down`: a real Kubernetes control plane with fake GPU nodes on this
machine, with the operator's CRDs installed, for people (the tests use the same harness).

    trilemma dev-cluster up              # runs until Ctrl-C, then stops everything
    trilemma dev-cluster up --detach     # returns; `trilemma dev-cluster down` stops it
    export KUBECONFIG=/tmp/trilemma-dev-cluster/admin.kubeconfig

The binaries come from `bash .ci/install-kube` (Go >= 1.24; built once, cached by version).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from trilemma.optimizer.cli import Subcommand
from trilemma.simfleet.cluster import DEFAULT_NODES, ClusterError, LocalCluster

DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "trilemma-dev-cluster"


def install_crds(cluster: LocalCluster) -> None:
    """The CRDs as `trilemma crds` generates them, applied and Established."""
    from trilemma.tools.crdgen import crd_documents

    docs = crd_documents()
    cluster.apply(docs)
    for doc in docs:
        cluster.wait_established(doc["metadata"]["name"])


def _up(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if (folder / "pids.json").exists():
        print(f"trilemma dev-cluster: one is already up in {folder} "
              f"(`trilemma dev-cluster down --dir {folder}` first)", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cluster = LocalCluster(workdir=folder, nodes=DEFAULT_NODES,
                               die_with_parent=not args.detach)
        cluster.start()
        install_crds(cluster)
    except (ClusterError, FileNotFoundError) as err:
        print(f"trilemma dev-cluster: {err}", file=sys.stderr)
        return 2
    (folder / "pids.json").write_text(json.dumps(
        {p.name: p.popen.pid for p in cluster.processes}))
    nodes = ", ".join(f"{g.count}x {g.prefix} ({g.gpus} GPUs)" for g in DEFAULT_NODES)
    print(f"control plane at {cluster.server} (binaries: {cluster.bin}); kwok nodes: {nodes}")
    print(f"export KUBECONFIG={cluster.admin_kubeconfig}")
    if args.detach:
        print(f"stop it with: trilemma dev-cluster down --dir {folder}")
        return 0
    print("Ctrl-C stops it")
    try:
        while True:
            cluster.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except ClusterError as err:
        print(f"trilemma dev-cluster: {err}", file=sys.stderr)
    finally:
        cluster.stop()
        (folder / "pids.json").unlink(missing_ok=True)
    return 0


def _down(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    pids_file = folder / "pids.json"
    if not pids_file.exists():
        print(f"trilemma dev-cluster: nothing is up in {folder}", file=sys.stderr)
        return 1
    pids = json.loads(pids_file.read_text())
    for pid in reversed(list(pids.values())):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pids_file.unlink()
    print(f"stopped {', '.join(pids)}; state left in {folder}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--dir", default=str(DEFAULT_DIR),
                   help="where the cluster keeps its state, certificates, logs and kubeconfig "
                        "(default %(default)s)")
    p.add_argument("--detach", action="store_true",
                   help="with up: return once it is ready, leaving it running")


def run(args: argparse.Namespace) -> int:
    return _up(args) if args.action == "up" else _down(args)


SUBCOMMAND = Subcommand(
    name="dev-cluster",
    help="a real Kubernetes control plane with fake GPU nodes on this machine (kube-apiserver, "
         "controllers, scheduler, kwok; needs `bash .ci/install-kube`)",
    add_arguments=add_arguments, run=run)
