"""Fixtures of the cluster suite: one real control plane for the session (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, kwok with fake GPU nodes), the CRDs and
the chart's RBAC installed, and the operator running as its ServiceAccount.

Without the binaries (`bash .ci/install-kube`) the suite skips; in CI (TRILEMMA_REQUIRE_TOOLS=1)
it fails instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.kube_helpers import OPERATOR_ENV
from tests.support.cluster import OperatorProcess, install_operator
from tests.tools import require_tool
from trilemma.simfleet.cluster import INSTALL_HINT, LocalCluster, find_kube_bin

_names = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    if find_kube_bin() is None:
        message = f"no Kubernetes control-plane binaries: {INSTALL_HINT}"
        if os.environ.get("TRILEMMA_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with LocalCluster() as c:
        yield c


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster: LocalCluster) -> Path:
    return install_operator(cluster, require_tool("helm"))


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, operator_kubeconfig: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator the scenarios share; a test may stop and start it again (a restart)."""
    proc = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator"),
                           env=OPERATOR_ENV).start()
    yield proc
    proc.stop()
    print("operator log (tail):\n" + proc.tail(30))


@pytest.fixture
def namespace(cluster: LocalCluster, operator_kubeconfig: Path) -> Iterator[str]:
    """A fresh namespace whose pods must meet the Pod Security `baseline` level (with the CRDs
    and the operator's RBAC installed)."""
    name = f"t{next(_names)}-{os.getpid() % 10000}"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}])
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every cluster test is a scenario test (seconds each, asynchronous work, deadlines): slow,
    so `.ci/stress-slow` runs them under load too."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.slow)
