"""vLLM: a worker of the plan -> `vllm serve MODEL` flags, each with its provenance.

Flag names are those of vLLM's EngineArgs (vllm/engine/arg_utils.py, generated from the
config dataclasses in vllm/config/: ParallelConfig, CacheConfig, SchedulerConfig,
SpeculativeConfig, KVTransferConfig). JSON-valued flags (--speculative-config,
--kv-transfer-config) are rendered with sorted keys so the same plan gives the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from trilemma.optimizer import catalog
from trilemma.optimizer.catalog import SpecMethod
from trilemma.optimizer.render import choices, drain
from trilemma.optimizer.render.ir import Arg, Role, Source
from trilemma.optimizer.search.configs import WorkerConfig

COMMAND = ("vllm", "serve")
NGRAM_LOOKUP_MAX = 4  # longest n-gram matched in the prompt; vLLM docs' example value

# vLLM's SpeculativeConfig.method names (vllm/config/speculative.py); "mtp" is the generic
# multi-token-prediction method the MTP docs use for DeepSeek-V3-style nextn layers.
_SPEC_METHODS = {
    SpecMethod.NGRAM: "ngram",
    SpecMethod.DRAFT: "draft_model",
    SpecMethod.EAGLE: "eagle",
    SpecMethod.EAGLE3: "eagle3",
    SpecMethod.MTP: "mtp",
}

# Disaggregated serving through NixlConnector (docs/features/nixl_connector_usage.md): both
# pools run the connector as kv_both (NIXL treats the role as a placeholder); the router in
# front decides which pool prefills and which decodes each request.
_KV_ROLES = {Role.PREFILL: "kv_both", Role.DECODE: "kv_both"}


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def parallel_args(worker: WorkerConfig) -> list[Arg]:
    args = [Arg(flag="--tensor-parallel-size", value=str(worker.tp), source=Source.PLAN)]
    args.append(Arg(flag="--pipeline-parallel-size", value=str(worker.pp), source=(
        Source.PLAN if worker.pp > 1 else Source.ENGINE_DEFAULT), emit=worker.pp > 1))
    args.append(Arg(flag="--data-parallel-size", value=str(worker.dp), source=(
        Source.PLAN if worker.dp > 1 else Source.ENGINE_DEFAULT), emit=worker.dp > 1))
    args.append(Arg(flag="--enable-expert-parallel", source=(
        Source.PLAN if worker.ep else Source.ENGINE_DEFAULT), emit=worker.ep))
    # vLLM v0.24.0 vllm/engine/arg_utils.py (ParallelConfig.decode_context_parallel_size):
    # shards the KV cache over cp of the TP ranks; the world size stays tp*pp.
    cp = worker.cp > 1
    args.append(Arg(flag="--decode-context-parallel-size", value=str(worker.cp),
                    source=Source.PLAN if cp else Source.ENGINE_DEFAULT, emit=cp,
                    note="KV cache sharded over TP ranks" if cp else ""))
    return args


def memory_args(model: catalog.ModelArch, worker: WorkerConfig) -> list[Arg]:
    args = [choices.quantization_arg(model, worker)]
    fp8_kv = worker.kv_dtype is catalog.KvDtype.FP8
    args.append(Arg(flag="--kv-cache-dtype", value="fp8", source=Source.PLAN) if fp8_kv else
                Arg(flag="--kv-cache-dtype", source=Source.ENGINE_DEFAULT, emit=False))
    args.append(Arg(flag="--gpu-memory-utilization",
                    value=f"{worker.gpu_memory_utilization:g}", source=Source.PLAN))
    return args


def scheduler_args(worker: WorkerConfig, options: choices.RenderOptions) -> list[Arg]:
    args = [
        Arg(flag="--max-num-seqs", value=str(worker.max_num_seqs), source=Source.PLAN),
        Arg(flag="--max-num-batched-tokens", value=str(worker.max_num_batched_tokens),
            source=Source.PLAN),
        Arg(flag="--enable-prefix-caching" if worker.prefix_caching
            else "--no-enable-prefix-caching", source=Source.PLAN),
    ]
    if options.max_model_len is None and worker.max_model_len is not None:
        args.append(Arg(flag="--max-model-len", value=str(worker.max_model_len),
                        source=Source.PLAN))
    elif options.max_model_len is not None:
        args.append(Arg(flag="--max-model-len", value=str(options.max_model_len),
                        source=Source.USER_OVERRIDE))
    else:
        args.append(Arg(flag="--max-model-len", source=Source.ENGINE_DEFAULT, emit=False,
                        note="the model's max_position_embeddings"))
    return args


def speculative_arg(spec: choices.Speculation | None) -> Arg:
    if spec is None:
        return Arg(flag="--speculative-config", source=Source.ENGINE_DEFAULT, emit=False)
    body: dict[str, Any] = {"method": _SPEC_METHODS[spec.method],
                            "num_speculative_tokens": spec.k}
    if spec.head is not None:
        body["model"] = spec.head
    if spec.method is SpecMethod.NGRAM:
        body["prompt_lookup_max"] = NGRAM_LOOKUP_MAX
    source = Source.USER_OVERRIDE if spec.head_overridden else Source.PLAN
    note = "" if spec.head is None or spec.head_overridden else "head from data/draft_heads.yaml"
    return Arg(flag="--speculative-config", value=_json(body), source=source, note=note)


def kv_transfer_arg(role: Role) -> Arg:
    if role not in _KV_ROLES:
        return Arg(flag="--kv-transfer-config", source=Source.ENGINE_DEFAULT, emit=False)
    body = {"kv_connector": "NixlConnector", "kv_role": _KV_ROLES[role]}
    return Arg(flag="--kv-transfer-config", value=_json(body), source=Source.RENDERER,
               note="NixlConnector recipe for disaggregated prefill/decode")


def worker_args(model_id: str, model: catalog.ModelArch, worker: WorkerConfig, role: Role,
                options: choices.RenderOptions) -> list[Arg]:
    """Every flag of one `vllm serve` process, model first (a positional argument)."""
    choices.require_moe_for_ep(model, worker)
    choices.require_context_parallel(model, worker, catalog.Engine.VLLM)
    spec = choices.speculation(model, worker, options)
    return [
        Arg(flag="model", value=model_id, source=Source.PLAN, positional=True),
        *parallel_args(worker),
        *memory_args(model, worker),
        *scheduler_args(worker, options),
        speculative_arg(spec),
        kv_transfer_arg(role),
        Arg(flag="--port", value=str(options.port), source=Source.RENDERER),
        shutdown_arg(options),
    ]


def shutdown_arg(options: choices.RenderOptions) -> Arg:
    """--shutdown-timeout (vLLM >= 0.18, vllm-project/vllm#36666): on SIGTERM refuse new
    requests and let those in flight finish for up to that long. The preStop drain (drain.py)
    normally leaves nothing in flight by then; this covers a preStop that failed early (the
    kubelet then sends SIGTERM at once), within the same grace period."""
    budget = drain.plan_drain(options.e2e_p99_ms).budget_s
    return Arg(flag="--shutdown-timeout", value=str(budget), source=Source.RENDERER,
               note="drain in flight on SIGTERM too (drain.py)")


def multinode_args(nodes: int) -> tuple[tuple[Arg, ...], tuple[Arg, ...]]:
    """Leader and follower flags for one replica over `nodes` LeaderWorkerSet pods.

    vLLM's multiprocessing backend spans nodes without Ray: every node runs `vllm serve` with
    --nnodes/--node-rank/--master-addr, the others --headless (ParallelConfig.nnodes,
    node_rank, master_addr). LeaderWorkerSet injects LWS_LEADER_ADDRESS and LWS_WORKER_INDEX
    into each pod; Kubernetes expands $(VAR) in args from the container's environment.
    """
    common = (Arg(flag="--nnodes", value=str(nodes), source=Source.CATALOG,
                  note="GPUs per replica / GPUs per node"),
              Arg(flag="--master-addr", value="$(LWS_LEADER_ADDRESS)", source=Source.RENDERER))
    leader = (*common, Arg(flag="--node-rank", value="0", source=Source.RENDERER))
    follower = (*common,
                Arg(flag="--node-rank", value="$(LWS_WORKER_INDEX)", source=Source.RENDERER),
                Arg(flag="--headless", source=Source.RENDERER))
    return leader, follower
