"""What one simulated replica costs: step times, KV capacity and speculation, from perf.

The sim-server's scheduler (scheduling.py) asks this module how long each engine step (a
batch of `d` decodes plus a prefill chunk) takes, and (with speculative decoding) for the
acceptance law its verify steps draw from. Both come from the same layers the optimizer plans with,
so a fleet of sim-servers behaves as the plan predicts:

* step times from the calibrated step model through serving.StepTable, the simulator's lazily
  filled interpolation table: one vectorized perf call fills a block of batch sizes, after
  which a step costs about a microsecond of CPU;
* KV capacity (blocks of 16 tokens per DP rank) and vLLM's limits from serving.engine_config,
  i.e. perf's memory model at the worker's gpu_memory_utilization;
* accepted drafts per step from catalog.speculation's acceptance fit, under the truncated
  geometric law of serving.Speculation (drawn by the scheduler core's `VerifyDraws`).
"""

from __future__ import annotations

import dataclasses

from trilemma.optimizer import serving
from trilemma.optimizer.catalog import SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import estimate as perf_estimate
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig

DEFAULT_PREDICTABILITY = 0.5  # chat, the catalog's middle setting for speculative acceptance


def _spec_text(worker: WorkerConfig) -> str:
    if worker.spec_method == SpecMethod.NONE.value:
        return "none"
    if worker.spec_method == SpecMethod.DRAFT.value:
        return f"draft:{worker.draft_model}:{worker.spec_k}"
    return f"{worker.spec_method}:{worker.spec_k}"


class EngineModel:
    """Timing and capacity of one replica of `config` (its decode worker when disaggregated:
    a sim replica always prefills and decodes).

    output_predictability: 0 (creative) .. 1 (rewriting), drives speculative acceptance.
    request_overhead_ms: time a request spends in the API server before the engine sees it
        (HTTP, tokenization); None takes perf's fitted figure, so that measured TTFT matches
        what the optimizer predicts for this deployment.
    kv_blocks: KV blocks per engine instead of what the memory model gives (a small cache
        makes eviction and preemption easy to exercise).
    """

    def __init__(self, config: ServingConfig, *,
                 output_predictability: float = DEFAULT_PREDICTABILITY,
                 request_overhead_ms: float | None = None,
                 kv_blocks: int | None = None) -> None:
        w = config.worker
        cfg = perf_estimate.resolve(
            model=config.model, gpu=w.gpu, tp=w.tp, pp=w.pp, dp=w.dp, ep=w.ep, quant=w.quant,
            kv_dtype=w.kv_dtype, spec=_spec_text(w), engine=config.engine,
            max_num_batched_tokens=w.max_num_batched_tokens, max_num_seqs=w.max_num_seqs)
        self.config = config
        self.perf_config = cfg
        self.step_model = perf_estimate.step_model(cfg)
        speculation = None
        if cfg.spec.method is not SpecMethod.NONE:
            speculation = serving.Speculation.for_workload(
                cfg.spec, output_predictability, draft=perf_estimate.draft_step_model(cfg))
        self.engine = serving.engine_config(
            self.step_model, tp=w.tp, pp=w.pp, dp=w.dp, ep=w.ep, max_num_seqs=w.max_num_seqs,
            max_num_batched_tokens=w.max_num_batched_tokens, speculation=speculation,
            gpu_memory_utilization=w.gpu_memory_utilization, cp=w.cp)
        if kv_blocks is not None:
            self.engine = dataclasses.replace(self.engine, kv_blocks=kv_blocks)
        self.speculation = speculation
        self.notes: list[str] = []
        self.max_model_len = self._max_model_len(w, cfg.arch.max_position_embeddings)
        self.prefix_caching = w.prefix_caching
        self.request_overhead_ms = (self.step_model.facts.request_overhead_ms
                                    if request_overhead_ms is None else request_overhead_ms)
        self._table = serving.StepTable(self.step_model, self.engine,
                                        max_context=self.max_model_len + self.tokens_per_decode)

    def _max_model_len(self, worker: WorkerConfig, model_limit: int) -> int:
        capacity = self.engine.kv_blocks * self.engine.block_size
        if worker.max_model_len is not None:
            if worker.max_model_len > capacity:
                raise InputError("max_model_len", worker.max_model_len,
                                 f"one sequence of that length needs more KV cache than the "
                                 f"{capacity} tokens an engine holds; vLLM refuses to start")
            return worker.max_model_len
        if model_limit > capacity:
            # vLLM would refuse to start too; the simulator serves what fits and says so.
            self.notes.append(
                f"the model's {model_limit}-token context exceeds the KV cache "
                f"({capacity} tokens): vLLM would refuse to start without --max-model-len; "
                f"serving with max_model_len={capacity}")
            return capacity
        return model_limit

    @property
    def block_size(self) -> int:
        return self.engine.block_size

    @property
    def kv_blocks(self) -> int:
        """KV blocks of one engine (one attention DP rank)."""
        return self.engine.kv_blocks

    @property
    def engines(self) -> int:
        """Schedulers in one replica: one per attention DP rank."""
        return self.engine.dp

    @property
    def seats(self) -> int:
        return self.engine.seats

    @property
    def token_budget(self) -> int:
        return self.engine.max_num_batched_tokens

    @property
    def tokens_per_decode(self) -> int:
        return self.engine.tokens_per_decode

    @property
    def spec_k(self) -> int:
        return self.speculation.k if self.speculation else 0

    def step_ms(self, *, decodes: int, decode_kv: float, prefill_tokens: int = 0,
                prefill_seqs: int = 0, prefill_context: float = 0.0) -> float:
        """One step of `decodes` sequences at mean KV length `decode_kv` plus a prefill chunk
        of `prefill_tokens` over `prefill_seqs` prompts reaching `prefill_context` tokens on
        average (drafting included), in milliseconds of the modelled GPU."""
        return self._table(decodes, decode_kv, prefill_tokens, prefill_seqs, prefill_context)
