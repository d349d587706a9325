"""The render IR: what one engine process is started with, and where each value came from.

Sits between the plan (search/configs.py) and the outputs (an engine command line, Kubernetes
manifests). Every argument carries its provenance, so a reviewer can tell a value the search
chose from an engine default left alone, a catalog fact, or an override the user passed.
Plain frozen data: the outputs are pure functions of it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.search.configs import ServingConfig


class Source(enum.Enum):
    """Where a rendered value came from."""

    PLAN = "plan"                    # a field of the ServingConfig the search chose
    ENGINE_DEFAULT = "engine default"  # left out on purpose: the engine's own default applies
    CATALOG = "catalog"              # a fact about the model or GPU (checkpoint format, node size)
    USER_OVERRIDE = "user override"  # passed to the renderer by the caller
    RENDERER = "renderer default"    # a choice the renderer makes (port, serve command, recipe)


class Role(enum.Enum):
    """What a rendered process does in the deployment."""

    SERVER = "server"    # aggregated: prefills and decodes
    PREFILL = "prefill"
    DECODE = "decode"
    ROUTER = "router"    # fronts prefill and decode pools (disaggregated only)


@dataclass(frozen=True, kw_only=True)
class Arg:
    """One engine flag. `value` None means a bare switch; `emit` False records an engine default."""

    flag: str
    value: str | None = None
    source: Source
    note: str = ""
    emit: bool = True
    positional: bool = False  # rendered as the value alone (vLLM's MODEL); flag names it

    def tokens(self) -> tuple[str, ...]:
        if not self.emit:
            return ()
        if self.positional and self.value is not None:
            return (self.value,)
        return (self.flag,) if self.value is None else (self.flag, self.value)


@dataclass(frozen=True, kw_only=True)
class Scheduling:
    """Where a GPU type's pods go: its extended resource, nodeSelector and tolerations."""

    gpu_resource: str = "nvidia.com/gpu"
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[tuple[str, object], ...], ...] = ()


@dataclass(frozen=True, kw_only=True)
class RenderedWorker:
    """One kind of pod: the process it runs and the hardware it asks for.

    `args` are the flags shared by every node of a replica; `leader_args` / `follower_args` are
    appended on the first node and on the others when one replica spans several nodes.
    """

    role: Role
    command: tuple[str, ...]
    args: tuple[Arg, ...]
    env: tuple[tuple[str, str], ...] = ()
    replicas: int = 1
    gpus_per_pod: int = 0
    nodes: int = 1                     # pods per replica (LeaderWorkerSet size when > 1)
    leader_args: tuple[Arg, ...] = ()
    follower_args: tuple[Arg, ...] = ()
    serves_http: bool = True           # followers of a multi-node replica serve nothing
    # A mixed plan's replicas on one GPU type (search/mixing.py): "p0", "p1", ... names the
    # workload and its pods; its GPUs' scheduling replaces the plan's. Empty: single type.
    part: str = ""
    scheduling: Scheduling | None = None

    @property
    def provenance(self) -> dict[str, str]:
        """Flag -> source, for every flag rendered or deliberately left at its default."""
        every = (*self.args, *self.leader_args, *self.follower_args)
        return {a.flag: a.source.value for a in every}

    def argv(self, *, follower: bool = False) -> list[str]:
        extra = self.follower_args if follower else self.leader_args
        return [t for a in (*self.args, *extra) for t in a.tokens()]


@dataclass(frozen=True, kw_only=True)
class RenderPlan:
    """Everything a deployment of one ServingConfig needs, before any output format."""

    config: ServingConfig
    engine: Engine
    name: str
    namespace: str
    image: str
    image_source: Source
    config_hash: str
    workers: tuple[RenderedWorker, ...]
    port: int = 8000
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[tuple[str, object], ...], ...] = ()
    hf_token_secret: str | None = None
    model_cache_pvc: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def provenance(self) -> dict[str, dict[str, str]]:
        return {w.role.value: w.provenance for w in self.workers}

    def scheduling(self, worker: RenderedWorker) -> Scheduling:
        """Where `worker`'s pods go: its own GPU type's placement, else the plan's."""
        if worker.scheduling is not None:
            return worker.scheduling
        return Scheduling(gpu_resource=self.gpu_resource, node_selector=self.node_selector,
                          tolerations=self.tolerations)

    def worker(self, role: Role) -> RenderedWorker:
        for w in self.workers:
            if w.role is role:
                return w
        raise KeyError(role.value)
