"""The real Kopf operator in this event loop, against whatever API server $KUBECONFIG names.

What `trilemma demo` (on KMock or on a real control plane), tests/operator and the operator
benchmark run. Needs no KMock: the demo on a real control plane runs without the extra.
"""

from __future__ import annotations

import asyncio
import contextlib

import kopf

from trilemma.operator import handlers
from trilemma.operator.endpoint import OperatorConfig, Runtime
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import Planner

# Where planning caches configMap models' config.json files (content-addressed, so shared).
CACHE_DIR = "/tmp/trilemma-tests"


class Operator:
    """One operator running in this event loop: start/stop it (restarts included) and inspect
    its runtime.

    Its handlers go into a fresh registry each start, so several can run in one process.
    $KUBECONFIG must name the API server before `start` (Kopf logs in from it), and
    $TRILEMMA_RESYNC_SECONDS, read as the handlers are registered, sets the timer's period.
    planner: None runs the real search; tests pass a fake one.
    config: None: `concurrency` plans at once, no operator-wide Prometheus URL.
    """

    def __init__(self, planner: Planner | None = None, concurrency: int = 2, *,
                 config: OperatorConfig | None = None) -> None:
        self.planner = planner
        self.concurrency = concurrency
        self.config = config or OperatorConfig(max_concurrent_optimizations=concurrency,
                                               cache_dir=CACHE_DIR)
        self.metrics = OperatorMetrics()
        self.runtime: Runtime | None = None  # set by `start`
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        registry = kopf.OperatorRegistry()
        handlers.register(registry)
        self.runtime = handlers.build_runtime(self.config, planner=self.planner,
                                              metrics=self.metrics)
        self._stop, ready = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(kopf.operator(
            registry=registry, clusterwide=True, standalone=True,
            memo=kopf.Memo(runtime=self.runtime), stop_flag=self._stop, ready_flag=ready))
        await asyncio.wait_for(ready.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task is None:
            return
        assert self._stop is not None and self.runtime is not None
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 15)
        await self.runtime.kube.close()
        self._task = None
