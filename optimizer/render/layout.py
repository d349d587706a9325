"""ServingConfig -> RenderPlan: which pods a plan deploys and what each one runs (`layout`).

The first step of rendering, and the only one that reads the catalogs; the command line and
the manifests (text.py, workloads.py) are pure functions of the RenderPlan it returns.
"""

from __future__ import annotations

import dataclasses
from typing import NotRequired, TypedDict

from trilemma.optimizer import catalog
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import releases
from trilemma.optimizer.render import choices, sglang_flags, vllm_flags
from trilemma.optimizer.render.ir import (
    Arg,
    RenderedWorker,
    RenderPlan,
    Role,
    Scheduling,
    Source,
)
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig
from trilemma.optimizer.spec import hardware

# Images the renderer uses when the caller names none: the engine releases the performance
# model was calibrated on (perf/releases.py), so a deployment runs what its plan priced.
DEFAULT_IMAGES = {eng: releases.calibrated_image(eng) for eng in Engine}
_FLAGS = {Engine.VLLM: vllm_flags, Engine.SGLANG: sglang_flags}


def parse_engine(engine: str) -> Engine:
    try:
        return Engine(engine)
    except ValueError:
        valid = ", ".join(e.value for e in Engine)
        raise InputError("engine", engine, f"unknown engine; one of {valid}") from None


def _model(config: ServingConfig, options: choices.RenderOptions) -> catalog.ModelArch:
    if config.model.endswith(".json") and options.served_model is None:
        # A config.json is enough to plan with, not to serve: engines load a checkpoint (a Hub
        # id or a directory in the pod), and this path lives on the planning machine.
        raise InputError("model", config.model,
                         "a config.json path cannot be deployed; set the model to the "
                         "checkpoint's Hugging Face id or its directory inside the pod")
    return catalog.load_model(config.model)


def _worker(config: ServingConfig, engine: Engine, worker: WorkerConfig, role: Role,
            replicas: int, options: choices.RenderOptions) -> RenderedWorker:
    flags = _FLAGS[engine]
    model = _model(config, options)
    args = flags.worker_args(options.served_model or config.model, model, worker, role, options)
    nodes = choices.nodes_per_replica(worker, options)
    leader: tuple[Arg, ...] = ()
    follower: tuple[Arg, ...] = ()
    if nodes > 1:
        if engine is Engine.VLLM and worker.dp > 1:
            raise InputError(
                "dp", worker.dp,
                "a vLLM replica with data parallel ranks over several nodes needs per-node "
                "--data-parallel-start-rank wiring that is not rendered; keep dp*tp*pp "
                "within one node or use SGLang")
        leader, follower = flags.multinode_args(nodes)
    return RenderedWorker(role=role, command=flags.COMMAND, args=tuple(args),
                          replicas=replicas, gpus_per_pod=worker.gpus // nodes, nodes=nodes,
                          leader_args=leader, follower_args=follower)


def _router(name: str, engine: Engine, options: choices.RenderOptions) -> RenderedWorker:
    """The request router in front of prefill and decode pools (disaggregated only).

    SGLang ships one (sglang_router). vLLM's own proxy is a test script, so a vLLM plan needs
    the caller's router (llm-d's scheduler, production-stack router, ...) named explicitly.
    """
    if options.router_command is not None:
        return RenderedWorker(role=Role.ROUTER, command=options.router_command, args=())
    if engine is not Engine.SGLANG:
        raise InputError("router", None,
                         "vLLM has no production prefill/decode router to default to; pass "
                         "one (trilemma render --router-command '...', e.g. the llm-d "
                         "inference scheduler) or render with --engine sglang")
    port = options.port
    command = sglang_flags.router_command(f"http://{name}-prefill:{port}",
                                          f"http://{name}-decode:{port}", port)
    return RenderedWorker(role=Role.ROUTER, command=command, args=())


def _workers(config: ServingConfig, engine: Engine, name: str,
             options: choices.RenderOptions) -> tuple[RenderedWorker, ...]:
    if config.mixed:
        return _mixed(config, engine, options)
    if config.mode is Mode.AGGREGATED:
        return (_worker(config, engine, config.worker, Role.SERVER, config.replicas, options),)
    if config.prefill is None or config.prefill_replicas < 1:
        raise InputError("prefill", None, "a disaggregated plan needs a prefill worker")
    return (
        _prefill(config, engine, options),
        _worker(config, engine, config.worker, Role.DECODE, config.replicas, options),
        _router(name, engine, options),
    )


def _type_options(options: choices.RenderOptions, gpu: str) -> choices.RenderOptions:
    """`options` with the pool group of the GPU type `gpu` (None when none is given)."""
    groups = {g.gpu: g for g in (*options.pool_groups,
                                 *([options.pool_group] if options.pool_group else []))}
    return dataclasses.replace(options, pool_group=groups.get(catalog.get_gpu(gpu).key))


def _prefill(config: ServingConfig, engine: Engine,
             options: choices.RenderOptions) -> RenderedWorker:
    """The prefill workers; on another GPU type than decode (search/crossing.py), placed on
    that type's nodes. The KV connector flags are the same either way: NIXL and Mooncake
    move the KV over the network between any two nodes."""
    assert config.prefill is not None
    if config.prefill.gpu == config.worker.gpu:
        return _worker(config, engine, config.prefill, Role.PREFILL, config.prefill_replicas,
                       options)
    opts = _type_options(options, config.prefill.gpu)
    one = dataclasses.replace(config, worker=config.prefill)
    worker = _worker(config, engine, config.prefill, Role.PREFILL, config.prefill_replicas,
                     opts)
    return dataclasses.replace(worker, scheduling=Scheduling(**_scheduling(one, opts)))


def _mixed(config: ServingConfig, engine: Engine,
           options: choices.RenderOptions) -> tuple[RenderedWorker, ...]:
    """One server workload per GPU type, each placed on its own type's nodes (its pool
    group's node size, resource name, nodeSelector and tolerations)."""
    out = []
    for i, part in enumerate(config.parts()):
        opts = _type_options(options, part.worker.gpu)
        one = dataclasses.replace(config, worker=part.worker, replicas=part.replicas, mixed=())
        worker = _worker(one, engine, part.worker, Role.SERVER, part.replicas, opts)
        out.append(dataclasses.replace(worker, part=f"p{i}",
                                       scheduling=Scheduling(**_scheduling(one, opts))))
    return tuple(out)


class _Scheduling(TypedDict):
    """Where the pods go: RenderPlan's scheduling fields."""

    gpu_resource: str
    node_selector: NotRequired[tuple[tuple[str, str], ...]]
    tolerations: NotRequired[tuple[tuple[tuple[str, object], ...], ...]]


def _scheduling(config: ServingConfig, options: choices.RenderOptions) -> _Scheduling:
    group = options.pool_group
    if group is None:
        vendor = catalog.get_gpu(config.worker.gpu).vendor
        if vendor not in hardware.DEFAULT_RESOURCE_NAMES:
            raise InputError("gpu", config.worker.gpu, f"no GPU resource name for {vendor}")
        return {"gpu_resource": hardware.DEFAULT_RESOURCE_NAMES[vendor]}
    if group.gpu != catalog.get_gpu(config.worker.gpu).key:
        raise InputError("pool_group", group.gpu,
                         f"the plan runs on {config.worker.gpu}, not on this pool group's GPU")
    tolerations = tuple(
        tuple((k, v) for k, v in t.model_dump(by_alias=True, exclude_none=True,
                                              mode="json").items())
        for t in group.tolerations)
    return {"gpu_resource": group.effective_resource_name,
            "node_selector": tuple(sorted(group.node_selector.items())),
            "tolerations": tolerations}


def served(config: ServingConfig, options: choices.RenderOptions) -> ServingConfig:
    """The configuration as deployed: the served model in place of the planned one, so the
    hash that names the Deployments follows what runs, not where the plan read its config."""
    if options.served_model is None:
        return config
    return dataclasses.replace(config, model=options.served_model)


def layout(config: ServingConfig, engine: str, *, name: str, namespace: str = "default",
           image: str | None = None, options: choices.RenderOptions | None = None,
           hf_token_secret: str | None = None, model_cache_pvc: str | None = None) -> RenderPlan:
    """Resolve every choice of a deployment of `config`; InputError when none is possible."""
    options = options or choices.RenderOptions()
    eng = parse_engine(engine)
    return RenderPlan(
        config=config, engine=eng, name=name, namespace=namespace,
        image=image or DEFAULT_IMAGES[eng],
        image_source=Source.USER_OVERRIDE if image else Source.RENDERER,
        config_hash=served(config, options).layout_hash(),
        workers=_workers(config, eng, name, options),
        port=options.port, hf_token_secret=hf_token_secret, model_cache_pvc=model_cache_pvc,
        **_scheduling(config, options),
    )
