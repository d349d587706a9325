"""The search space: every configuration the search considers, and the ones it prunes unpriced.

First stage of the search's data flow (space -> screening -> pareto -> confirming ->
explaining). A *group* fixes what needs its own step model (model, GPU, engine, quantization,
KV dtype, speculation); inside a group the layouts (TP, PP, attention DP, EP, decode context
parallel), engine limits
and prefix caching are numpy arrays, so that screening prices a whole group in a few calls.
Serving modes (aggregated or a prefill:decode ratio) and replica counts multiply each row in
screening. Every candidate is counted before pruning, and every pruned one is counted under
the rule that removed it.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from trilemma.optimizer.catalog import gpus, models, quantization, speculation
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.perf import context_parallel, memory, parallelism
from trilemma.optimizer.perf import engine as perf_engine
from trilemma.optimizer.spec.models import ModelChoice
from trilemma.optimizer.spec.plan_request import PlanRequest

# The context limit deployed is the planned p99 request (prompt + output) times this. Below
# the limit a request reaches the engine and its length histograms, where the operator sees the
# workload drift; above it the engine answers HTTP 400 before counting anything. 1.5 sits above
# 1 + the operator's default length-drift threshold (0.3, DriftThresholds): a length shift big
# enough to trigger a re-plan is still served and measured, with margin for the tail moving
# further than the mean. Larger buys little and costs feasibility: the engine must hold one
# sequence of the full limit in its KV cache, so the memory check sizes for the deployed value.
CONTEXT_HEADROOM = 1.5


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """The ladders the search walks, and its budgets. Inert data; defaults say why."""

    # TP stays inside an NVLink domain: 8 GPUs on HGX; TP16 only on an NVL72 rack's trays.
    tp: tuple[int, ...] = (1, 2, 4, 8, 16)
    pp: tuple[int, ...] = (1, 2, 4)               # PP is how a replica spans nodes
    dp: tuple[int, ...] = (1, 2, 4, 8)            # attention DP (MoE models only)
    ep: tuple[bool, ...] = (False, True)
    # Decode context parallel ranks (KV sharded within TP), tried only for long prompts and
    # on engines that run it: perf/context_parallel.py says when and why.
    cp: tuple[int, ...] = (1, 2, 4, 8)
    # Beyond 5 drafts acceptance^k is small; 2 and 4 bracket the optimum for chat-like and
    # edit-like outputs, and each extra k costs a whole group of step-model calls.
    spec_k: tuple[int, ...] = (2, 4)
    max_num_seqs: tuple[int, ...] = (64, 128, 256, 512, 1024)
    max_num_batched_tokens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    # (prefill, decode) workers per unit of a disaggregated deployment.
    pd_ratios: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1))
    # Replicas as multiples of the fewest that carry the design rate; 0 = fill the pool/budget.
    # More replicas than needed trade cost for latency headroom: the front needs both ends.
    replica_factors: tuple[float, ...] = (1.0, 1.5, 2.0, 0.0)
    max_nodes_per_replica: int = 2                # a replica beyond 2 nodes is rarely run
    memory_percentile: float = 99.0               # a replica must hold this long a request
    # Confirming costs ~0.2 ms per simulated request on one core: 10 runs x 1,000 requests
    # keep it near 2 s, a p90 from 1,000 requests is within a few percent.
    simulate_top_k: int = 4                       # best by the objective, confirmed
    simulate_front: int = 6                       # more from the analytic front, confirmed
    simulate_requests: int = 1000                 # requests per confirming simulation
    front_size: int = 24                          # choices returned on the front
    # False keeps rows the space would prune as dominated (max_num_seqs above the KV cache's
    # capacity, prefix caching off): exhaustive reference searches in tests.
    prune_dominated: bool = True
    # False screens every layout fully (the coarse pass prices them but cuts none): the
    # exhaustive reference that `regret` measures the pipeline's pick against.
    coarse_screen: bool = True
    workers: int = 2                              # screening processes; 1 = serial
    explain_sensitivity: bool = True              # re-screen the front's groups at 2x rate/prompt
    # Compose plans spanning GPU types when the pool has several: aggregated replicas on
    # several types (mixing.py), prefill on one type and decode on another (crossing.py).
    mixed: bool = True


PRUNE_REASONS = ("context", "dtype", "checkpoint", "quality", "parallelism", "nodes", "pool",
                 "limits", "memory", "prefix_caching", "dominated", "slo", "budget", "replicas",
                 "duplicate", "coarse")


@dataclass(frozen=True, kw_only=True)
class Group:
    """What one step model prices: everything but the layout and the engine limits."""

    choice: ModelChoice
    arch: ModelArch
    gpu: Gpu
    engine: Engine
    quant: QuantRecipe
    kv: KvDtype
    spec: SpecConfig
    quality: float | None
    price_per_gpu_hour: float
    pool_gpus: int
    gpus_per_node: int
    max_tp: int | None = None          # bounds.maxTensorParallel
    max_pp: int | None = None          # bounds.maxPipelineParallel
    max_model_len: int | None = None   # the deployed context limit; the memory check's length


@dataclass(frozen=True, kw_only=True)
class Rows:
    """A group's surviving (layout x limits x prefix caching) rows, as parallel arrays."""

    group: Group
    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    ep: np.ndarray
    max_num_seqs: np.ndarray
    max_num_batched_tokens: np.ndarray
    prefix_caching: np.ndarray
    cp: np.ndarray                # decode context parallel ranks (1: none)

    def __len__(self) -> int:
        return len(self.tp)


@dataclass(frozen=True, kw_only=True)
class Space:
    rows: list[Rows]
    enumerated: int
    pruned: Counter[str] = field(default_factory=Counter)
    modes: int = 1          # aggregated + pd ratios
    replica_options: int = 1


def spec_configs(request: PlanRequest, arch: ModelArch,
                 settings: SearchSettings) -> tuple[list[SpecConfig], int]:
    """Speculation settings to try, and how many were enumerated (skipped ones included).

    A draft model needs a draft the spec cannot name yet, MTP needs the model's own nextn
    layers, and EAGLE needs a published head for the target: those are counted as enumerated
    but not returned (pruned as "dtype": a format the deployment cannot run).
    """
    methods = request.bounds.speculation or list(SpecMethod)
    out: list[SpecConfig] = []
    counted = 0
    for m in methods:
        if m is SpecMethod.NONE:
            out.append(SpecConfig(method=m, k=0))
            counted += 1
            continue
        counted += len(settings.spec_k)
        if m is SpecMethod.DRAFT or (m is SpecMethod.MTP and arch.nextn_layers == 0):
            continue
        if m in (SpecMethod.EAGLE, SpecMethod.EAGLE3) and not speculation.draft_head(m.value,
                                                                                     arch.id):
            continue  # no published head for this target: nothing to deploy


        out.extend(SpecConfig(method=m, k=k) for k in settings.spec_k)
    return out, counted


def model_len(arch: ModelArch, tokens: float, block: int | None = None) -> int:
    """The context limit to deploy with: `tokens` (the planned longest request) times
    CONTEXT_HEADROOM, rounded up to whole KV blocks (`block`; vLLM's default where None),
    within the model's own window. Engines refuse to start where one sequence of this length
    does not fit the KV cache: the search's memory check sizes for exactly this value."""
    block = block or perf_engine.engine_facts().block_size
    want = int(math.ceil(tokens * CONTEXT_HEADROOM / block) * block)
    window = arch.max_position_embeddings
    return min(want, window) if window else want


def enumerate_space(request: PlanRequest, settings: SearchSettings) -> Space:
    """Every group and its feasible rows, with counts of what was enumerated and pruned."""
    wl = request.workload
    prefix_reuse = wl.expected_cached_tokens() > 0
    seq_len = request.longest_request_tokens(settings.memory_percentile)
    mean_len = (wl.prompt_distribution().mean_tokens()
                + wl.output_distribution().mean_tokens())
    modes = 1 + (len(settings.pd_ratios) if request.bounds.allow_disaggregation else 0)
    reps = len(settings.replica_factors)
    per_row = modes * reps
    cps = context_parallel.ladder(settings.cp, wl.prompt_distribution().mean_tokens())
    layouts = np.array(list(itertools.product(settings.tp, settings.pp, settings.dp,
                                              settings.ep, cps)), dtype=np.int64)
    limits = np.array(list(itertools.product(settings.max_num_seqs,
                                             settings.max_num_batched_tokens, (True, False))),
                      dtype=np.int64)
    grid = len(layouts) * len(limits)
    engines = request.bounds.engines or [Engine.VLLM]
    quants = request.bounds.quantizations or list(QuantRecipe)
    kvs = request.bounds.kv_dtypes or list(KvDtype)
    floor = request.slo.quality_floor
    pruned: Counter[str] = Counter()
    rows: list[Rows] = []
    enumerated = 0
    for choice in request.candidates:
        arch = models.load_model(choice.id)
        specs, spec_count = spec_configs(request, arch, settings)
        if arch.max_position_embeddings and seq_len > arch.max_position_embeddings:
            # Requests longer than the model's window: its engine would refuse them. (When no
            # candidate holds them the request itself is refused, naming the windows.)
            n = len(engines) * len(quants) * len(kvs) * spec_count * grid * per_row
            enumerated += n * len(request.allowed_gpus())
            pruned["context"] += n * len(request.allowed_gpus())
            continue
        for key in request.allowed_gpus():
            pool = request.hardware.group(key)
            gpu = gpus.get_gpu(key)
            n_groups = len(engines) * len(quants) * len(kvs) * spec_count
            enumerated += n_groups * grid * per_row
            # Speculation settings that cannot run at all (draft without a model, MTP without
            # nextn layers) were counted above and never built.
            skipped = len(engines) * len(quants) * len(kvs) * (spec_count - len(specs))
            pruned["dtype"] += skipped * grid * per_row
            for eng, quant, kv, spec in itertools.product(engines, quants, kvs, specs):
                if not (quant.supported_on(gpu) and kv.supported_on(gpu)):
                    pruned["dtype"] += grid * per_row
                    continue
                if quantization.checkpoint_reason(arch.checkpoint_quant, quant):
                    # Not deployable from this checkpoint: the renderer would refuse it.
                    pruned["checkpoint"] += grid * per_row
                    continue
                q = _quality(choice, quant)
                if floor is not None and (q is None or q < floor):
                    pruned["quality"] += grid * per_row
                    continue
                group = Group(choice=choice, arch=arch, gpu=gpu, engine=eng, quant=quant,
                              kv=kv, spec=spec, quality=q,
                              price_per_gpu_hour=pool.effective_price_per_gpu_hour,
                              pool_gpus=pool.count, gpus_per_node=pool.effective_gpus_per_node,
                              max_tp=request.bounds.max_tensor_parallel,
                              max_pp=request.bounds.max_pipeline_parallel,
                              max_model_len=model_len(
                                  arch, seq_len + spec.k,
                                  perf_engine.engine_facts(eng).block_size))
                r = _rows(group, layouts, limits, mean_len, prefix_reuse, settings, pruned,
                          per_row)
                if r is not None:
                    rows.append(r)
    return Space(rows=rows, enumerated=enumerated, pruned=pruned, modes=modes,
                 replica_options=reps)


def _quality(choice: ModelChoice, quant: QuantRecipe) -> float | None:
    try:
        return choice.quality_at(quant)
    except Exception:  # no published score: quality is unknown, not a reason to prune
        return None


def _rows(group: Group, layouts: np.ndarray, limits: np.ndarray, mean_len: float,
          prefix_reuse: bool, settings: SearchSettings, pruned: Counter[str],
          per_row: int) -> Rows | None:
    """Apply the layout rules, then memory, to one group's grid; count each rule's cuts."""
    tp, pp, dp, ep, cp = (layouts[:, i] for i in range(5))
    n_lim = len(limits)
    alive = parallelism.feasible(group.arch, tp, pp, dp, ep.astype(bool))
    alive &= context_parallel.feasible(group.arch, group.engine, tp, cp)
    # The spec's bounds on the layout are rules the user set: prune as "parallelism".
    if group.max_tp is not None:
        alive &= tp <= group.max_tp
    if group.max_pp is not None:
        alive &= pp <= group.max_pp
    pruned["parallelism"] += int((~alive).sum()) * n_lim * per_row
    g = tp * pp * dp
    # TP and DP communicate every layer: keep them inside one NVLink domain (the node, or the
    # whole NVL72 rack of trays); PP may cross. The node limit counts NVLink domains, which
    # are nodes except where one domain joins several (a replica over trays of one rack).
    reach = group.gpu.nvlink_reach(group.gpus_per_node)
    nodes = np.ceil(g / max(reach, group.gpus_per_node))
    bad_nodes = alive & ((tp * dp > reach) | (nodes > settings.max_nodes_per_replica))
    if group.engine is Engine.VLLM:
        # vLLM's data-parallel ranks over several pods need per-pod start ranks the renderer
        # does not wire (render/layout.py refuses them): not a deployable plan.
        bad_nodes |= alive & (dp > 1) & (g > group.gpus_per_node)
    pruned["nodes"] += int(bad_nodes.sum()) * n_lim * per_row
    alive &= ~bad_nodes
    bad_pool = alive & (g > group.pool_gpus)
    pruned["pool"] += int(bad_pool.sum()) * n_lim * per_row
    alive &= ~bad_pool
    if not alive.any():
        return None
    # Cross the surviving layouts with the engine limits.
    li = np.arange(len(layouts))[alive]
    L = np.repeat(li, n_lim)
    M = np.tile(np.arange(n_lim), len(li))
    seqs, budget, pc = limits[M, 0], limits[M, 1], limits[M, 2].astype(bool)
    # vLLM refuses a token budget below max_num_seqs (each running decode needs a slot).
    ok = budget >= seqs * (1 + group.spec.k)
    pruned["limits"] += int((~ok).sum()) * per_row
    # Without a shared prefix, caching on and off run identically; with one, off only adds
    # prefill work at the same memory: either way "off" is dominated by "on".
    off = ok & ~pc
    if settings.prune_dominated:
        pruned["prefix_caching" if not prefix_reuse else "dominated"] += int(off.sum()) * per_row
        ok &= pc
    facts = perf_engine.engine_facts(group.engine)
    # Sized for the deployed limit, not the planned p99: the engine checks at start-up that
    # one sequence of --max-model-len fits its KV cache, and refuses to start otherwise.
    assert group.max_model_len is not None, "enumerate_space sets the deployed limit"
    mem = memory.breakdown(group.arch, group.gpu, group.quant, group.kv, facts, tp=tp[L],
                           pp=pp[L], dp=dp[L], seq_len=group.max_model_len,
                           max_batched_tokens=budget, max_num_seqs=seqs, cp=cp[L])
    fits = ok & mem.fits
    pruned["memory"] += int((ok & ~mem.fits).sum()) * per_row
    # A max_num_seqs above what the KV cache holds at the mean length changes nothing but a
    # larger sampler buffer: keep the smallest setting at or above the cache's capacity.
    at_mean = memory.breakdown(group.arch, group.gpu, group.quant, group.kv, facts, tp=tp[L],
                               pp=pp[L], dp=dp[L], seq_len=mean_len + group.spec.k,
                               max_batched_tokens=budget, max_num_seqs=seqs, cp=cp[L])
    smaller = np.asarray(sorted(settings.max_num_seqs))
    below = smaller[None, :] < seqs[:, None]
    prev = np.where(below, smaller[None, :], 0).max(1)
    redundant = fits & (prev >= np.maximum(at_mean.max_seqs, 1)) & settings.prune_dominated
    pruned["dominated"] += int(redundant.sum()) * per_row
    fits &= ~redundant
    if not fits.any():
        return None
    L, seqs, budget, pc = L[fits], seqs[fits], budget[fits], pc[fits]
    return Rows(group=group, tp=tp[L], pp=pp[L], dp=dp[L], ep=ep[L].astype(bool),
                max_num_seqs=seqs, max_num_batched_tokens=budget, prefix_caching=pc, cp=cp[L])


def nodes_of(gpus_per_replica: int, gpus_per_node: int) -> int:
    return math.ceil(gpus_per_replica / gpus_per_node)
