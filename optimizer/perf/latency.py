"""Steady-state TTFT, TPOT and throughput of a closed-loop benchmark at concurrency C.

This is how genai-perf / aiperf / `vllm bench serve --max-concurrency` measure: C clients each
send a request, wait for its last token, and send the next. The engine (vLLM V1) runs
continuous batching with chunked prefill: every step schedules the running decodes first
(`q` tokens each: 1, or k+1 when verifying speculative drafts) and fills the rest of the
`max_num_batched_tokens` budget with prefill chunks.

Model, per attention replica (DP rank), vectorized over candidates:
  * a fixed point for the number of sequences decoding, n_d: Little's law splits the C
    in-flight requests between prefill (rate x TTFT) and decode (rate x decode time);
  * the average step mixes pure-decode steps and steps that carry a prefill chunk, in the
    proportion the prefill work per completed request demands;
  * TTFT = request overhead + half a step of alignment + the chunks of its own prefill +
    M/D/1 queueing behind other prefills + waiting for a free slot when C exceeds the
    sequences that fit;
  * the benchmark's first wave (all C requests at once) queues its prefills; it is one in
    `benchmark_requests_per_concurrency` of the requests and enters the means with that weight.

A prefill-first engine (SGLang: `prefill_first` in engine.yaml) never mixes prefill chunks into
decode steps, so its closed loop runs in waves instead (`_prefill_first_waves`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog import speculation
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.perf import dp_lockstep, memory
from trilemma.optimizer.perf.arrays import BoolArray, FloatArray
from trilemma.optimizer.perf.steps import StepModel

_FIXED_POINT_ITERATIONS = 4
# Above this prefill utilisation the M/D/1 queue formula diverges; the closed loop itself
# keeps the real system below it by moving requests out of decode.
_MAX_PREFILL_UTILISATION = 0.95


@dataclass(frozen=True, kw_only=True)
class ClosedLoopResult:
    """Arrays over candidates. Times in ms, rates per second."""

    ttft_ms: FloatArray
    tpot_ms: FloatArray
    e2e_ms: FloatArray
    requests_per_s: FloatArray        # whole replica
    output_tokens_per_s: FloatArray   # whole replica
    output_tokens_per_s_per_gpu: FloatArray
    decode_step_ms: FloatArray        # a pure decode step at the steady batch
    mixed_step_ms: FloatArray         # a step that carries a prefill chunk
    running: FloatArray               # sequences decoding, per DP rank
    tokens_per_step: FloatArray       # accepted tokens per sequence per step (speculation)
    memory: memory.MemoryBreakdown

    @property
    def fits(self) -> BoolArray:
        return self.memory.fits


def closed_loop(sm: StepModel, *, tp: npt.ArrayLike, pp: npt.ArrayLike, dp: npt.ArrayLike,
                ep: npt.ArrayLike, concurrency: npt.ArrayLike, prompt_tokens: npt.ArrayLike,
                output_tokens: npt.ArrayLike, cached_tokens: npt.ArrayLike = 0.0,
                max_batched_tokens: npt.ArrayLike | None = None,
                max_num_seqs: npt.ArrayLike | None = None, spec: SpecConfig | None = None,
                output_predictability: float = 0.5, draft: StepModel | None = None,
                first_wave_weight: float | None = None,
                cp: npt.ArrayLike = 1) -> ClosedLoopResult:
    """Scalars or arrays in (broadcast together), arrays over candidates out. `cp`: decode
    context parallel ranks within TP (its KV shard and collectives; no extra GPUs).

    Lengths are per-request means in tokens (glossary names); after broadcasting the
    arithmetic calls them isl, osl and cached for short.
    """
    facts = sm.facts
    f64 = np.float64
    if max_batched_tokens is None:
        max_batched_tokens = facts.default_max_num_batched_tokens(sm.gpu)
    if max_num_seqs is None:
        max_num_seqs = facts.default_max_num_seqs(sm.gpu)
    tp, pp, dp, ep, conc, isl, osl, cached, budget, seqs_cap, cp = np.broadcast_arrays(
        np.asarray(tp, f64), np.asarray(pp, f64), np.asarray(dp, f64), np.asarray(ep, bool),
        np.asarray(concurrency, f64), np.asarray(prompt_tokens, f64),
        np.asarray(output_tokens, f64), np.asarray(cached_tokens, f64),
        np.asarray(max_batched_tokens, f64), np.asarray(max_num_seqs, f64),
        np.asarray(cp, f64))
    spec = spec or SpecConfig(method=SpecMethod.NONE, k=0)
    k = float(spec.k)
    if spec.method is SpecMethod.NONE:
        per_step = np.ones_like(conc)
    else:
        a = speculation.acceptance_rate(spec.method, output_predictability)
        per_step = np.broadcast_to(speculation.expected_tokens_per_step(a, spec.k), conc.shape)

    mem = memory.breakdown(sm.arch, sm.gpu, sm.recipe, sm.kv, facts, tp=tp, pp=pp, dp=dp,
                           seq_len=isl + osl + k, max_batched_tokens=budget,
                           max_num_seqs=seqs_cap, cp=cp)
    per_rank = np.maximum(conc / dp, 1.0)
    slots = np.maximum(np.minimum(seqs_cap, _kv_slots(sm, mem, tp=tp, pp=pp, cp=cp, isl=isl,
                                                      osl=osl, k=k)), 1.0)
    running = np.minimum(per_rank, slots)
    load = _Load(per_rank=per_rank, running=running, prefill=np.maximum(isl - cached, 1.0),
                 cached=cached, decode_steps=np.maximum(osl - 1.0, 0.0) / per_step,
                 budget=budget, mb=np.maximum(pp, 1.0),
                 overhead=facts.request_overhead_ms
                 + facts.request_overhead_per_prompt_token_us * 1e-3 * isl)
    steps = _Steps(sm=sm, draft=draft, spec=spec, tp=tp, dp=dp, ep=ep, pp=pp, cp=cp,
                   ctx=isl + 0.5 * osl, q=1.0 + k)
    if facts.prefill_first:
        steady = _prefill_first_waves(steps, load, osl)
        ttft_mean, tpot_mean = steady.ttft, steady.tau
    else:
        steady = _steady_state(steps, load)
        # First wave: all requests of a rank arrive together and their prefills queue.
        weight = (1.0 / facts.benchmark_requests_per_concurrency
                  if first_wave_weight is None else first_wave_weight)
        tpot = steady.tau / per_step
        if weight == 0.0:
            # No first wave (open loop, as the search screens): skip pricing it; the
            # weighted sums below would add exactly 0.0.
            ttft_mean, tpot_mean = steady.ttft, tpot
        else:
            ttft_wave, tpot_wave_extra = _first_wave(steps, load, steady, osl)
            ttft_mean = ((1.0 - weight) * steady.ttft
                         + weight * np.maximum(ttft_wave, steady.ttft))
            tpot_mean = tpot + weight * tpot_wave_extra

    requests = steady.rate * dp
    out_tps = requests * osl
    return ClosedLoopResult(
        ttft_ms=ttft_mean, tpot_ms=tpot_mean,
        e2e_ms=ttft_mean + np.maximum(osl - 1.0, 0.0) * tpot_mean,
        requests_per_s=requests * 1e3, output_tokens_per_s=out_tps * 1e3,
        output_tokens_per_s_per_gpu=out_tps * 1e3 / (tp * pp * dp),
        decode_step_ms=steady.t_dec, mixed_step_ms=steady.t_mix, running=steady.n_dec,
        tokens_per_step=per_step, memory=mem)


def _kv_slots(sm: StepModel, mem: memory.MemoryBreakdown, *, tp: np.ndarray, pp: np.ndarray,
              cp: np.ndarray, isl: np.ndarray, osl: np.ndarray, k: float) -> FloatArray:
    """Sequences the KV cache keeps resident in the steady closed loop.

    A prefill-first engine (SGLang) is left at `mem.max_seqs`, sequences at their full
    length. vLLM's paged cache allocates a block only when a sequence's tokens reach it and
    admits a request when its prompt's blocks are free (KVCacheManager.allocate_slots), so
    it holds sequences at their current length: in a steady closed loop the running ones
    are spread evenly over their decode, isl + osl/2 tokens each on average. Past that
    capacity the scheduler preempts the newest and queues the rest; capacity at the full
    length (`max_seqs`) would queue requests that in fact run.
    """
    if sm.facts.prefill_first:
        return mem.max_seqs
    resident = memory.kv_bytes_per_seq(sm.arch, sm.kv, tp, pp, isl + 0.5 * osl + k,
                                       sm.facts.block_size, cp)
    return np.maximum(np.floor(np.maximum(mem.kv_cache, 0.0) / resident), mem.max_seqs)


@dataclass(frozen=True, kw_only=True)
class _Load:
    """What one attention replica (DP rank) carries, broadcast over candidates."""

    per_rank: FloatArray      # in-flight requests per rank
    running: FloatArray       # of which hold a sequence slot
    prefill: FloatArray       # uncached prompt tokens of a request
    cached: FloatArray        # cached prompt tokens of a request
    decode_steps: FloatArray  # decode steps per request (after speculation)
    budget: FloatArray        # max_num_batched_tokens
    mb: FloatArray            # micro-batches in flight: PP keeps one per stage
    overhead: FloatArray      # API-server time per request (fixed + per prompt token), ms


@dataclass(frozen=True, kw_only=True)
class _Steps:
    """Prices one engine step of the candidates at their layouts and mean context."""

    sm: StepModel
    draft: StepModel | None
    spec: SpecConfig
    tp: FloatArray
    dp: FloatArray
    ep: FloatArray
    pp: FloatArray
    cp: FloatArray
    ctx: FloatArray
    q: float

    def step(self, dec: np.ndarray, pf_tokens: npt.ArrayLike = 0.0,
             pf_seqs: npt.ArrayLike = 0.0, pf_kv: npt.ArrayLike = 0.0,
             pf_ranks: npt.ArrayLike | None = None) -> FloatArray:
        # Only a DP-lockstep layout names the ranks carrying a chunk (the simulator's toy
        # step models take no such argument).
        extra = {} if pf_ranks is None or not self.lockstep else {"pf_ranks": pf_ranks}
        return self.sm.step(tp=self.tp, dp=self.dp, ep=self.ep, pp=self.pp, dec_seqs=dec,
                            dec_kv=self.ctx, q=self.q, pf_tokens=pf_tokens, pf_seqs=pf_seqs,
                            pf_kv=pf_kv, cp=self.cp, **extra).total

    @property
    def lockstep(self) -> bool:
        """MoE layers tie the attention-DP ranks together (perf/dp_lockstep.py)."""
        return self.sm.arch.moe is not None and bool(np.any(self.dp > 1))

    def draft_ms(self, dec: np.ndarray) -> FloatArray:
        return _draft_ms(self.sm, self.draft, self.spec, tp=self.tp, dp=self.dp, ep=self.ep,
                         pp=self.pp, dec=dec, ctx=self.ctx, cp=self.cp)


@dataclass(frozen=True, kw_only=True)
class _Steady:
    """The fixed point's last iterate."""

    tau: FloatArray    # mean step, ms
    t_dec: FloatArray  # a pure decode step
    t_mix: FloatArray  # a step carrying a prefill chunk
    ttft: FloatArray
    rate: FloatArray   # requests per ms per rank
    n_dec: FloatArray  # sequences decoding per rank


def _steady_state(steps: _Steps, load: _Load) -> _Steady:
    """Little's law fixed point for the sequences decoding, with the TTFT it implies."""
    running, prefill, decode_steps = load.running, load.prefill, load.decode_steps
    n_dec = running.copy()
    for _ in range(_FIXED_POINT_ITERATIONS):
        dec_mb = np.maximum(n_dec / load.mb, 0.0)
        room = np.maximum(load.budget - dec_mb * steps.q, 1.0)
        need = np.where(decode_steps > 0, n_dec * prefill / np.maximum(decode_steps, 1e-9),
                        room)
        chunk = np.minimum(room, np.maximum(np.minimum(prefill, room), need))
        share = np.clip(need / chunk, 0.0, 1.0)
        pf_seqs = np.maximum(chunk / prefill, 1.0)
        draft = steps.draft_ms(dec_mb)  # the same drafts in either step: priced once
        t_dec = steps.step(dec_mb) + draft
        # The chunk is this rank's: the other DP ranks decode beside it (perf/dp_lockstep.py),
        # and under MoE lockstep a rank's step is a mixed one whenever any rank's is.
        t_mix = steps.step(dec_mb, chunk, pf_seqs, load.cached + 0.5 * (prefill + chunk),
                           pf_ranks=1.0) + draft
        stretched = dp_lockstep.stretched_share(share, steps.dp, steps.lockstep)
        tau = stretched * t_mix + (1.0 - stretched) * t_dec
        # A request's own prefill: one step when it fits beside the decodes (possibly
        # shared with other prefills), else full chunks at the room left, then the rest,
        # whose extra cost over a decode step scales with its size. chunk == room then.
        full_chunks = np.floor(prefill / room)
        rest = prefill - full_chunks * room
        service = np.where(prefill <= room, t_mix, full_chunks * t_mix + np.where(
            rest > 0, t_dec + (t_mix - t_dec) * rest / room, 0.0))
        # Share of steps busy with prefill, as the utilisation of an M/D/1 prefill queue.
        # (need/room would credit several prompts sharing one step; the serving simulator
        # agrees better with this more conservative figure.)
        rho = np.minimum(share, _MAX_PREFILL_UTILISATION)
        # An arrival lands in a step in proportion to its length, so the residual wait is
        # E[step^2] / (2 E[step]), not half a mean step.
        residual = (stretched * t_mix**2 + (1.0 - stretched) * t_dec**2) / (2.0 * tau)
        in_slot = load.overhead + residual + service + rho / (2.0 * (1.0 - rho)) * service
        decode_ms = decode_steps * tau
        rate = running / (in_slot + decode_ms)
        # Requests beyond the slots that fit wait in the queue for one to free (Little).
        ttft = in_slot + np.maximum(load.per_rank - running, 0.0) / np.maximum(rate, 1e-12)
        target = running * decode_ms / np.maximum(decode_ms + in_slot, 1e-9)
        n_dec = 0.5 * n_dec + 0.5 * np.clip(target, 0.0, running)
    return _Steady(tau=tau, t_dec=t_dec, t_mix=t_mix, ttft=ttft, rate=rate, n_dec=n_dec)


def _prefill_first_waves(steps: _Steps, load: _Load, osl: np.ndarray) -> _Steady:
    """A prefill-first engine (SGLang) under a closed loop: the requests move in waves.

    SGLang runs a prefill batch whenever requests wait, pausing the decodes, and never mixes
    prefill chunks into decode steps (`enable_mixed_chunk` is off by default). Requests that
    start together finish together (same output length), so their successors arrive
    together: each cycle prefills the whole wave in budget-sized prefill-only steps, then
    decodes it at full batch. A request's TTFT runs to the end of the chunk holding its
    prompt; the chunks after it stall its decode, which enters its TPOT. `tau` carries the
    mean TPOT (per accepted token), `t_mix` a prefill step.
    """
    running, prefill = load.running, load.prefill
    wave_tokens = running * prefill
    chunks = np.ceil(wave_tokens / load.budget)
    chunk = wave_tokens / chunks
    t_chunk = steps.step(np.zeros_like(running), chunk, np.maximum(chunk / prefill, 1.0),
                         load.cached + 0.5 * prefill)
    dec = running / load.mb
    t_dec = steps.step(dec) + steps.draft_ms(dec)
    prefill_ms = chunks * t_chunk
    decode_ms = load.decode_steps * t_dec
    # Mean over the wave's chunks of the time to (and after) the one holding a prompt.
    before = t_chunk * (chunks + 1.0) / 2.0
    after = t_chunk * (chunks - 1.0) / 2.0
    # Per output token after the first (a step can accept several under speculation).
    tpot = np.where(osl > 1.0, (decode_ms + after) / np.maximum(osl - 1.0, 1.0), t_dec)
    cycle = load.overhead + prefill_ms + decode_ms
    rate = running / cycle
    # Requests beyond the slots that fit wait for a later wave.
    ttft = (load.overhead + before
            + np.maximum(load.per_rank - running, 0.0) / np.maximum(rate, 1e-12))
    return _Steady(tau=tpot, t_dec=t_dec, t_mix=t_chunk, ttft=ttft, rate=rate, n_dec=running)


def _first_wave(steps: _Steps, load: _Load, steady: _Steady,
                osl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TTFT of the benchmark's first wave, and the TPOT its queued prefills add."""
    running, prefill, budget = load.running, load.prefill, load.budget
    wave_tokens = running * prefill
    wave_chunk = np.minimum(wave_tokens, budget)
    wave_steps = np.ceil(wave_tokens / budget)
    t_wave = steps.step(0.5 * running / load.mb, wave_chunk,
                        np.maximum(wave_chunk / prefill, 1.0), load.cached + 0.5 * prefill)
    ttft_wave = load.overhead + t_wave * (wave_steps + 1.0) / 2.0
    tpot_wave_extra = (np.maximum(wave_steps - 1.0, 0.0) / 2.0
                       * np.maximum(t_wave - steady.t_dec, 0.0) / np.maximum(osl - 1.0, 1.0))
    return ttft_wave, tpot_wave_extra


def _draft_ms(sm: StepModel | None, draft: StepModel | None, spec: SpecConfig, *,
              tp: np.ndarray, dp: np.ndarray, ep: np.ndarray, pp: np.ndarray, dec: np.ndarray,
              ctx: np.ndarray, cp: npt.ArrayLike = 1.0) -> FloatArray:
    """Time to propose k draft tokens for `dec` sequences, per step. `sm` is the target's
    model, None for a perf model without layers (the simulator's toy models): enough for a
    draft model, not for a layer drafter."""
    cost = speculation.draft_cost(spec.method) if spec.method is not SpecMethod.NONE else None
    if cost is None or cost.kind == "none" or spec.k == 0:
        return np.zeros(np.broadcast(tp, dec).shape)
    if cost.kind == "model":
        if draft is None:
            raise ValueError("a draft-model speculation needs the draft model's StepModel")
        one = draft.step(tp=tp, dp=dp, ep=ep, pp=np.ones_like(pp), dec_seqs=dec, dec_kv=ctx)
        return spec.k * one.total
    # Layer-based drafters (EAGLE, MTP) run `layers` decoder layers of the target's shape and
    # the lm_head per proposed token, inside the same CUDA graph as the step.
    if sm is None:
        raise ValueError(f"{spec.method.value} drafting is priced from the target's layers: "
                         "it needs the target's StepModel")
    # The drafter's layers attend to the target's (sharded) cache with its collectives.
    full = sm.step(tp=tp, dp=dp, ep=ep, pp=pp, dec_seqs=dec, dec_kv=ctx, cp=cp)
    lm_head = sm.km.gemm_ms("bf16", np.maximum(dec, 1.0), sm.arch.vocab_size / tp,
                            sm.arch.hidden_size)
    per_layer = (full.total - full.other - lm_head) / sm.arch.num_layers
    launch = sm.facts.step_overhead_ms * 0.25
    return spec.k * (cost.layers * per_layer + lm_head + launch)
