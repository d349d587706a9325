"""Fixtures: the real Kopf operator against KMock's emulated Kubernetes API.

The harness itself (the emulator's resources, the operator runner, the user-side Api) is in
tests/support/kube.py, shared with the operator benchmark.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.kube import (
    Api,
    Emulator,
    Operator,
    declare_resources,
    write_kubeconfig,
)
from trilemma.operator.endpoint import OperatorConfig
from trilemma.operator.optimize import Planner


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """KMock's pytest fixture, serving with our Emulator (it names generateName objects)."""
    return {**kmock_options, "cls": Emulator}


@pytest.fixture
def kube_env(kmock: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    declare_resources(kmock)
    config = tmp_path / "kubeconfig"
    write_kubeconfig(config, str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("TRILEMMA_RESYNC_SECONDS", "0.5")
    return kmock


@pytest.fixture
async def operator_factory(kube_env: Any) -> AsyncIterator[Callable[..., Any]]:
    """make(planner=None, concurrency=2, config=None) -> a started Operator; all stop at
    teardown."""
    started: list[Operator] = []

    async def make(planner: Planner | None = None, concurrency: int = 2,
                   config: OperatorConfig | None = None) -> Operator:
        op = Operator(planner, concurrency, config=config)
        await op.start()
        started.append(op)
        return op

    yield make
    for op in started:
        await op.stop()


@pytest.fixture
def api(kube_env: Any) -> Api:
    return Api(kube_env)
