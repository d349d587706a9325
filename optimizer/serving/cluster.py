"""What is being simulated: engines, pools of replicas, the load balancer, disaggregation.

Configs here are inert frozen data; `engine_config` and `kv_transfer` derive them from the perf
layer (KV capacity from `perf.memory`, link speeds from the GPU catalog) so that the simulator
and the analytic model see the same machine. `LoadBalancer` is the one piece of runtime state:
the event loop owns one per pool.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog import speculation
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import memory
from trilemma.optimizer.serving import policy as scheduling
from trilemma.optimizer.serving.policy import Policy

if TYPE_CHECKING:
    # Only for annotations: importing steps pulls in the kernel tables, which the fakes in
    # the unit tests do without.
    from trilemma.optimizer.catalog.gpus import Gpu
    from trilemma.optimizer.catalog.models import ModelArch
    from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
    from trilemma.optimizer.perf.engine import EngineFacts
    from trilemma.optimizer.perf.steps import StepModel

# A KV hand-off (NIXL/UCX read) costs a request-independent setup and completion notice on top
# of the bytes: estimate, of the order that vLLM's P/D examples log for small prompts.
DEFAULT_TRANSFER_LATENCY_MS = 1.0


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """Speculative decoding in an engine: the method, k, and the per-token acceptance a.

    The accepted drafts per step are drawn from the truncated geometric distribution
    P(A >= i) = a^i, i <= k, so a step yields 1 + A tokens with mean (1 - a^(k+1)) / (1 - a).
    `draft` is the draft model's step model, for SpecMethod.DRAFT only.
    """

    config: SpecConfig
    acceptance: float
    draft: Any = None

    def __post_init__(self) -> None:
        if self.config.method is SpecMethod.NONE:
            raise InputError("speculation", "none", "leave speculation out instead")
        if not 0.0 <= self.acceptance <= 1.0:
            raise InputError("acceptance", self.acceptance, "must be between 0 and 1")
        if (self.config.method is SpecMethod.DRAFT) != (self.draft is not None):
            raise InputError("draft", self.draft,
                             "the draft method, and only it, needs the draft model's step model")

    @classmethod
    def for_workload(cls, config: SpecConfig, output_predictability: float,
                     draft: Any = None) -> Speculation:
        """Acceptance from the catalog's fit for this method and workload predictability."""
        a = float(speculation.acceptance_rate(config.method, output_predictability))
        return cls(config=config, acceptance=a, draft=draft)

    @property
    def k(self) -> int:
        return self.config.k

    def step_tokens(self, u: np.ndarray) -> np.ndarray:
        """Tokens each verify step yields, from uniforms u in [0, 1) (one per step).

        1 + A with A = min(k, floor(ln u / ln a)): P(A >= i) = P(u <= a^i) = a^i.
        """
        a, k = self.acceptance, self.k
        if a <= 0.0:
            return np.ones(len(u), dtype=np.int64)
        if a >= 1.0:
            return np.full(len(u), k + 1, dtype=np.int64)
        with np.errstate(divide="ignore"):
            accepted = np.floor(np.log(u) / math.log(a))
        tokens: npt.NDArray[np.int64] = 1 + np.minimum(accepted, k).astype(np.int64)
        return tokens


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """One engine (one attention DP rank of a replica) and the layout that prices its steps.

    kv_blocks: KV capacity in blocks of `block_size` tokens (see `engine_config`).
    Defaults are vLLM's for >= 70 GiB GPUs (perf/data/engine.yaml); small GPUs use 2048/256.
    """

    kv_blocks: int
    max_num_seqs: int = 1024
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False
    speculation: Speculation | None = None
    cp: int = 1                       # decode context parallel ranks (KV sharded within TP)
    policy: Policy = scheduling.VLLM  # how the engine composes its steps (policy.py)

    def __post_init__(self) -> None:
        for name in ("kv_blocks", "max_num_seqs", "max_num_batched_tokens", "block_size", "tp",
                     "pp", "dp", "cp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise InputError(name, value, "must be a positive integer")
        # vLLM refuses a token budget below max_num_seqs: every running decode must fit a step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InputError("max_num_batched_tokens", self.max_num_batched_tokens,
                             f"must be >= max_num_seqs ({self.max_num_seqs})")

    @property
    def tokens_per_decode(self) -> int:
        """Tokens one decoding sequence puts in a step: 1, or k + 1 when verifying drafts."""
        return 1 + (self.speculation.k if self.speculation else 0)

    @property
    def seats(self) -> int:
        """Sequences that can run at once. With speculation every decode takes k + 1 tokens of
        the budget; vLLM would shrink drafts past that point, we cap the batch instead."""
        return max(1, min(self.max_num_seqs,
                          self.max_num_batched_tokens // self.tokens_per_decode))


class Balancer(enum.Enum):
    """How a pool's front end picks a replica for each request."""

    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"  # fewest requests sent and not yet done


@dataclass(frozen=True, kw_only=True)
class Pool:
    """`replicas` identical replicas; each has `engine.dp` engines that the balancer sees."""

    engine: EngineConfig
    replicas: int = 1
    balancer: Balancer = Balancer.LEAST_OUTSTANDING

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InputError("replicas", self.replicas, "must be >= 1")

    @property
    def engines(self) -> int:
        return self.replicas * self.engine.dp


@dataclass(frozen=True, kw_only=True)
class KvTransfer:
    """The link a finished prefill's KV crosses to its decode replica.

    Every GPU of the prefill replica sends its own shard in parallel, so the time is the bytes
    one GPU holds over one GPU's link bandwidth, plus a fixed latency.
    """

    bytes_per_token: float  # KV bytes per token on one GPU
    bandwidth: float  # bytes/s, one GPU, one direction
    latency_ms: float = DEFAULT_TRANSFER_LATENCY_MS

    def __post_init__(self) -> None:
        if not self.bytes_per_token > 0:
            raise InputError("bytes_per_token", self.bytes_per_token, "must be positive")
        if not self.bandwidth > 0:
            raise InputError("bandwidth", self.bandwidth, "must be positive")
        if not self.latency_ms >= 0:
            raise InputError("latency_ms", self.latency_ms, "must be >= 0")

    def ms(self, tokens: int) -> float:
        return self.latency_ms + tokens * self.bytes_per_token / self.bandwidth * 1e3


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The whole endpoint. Without `prefill`, `pool` serves whole requests; with it, `pool`
    is the decode pool and `transfer` carries KV from the prefill pool to it.

    request_overhead_ms: HTTP, tokenization and detokenization outside the engine; a request
    reaches its engine that long after it arrives (perf's fitted request_overhead_ms is the
    figure to use when comparing with the analytic model).
    """

    pool: Pool
    prefill: Pool | None = None
    transfer: KvTransfer | None = None
    request_overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if (self.prefill is None) != (self.transfer is None):
            raise InputError("transfer", self.transfer,
                             "a disaggregated cluster needs both a prefill pool and a KV link")
        if not self.request_overhead_ms >= 0:
            raise InputError("request_overhead_ms", self.request_overhead_ms, "must be >= 0")

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class LoadBalancer:
    """Runtime state of one pool's balancer: a cursor, or outstanding counts per engine."""

    def __init__(self, policy: Balancer, engines: int) -> None:
        self.policy = policy
        self.outstanding = [0] * engines
        self._next = 0

    def pick(self) -> int:
        if self.policy is Balancer.ROUND_ROBIN:
            chosen = self._next
            self._next = (chosen + 1) % len(self.outstanding)
        else:
            # Ties go to the lowest index, which keeps runs deterministic.
            counts = self.outstanding
            chosen = counts.index(min(counts))
        self.outstanding[chosen] += 1
        return chosen

    def done(self, engine: int) -> None:
        self.outstanding[engine] -= 1


# ---- derived from the perf layer ---------------------------------------------------------------


class ModelOnGpu(Protocol):
    """What engine_config reads of a perf model (perf's StepModel, or a toy stand-in)."""

    @property
    def arch(self) -> ModelArch: ...
    @property
    def gpu(self) -> Gpu: ...
    @property
    def recipe(self) -> QuantRecipe: ...
    @property
    def kv(self) -> KvDtype: ...
    @property
    def facts(self) -> EngineFacts: ...


def engine_config(sm: ModelOnGpu, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: bool = False,
                  max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                  speculation: Speculation | None = None,
                  gpu_memory_utilization: float | None = None, cp: int = 1) -> EngineConfig:
    """An engine whose KV capacity, limits and scheduling policy are what its serving engine
    (`sm.facts.engine`: vLLM, or SGLang with its defaults) would have on this layout.

    Under decode context parallelism a block of the scheduler holds block_size tokens on each
    of the cp ranks (vLLM schedules in blocks of block_size * dcp), so the engine's blocks are
    that large and as many as one GPU's cache holds."""
    facts = sm.facts
    sglang = facts.engine is Engine.SGLANG
    seqs = max_num_seqs or facts.default_max_num_seqs(sm.gpu)
    budget = max_num_batched_tokens or facts.default_max_num_batched_tokens(sm.gpu)
    mem = memory.breakdown(sm.arch, sm.gpu, sm.recipe, sm.kv, facts, tp=tp, pp=pp, dp=dp,
                           seq_len=facts.block_size, max_batched_tokens=budget,
                           max_num_seqs=seqs, gpu_memory_utilization=gpu_memory_utilization,
                           cp=cp)
    per_block = float(mem.kv_bytes_per_token) * facts.block_size * cp
    blocks = math.floor(max(float(mem.kv_cache), 0.0) / per_block)
    if blocks < 1:
        raise InputError("tp", tp, "the weights leave no memory for a KV cache on this layout")
    if float(mem.state_pool) > 0:
        # A hybrid model under SGLang: each running request holds one slot of the recurrent-
        # state pool, so the pool's slots cap the running requests as SGLang caps them.
        seqs = min(seqs, math.floor(float(mem.max_seqs)))
        if seqs < 1:
            raise InputError("tp", tp, "no recurrent-state slot fits on this layout")
    return EngineConfig(kv_blocks=blocks, max_num_seqs=seqs, max_num_batched_tokens=budget,
                        block_size=facts.block_size * cp, tp=tp, pp=pp, dp=dp, ep=ep,
                        speculation=speculation, cp=cp,
                        policy=scheduling.sglang() if sglang else scheduling.VLLM)


def kv_transfer(sm: StepModel, *, tp: int, pp: int = 1, inter_node: bool,
                latency_ms: float = DEFAULT_TRANSFER_LATENCY_MS, cp: int = 1) -> KvTransfer:
    """The KV link between pools: NVLink within a node, the scale-out NIC across nodes. Each
    GPU sends its own shard in parallel: 1/cp of a token's KV under context parallelism."""
    per_token = float(memory.kv_bytes_per_token_per_gpu(sm.arch, sm.kv, np.float64(tp),
                                                        np.float64(pp), np.float64(cp)))
    bw = sm.gpu.inter_node_bw if inter_node else sm.gpu.intra_node_bw
    return KvTransfer(bytes_per_token=per_token, bandwidth=bw, latency_ms=latency_ms)
