"""The real Kopf operator in this event loop, against whatever API server $KUBECONFIG names.

What `trilemma demo` (on KMock or on a real control plane), tests/operator and the operator
benchmark run. Needs no KMock: the demo on a real control plane runs without the extra.
"""

from __future__ import annotations

import asyncio
import contextlib

import kopf

# Kopf exports no name for the per-object memories that kopf.spawn_tasks(memories=...) takes;
# `stop` reads the daemons in them (tests and the demo only: the image runs `kopf run`).
from kopf._core.reactor.inventory import ResourceMemories

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
        self._roots: list[asyncio.Task[None]] = []
        # Tasks Kopf neither waits for nor cancels when it exits (see `stop`).
        self._ignored: set[asyncio.Task[object]] = set()
        self._memories = ResourceMemories()

    async def start(self, timeout_s: float = 10.0) -> None:
        registry = kopf.OperatorRegistry()
        handlers.register(registry)
        self.runtime = handlers.build_runtime(self.config, planner=self.planner,
                                              metrics=self.metrics)
        self._stop, ready = asyncio.Event(), asyncio.Event()
        # kopf.operator() is spawn_tasks + run_tasks (in one task: spawn_tasks sets Kopf's
        # context variables); done here so that `stop` can add to the tasks Kopf ignores at
        # exit (Kopf's own list is frozen at its start) and see its root tasks end.
        self._ignored = set(asyncio.all_tasks())
        self._memories = ResourceMemories()
        self._task = asyncio.create_task(self._run(registry, kopf.Memo(runtime=self.runtime),
                                                   ready))
        await asyncio.wait_for(ready.wait(), timeout_s)

    async def _run(self, registry: kopf.OperatorRegistry, memo: kopf.Memo,
                   ready: asyncio.Event) -> None:
        self._roots = list(await kopf.spawn_tasks(
            registry=registry, clusterwide=True, standalone=True, memories=self._memories,
            memo=memo, stop_flag=self._stop, ready_flag=ready))
        await kopf.run_tasks(self._roots, ignored=self._ignored)

    async def stop(self) -> None:
        if self._task is None:
            return
        assert self._stop is not None and self.runtime is not None
        # Once its root tasks end, Kopf waits (a fixed 5 s) for every task that appeared in the
        # loop since it started, then cancels them: that would be this very task, which waits
        # for Kopf. Not the operator's, so not Kopf's to wait for.
        current = asyncio.current_task()
        if current is not None:
            self._ignored.add(current)
        self._stop.set()
        if self._roots:  # empty if Kopf failed before it spawned them
            await asyncio.wait(self._roots, timeout=15)
        self._stop_late_daemons()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 15)
        await self.runtime.kube.close()
        self._task = None

    def _stop_late_daemons(self) -> None:
        """Stop the timers spawned after Kopf's daemon killer ended.

        Kopf stops its root tasks together: the daemon killer stops the timers it knows, while
        the workers still drain the events already queued, and processing one spawns its
        object's timer again (Kopf guards against this when pausing, not when exiting). Nothing
        would stop that timer but Kopf's 5 s wait for hung tasks; stop it as the killer would.
        """
        for memory in list(self._memories.iter_all_daemon_memories()):
            for daemon in list(memory.running_daemons.values()):
                daemon.stopper.set(reason=kopf.DaemonStoppingReason.OPERATOR_EXITING)
