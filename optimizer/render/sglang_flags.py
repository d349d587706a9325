"""SGLang: a worker of the plan -> `python -m sglang.launch_server` flags, with provenance.

Flag names are those of SGLang's ServerArgs (python/sglang/srt/server_args.py; the "Server
Arguments" docs page lists them). Where SGLang's model of a setting differs from the plan's,
the mapping is spelled out next to it.
"""

from __future__ import annotations

from trilemma.optimizer import catalog
from trilemma.optimizer.catalog import SpecMethod, gpus
from trilemma.optimizer.perf import deepep
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.render import choices
from trilemma.optimizer.render.ir import Arg, Role, Source
from trilemma.optimizer.search.configs import WorkerConfig

COMMAND = ("python3", "-m", "sglang.launch_server")
DIST_INIT_PORT = 20000      # torch.distributed rendezvous on the leader of a multi-node replica
BOOTSTRAP_PORT = 8998       # --disaggregation-bootstrap-port default, on prefill servers

_SPEC_ALGORITHMS = {
    SpecMethod.NGRAM: "NGRAM",
    SpecMethod.DRAFT: "STANDALONE",
    SpecMethod.EAGLE: "EAGLE",
    SpecMethod.EAGLE3: "EAGLE3",
    SpecMethod.MTP: "NEXTN",  # DeepSeek-style nextn layers, loaded from the target checkpoint
}


def parallel_args(model: catalog.ModelArch, worker: WorkerConfig) -> list[Arg]:
    """SGLang's --tp-size is the whole attention+FFN group; DP attention splits it.

    The plan's dp counts attention replicas of a tp-way group, tp*dp GPUs per stage. SGLang
    expresses that as --tp-size tp*dp --dp-size dp --enable-dp-attention (attention TP =
    tp-size / dp-size), and expert parallel as --ep-size equal to --tp-size. Under DP and EP
    the models SGLang wires to DeepEP run their MoE over it, as the plan priced them
    (perf/deepep.py).
    """
    group = worker.tp * worker.dp
    args = [Arg(flag="--tp-size", value=str(group), source=Source.PLAN,
                note="tp*dp: SGLang's TP group spans the DP-attention ranks")]
    args.append(Arg(flag="--pp-size", value=str(worker.pp), source=(
        Source.PLAN if worker.pp > 1 else Source.ENGINE_DEFAULT), emit=worker.pp > 1))
    dp = worker.dp > 1
    args.append(Arg(flag="--dp-size", value=str(worker.dp),
                    source=Source.PLAN if dp else Source.ENGINE_DEFAULT, emit=dp))
    args.append(Arg(flag="--enable-dp-attention",
                    source=Source.PLAN if dp else Source.ENGINE_DEFAULT, emit=dp))
    args.append(Arg(flag="--ep-size", value=str(group),
                    source=Source.PLAN if worker.ep else Source.ENGINE_DEFAULT, emit=worker.ep))
    facts = engine_facts(catalog.Engine.SGLANG)
    a2a = deepep.runs(model, gpus.get_gpu(worker.gpu), facts, worker.dp, worker.ep)
    args.append(Arg(flag="--moe-a2a-backend", value="deepep" if a2a else "none",
                    source=Source.PLAN if a2a else Source.ENGINE_DEFAULT, emit=a2a,
                    note="DeepEP all-to-all under DP attention" if a2a else ""))
    return args


def memory_args(model: catalog.ModelArch, worker: WorkerConfig) -> list[Arg]:
    args = [choices.quantization_arg(model, worker)]
    fp8_kv = worker.kv_dtype is catalog.KvDtype.FP8
    args.append(Arg(flag="--kv-cache-dtype", value="fp8_e4m3", source=Source.PLAN) if fp8_kv
                else Arg(flag="--kv-cache-dtype", source=Source.ENGINE_DEFAULT, emit=False))
    # Both are the share of GPU memory for weights plus KV cache; SGLang's excludes
    # activations, so the same number is slightly more conservative there.
    args.append(Arg(flag="--mem-fraction-static", value=f"{worker.gpu_memory_utilization:g}",
                    source=Source.PLAN, note="plan's gpu_memory_utilization"))
    return args


def scheduler_args(worker: WorkerConfig, options: choices.RenderOptions) -> list[Arg]:
    args = [
        Arg(flag="--max-running-requests", value=str(worker.max_num_seqs), source=Source.PLAN,
            note="plan's max_num_seqs"),
        Arg(flag="--chunked-prefill-size", value=str(worker.max_num_batched_tokens),
            source=Source.PLAN, note="plan's max_num_batched_tokens"),
        Arg(flag="--disable-radix-cache", source=Source.PLAN if not worker.prefix_caching
            else Source.ENGINE_DEFAULT, emit=not worker.prefix_caching),
    ]
    if options.max_model_len is None and worker.max_model_len is not None:
        args.append(Arg(flag="--context-length", value=str(worker.max_model_len),
                        source=Source.PLAN))
    elif options.max_model_len is not None:
        args.append(Arg(flag="--context-length", value=str(options.max_model_len),
                        source=Source.USER_OVERRIDE))
    else:
        args.append(Arg(flag="--context-length", source=Source.ENGINE_DEFAULT, emit=False))
    return args


def speculative_args(spec: choices.Speculation | None) -> list[Arg]:
    if spec is None:
        return [Arg(flag="--speculative-algorithm", source=Source.ENGINE_DEFAULT, emit=False)]
    args = [Arg(flag="--speculative-algorithm", value=_SPEC_ALGORITHMS[spec.method],
                source=Source.PLAN)]
    if spec.head is not None:
        args.append(Arg(flag="--speculative-draft-model-path", value=spec.head,
                        source=Source.USER_OVERRIDE if spec.head_overridden else Source.PLAN))
    if spec.method is SpecMethod.NGRAM:
        args.append(Arg(flag="--speculative-num-draft-tokens", value=str(spec.k),
                        source=Source.PLAN))
        return args
    # A chain of k draft steps: one candidate per step (topk 1), k drafts + the bonus token
    # verified together. Tree drafting (topk > 1) is not something the plan models.
    args += [
        Arg(flag="--speculative-num-steps", value=str(spec.k), source=Source.PLAN),
        Arg(flag="--speculative-eagle-topk", value="1", source=Source.RENDERER,
            note="chain drafting, as the plan's acceptance model assumes"),
        Arg(flag="--speculative-num-draft-tokens", value=str(spec.k + 1), source=Source.PLAN),
    ]
    return args


def disaggregation_args(role: Role) -> list[Arg]:
    if role is Role.PREFILL:
        return [Arg(flag="--disaggregation-mode", value="prefill", source=Source.PLAN),
                Arg(flag="--disaggregation-bootstrap-port", value=str(BOOTSTRAP_PORT),
                    source=Source.RENDERER)]
    if role is Role.DECODE:
        return [Arg(flag="--disaggregation-mode", value="decode", source=Source.PLAN)]
    return [Arg(flag="--disaggregation-mode", source=Source.ENGINE_DEFAULT, emit=False)]


def worker_args(model_id: str, model: catalog.ModelArch, worker: WorkerConfig, role: Role,
                options: choices.RenderOptions) -> list[Arg]:
    """Every flag of one `sglang.launch_server` process."""
    choices.require_moe_for_ep(model, worker)
    # SGLang v0.5.9's --attn-cp-size serves DeepSeek sparse-attention prefill only
    # (perf/context_parallel.py): a plan's decode KV shard has no SGLang flag, so it is refused.
    choices.require_context_parallel(model, worker, catalog.Engine.SGLANG)
    spec = choices.speculation(model, worker, options)
    return [
        Arg(flag="--model-path", value=model_id, source=Source.PLAN),
        *parallel_args(model, worker),
        *memory_args(model, worker),
        *scheduler_args(worker, options),
        *speculative_args(spec),
        *disaggregation_args(role),
        # SGLang listens on 127.0.0.1 by default: a pod must listen on all interfaces.
        Arg(flag="--host", value="0.0.0.0", source=Source.RENDERER),
        Arg(flag="--port", value=str(options.port), source=Source.RENDERER),
        # SGLang serves no /metrics unless asked; the operator's traffic checks, the dashboard
        # and the Gateway's endpoint picker all read the sglang:* series from it.
        Arg(flag="--enable-metrics", source=Source.RENDERER,
            note="the operator and the endpoint picker read sglang:* metrics"),
    ]


def multinode_args(nodes: int) -> tuple[tuple[Arg, ...], tuple[Arg, ...]]:
    """--dist-init-addr/--nnodes/--node-rank (docs: "run tensor parallelism on multiple nodes").

    LeaderWorkerSet injects LWS_LEADER_ADDRESS and LWS_WORKER_INDEX; Kubernetes expands them.
    """
    common = (Arg(flag="--dist-init-addr", value=f"$(LWS_LEADER_ADDRESS):{DIST_INIT_PORT}",
                  source=Source.RENDERER),
              Arg(flag="--nnodes", value=str(nodes), source=Source.CATALOG,
                  note="GPUs per replica / GPUs per node"))
    leader = (*common, Arg(flag="--node-rank", value="0", source=Source.RENDERER))
    follower = (*common,
                Arg(flag="--node-rank", value="$(LWS_WORKER_INDEX)", source=Source.RENDERER))
    return leader, follower


def router_command(prefill_url: str, decode_url: str, port: int) -> tuple[str, ...]:
    """SGLang's PD router (sglang_router.launch_router --pd-disaggregation).

    The number after the prefill URL is that server's bootstrap port, which the router hands
    to decode servers so they can pull KV from it.
    """
    return ("python3", "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--prefill", prefill_url, str(BOOTSTRAP_PORT), "--decode", decode_url,
            "--host", "0.0.0.0", "--port", str(port))
