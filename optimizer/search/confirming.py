"""Confirming: run the best candidates through the discrete-event simulator.

Fifth stage of the search (ranking -> confirming -> explaining). The screen's percentiles are
means times hand-set factors; the simulator queues real arrivals through continuous batching,
so its p90s replace the screen's for the few configurations a person will look at: the best
by the objective and points spread along the front. Every configuration sees the same sampled
workload (one seed), which keeps the comparison fair and the plan reproducible. Work is
bounded by counts (configurations x requests), never by wall time, so that a slower machine
returns the same plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer import serving
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import engine as perf_engine
from trilemma.optimizer.perf import steps
from trilemma.optimizer.search import mixing, parallel, screening
from trilemma.optimizer.search.configs import Choice, Mode, ServingConfig, WorkerConfig
from trilemma.optimizer.search.screening import RowScreen, SloMetric, Term
from trilemma.optimizer.search.sizing import Candidates
from trilemma.optimizer.search.space import SearchSettings
from trilemma.optimizer.spec.plan_request import PlanRequest

_WARMUP = 0.1     # share of requests that see an empty system first: left out of percentiles
_COOLDOWN = 0.05  # and the last arrivals, which see it drain


@dataclass(frozen=True, kw_only=True)
class Confirmed:
    choices: list[Choice]            # passed in simulation, or could not be simulated
    failed: list[tuple[Choice, str]]  # missed the SLO in simulation: which term, by how much
    simulated: int


def pick(ranked: np.ndarray, front: np.ndarray, c: Candidates, screens: list[RowScreen],
         settings: SearchSettings) -> list[int]:
    """Candidates to simulate: the best `simulate_top_k` by the objective, then up to
    `simulate_front` points spread along the front. Order: best first."""
    out: list[int] = [int(i) for i in ranked[:settings.simulate_top_k]]
    rest = [int(i) for i in front if int(i) not in set(out)]
    if len(rest) > settings.simulate_front:
        at = np.linspace(0, len(rest) - 1, settings.simulate_front).round().astype(int)
        rest = [rest[j] for j in np.unique(at)]
    return out + rest


def confirm(request: PlanRequest, choices: list[Choice], settings: SearchSettings, *,
            seed: int, progress: Callable[[float], None] | None = None) -> Confirmed:
    if not choices or settings.simulate_requests <= 0:
        return Confirmed(choices=list(choices), failed=[], simulated=0)
    wl = screening.WorkloadMeans.of(request)
    terms = screening.slo_terms(request)
    sample = workload(request, settings.simulate_requests, seed)
    outcomes = _simulate_all([c.config for c in choices], sample, wl, seed, settings.workers)
    ok: list[Choice] = []
    failed: list[tuple[Choice, str]] = []
    simulated = 0
    for n, (ch, summ) in enumerate(zip(choices, outcomes, strict=True)):
        if isinstance(summ, str):
            # The simulator refuses configurations it cannot hold (a request longer than the
            # KV cache); the screen's answer stands, marked as unconfirmed.
            prov = {**ch.prediction.provenance, "simulation": f"not run: {summ}"}
            ok.append(dataclasses.replace(
                ch, prediction=dataclasses.replace(ch.prediction, provenance=prov)))
            continue
        simulated += 1
        miss = worst_miss(terms, summ, wl)
        pred = dataclasses.replace(
            ch.prediction, ttft_p50_ms=summ.ttft_ms.p50, ttft_p90_ms=summ.ttft_ms.p90,
            tpot_p50_ms=summ.tpot_ms.p50, tpot_p90_ms=summ.tpot_ms.p90,
            e2e_p99_ms=summ.e2e_ms.p99, simulated=True,
            provenance={**ch.prediction.provenance,
                        "latency": f"simulated: {len(sample)} requests at "
                                   f"{wl.design_rate:g} req/s, seed {seed}, method fast"})
        confirmed = dataclasses.replace(ch, prediction=pred)
        if miss is None:
            ok.append(confirmed)
        else:
            failed.append((confirmed, miss))
        if progress is not None:
            progress((n + 1) / len(choices))
    return Confirmed(choices=ok, failed=failed, simulated=simulated)


_Key = tuple[serving.Cluster, int, bool]


def _simulate_all(configs: list[ServingConfig], sample: serving.RequestStream,
                  wl: screening.WorkloadMeans, seed: int,
                  workers: int) -> list[serving.Summary | str]:
    """The steady-state summary of each configuration's run, or why it could not run.

    Equal clusters give equal runs (same sample, same seed): each distinct one is simulated
    once. Runs are independent, so they spread over `workers` processes with the same
    results as one after the other. A configuration spanning GPU types runs its parts in
    turn (`summary`), here in this process.
    """
    plain = iter(_simulate_plain([c for c in configs if not c.mixed], sample, wl, seed,
                                 workers))
    out: list[serving.Summary | str] = []
    for cfg in configs:
        if not cfg.mixed:
            out.append(next(plain))
            continue
        try:
            out.append(summary(cfg, sample, wl.output_predictability, seed))
        except InputError as err:
            out.append(err.why)
    return out


def _simulate_plain(configs: list[ServingConfig], sample: serving.RequestStream,
                    wl: screening.WorkloadMeans, seed: int,
                    workers: int) -> list[serving.Summary | str]:
    keys: list[_Key | str] = []
    models: dict[_Key, steps.StepModel] = {}
    for cfg in configs:
        try:
            cluster, sm = cluster_of(cfg, wl.output_predictability)
        except InputError as err:
            keys.append(err.why)
            continue
        key = (cluster, id(sm), cfg.worker.prefix_caching)
        models[key] = sm
        keys.append(key)
    todo = list(models)
    # Finalists often share an engine (replica counts differ): its step table is built once
    # per process. All see the same sample, so a shared table is the one each would build.
    tables: dict[serving.EngineConfig, serving.StepTable] = {}

    def one(j: int) -> serving.Summary | str:
        cluster, _, prefix_caching = todo[j]
        try:
            res = run(cluster, models[todo[j]], prefix_caching, sample, seed, tables)
        except InputError as err:
            return err.why
        return res.summary(res.steady(warmup=_WARMUP, cooldown=_COOLDOWN))

    done = dict(zip(todo, parallel.mapper(workers, min_items=2)(one, list(range(len(todo)))),
                    strict=True))
    return [k if isinstance(k, str) else done[k] for k in keys]


def worst_miss(terms: list[Term], s: serving.Summary, wl: screening.WorkloadMeans) -> str | None:
    """The SLO term the simulation misses by most, as a sentence; None when all pass."""
    worst: tuple[float, str] | None = None
    for t in terms:
        stats = {SloMetric.TTFT: s.ttft_ms, SloMetric.TPOT: s.tpot_ms,
                 SloMetric.E2E: s.e2e_ms}[t.metric]
        value = float(getattr(stats, t.pct))
        if not np.isfinite(value):
            continue
        r = value / t.target_ms
        # A small tolerance: the sampled percentile of ~1,000 requests is itself noisy.
        if r > 1.02 and (worst is None or r > worst[0]):
            worst = (r, f"{t.name}: simulated {value:.1f} ms ({(r - 1) * 100:.0f}% over)")
    return None if worst is None else worst[1]


def workload(request: PlanRequest, n: int, seed: int) -> serving.RequestStream:
    """`n` requests of the spec's workload arriving at the design rate (Poisson gaps scaled
    from the spec's process, so bursty arrivals stay bursty)."""
    rng = np.random.default_rng(seed)
    wl = request.workload
    s = wl.sample(n, rng)
    gaps = wl.arrivals.sample_gaps(n, rng) / wl.peak_factor
    arrival = np.concatenate([[0.0], np.cumsum(gaps[1:])]) * 1e3
    cached = np.minimum(s.cached_tokens, s.prompt_tokens - 1)
    ids = np.where(cached > 0, 0, -1)
    return serving.RequestStream(prompt_tokens=s.prompt_tokens, output_tokens=s.output_tokens,
                                 prefix_id=ids, prefix_tokens=np.where(ids >= 0, cached, 0),
                                 arrival_ms=arrival)


_MODELS: dict[tuple[str, str, str, str, str], steps.StepModel] = {}


def step_model(cfg: ServingConfig, w: WorkerConfig) -> steps.StepModel:
    key = (cfg.model, w.gpu, w.quant, w.kv_dtype, cfg.engine)
    sm = _MODELS.get(key)
    if sm is None:
        sm = steps.StepModel(models.load_model(cfg.model), gpus.get_gpu(w.gpu),
                             w.quant, w.kv_dtype,
                             perf_engine.engine_facts(cfg.engine))
        _MODELS[key] = sm
    return sm


def _engine(sm: steps.StepModel, w: WorkerConfig,
            output_predictability: float) -> serving.EngineConfig:
    spec = None
    if w.spec_method is not SpecMethod.NONE:
        spec = serving.Speculation.for_workload(
            SpecConfig(method=w.spec_method, k=w.spec_k), output_predictability)
    return serving.engine_config(sm, tp=w.tp, pp=w.pp, dp=w.dp, ep=w.ep,
                                 max_num_seqs=w.max_num_seqs,
                                 max_num_batched_tokens=w.max_num_batched_tokens,
                                 speculation=spec,
                                 gpu_memory_utilization=w.gpu_memory_utilization, cp=w.cp)


def summary(cfg: ServingConfig, sample: serving.RequestStream, output_predictability: float,
            seed: int) -> serving.Summary:
    """The steady-state summary of `cfg` on `sample`; a mixed configuration's GPU types each
    simulated on their share of the arrivals (mixing.split), summarised as one mixture."""
    runs = []
    parts = [(cfg, np.arange(len(sample)))] if not cfg.mixed else [
        (mixing.part_config(cfg, p), idx)
        for p, idx in zip(cfg.parts(), mixing.split(cfg, len(sample)), strict=True)]
    for part, idx in parts:
        if len(idx) == 0:
            continue
        res = simulate(part, sample if not cfg.mixed else mixing.part_stream(sample, idx),
                       output_predictability, seed)
        runs.append((res, res.steady(warmup=_WARMUP, cooldown=_COOLDOWN)))
    return runs[0][0].summary(runs[0][1]) if len(runs) == 1 else mixing.mixture(runs)


def simulate(cfg: ServingConfig, sample: serving.RequestStream, output_predictability: float,
             seed: int,
             tables: dict[serving.EngineConfig, serving.StepTable] | None = None
             ) -> serving.SimResult:
    cluster, sm = cluster_of(cfg, output_predictability)
    return run(cluster, sm, cfg.worker.prefix_caching, sample, seed, tables)


def cluster_of(cfg: ServingConfig,
               output_predictability: float) -> tuple[serving.Cluster, steps.StepModel]:
    """What the simulator runs for `cfg`, and the step model that prices it. Configurations
    that differ only where the simulator does not look (a summary field it has no model of)
    give equal clusters: confirm simulates them once."""
    w = cfg.worker
    sm = step_model(cfg, w)
    pool = serving.Pool(engine=_engine(sm, w, output_predictability), replicas=cfg.replicas)
    prefill = transfer = None
    if cfg.mode is Mode.DISAGGREGATED and cfg.prefill is not None:
        sm_p = step_model(cfg, cfg.prefill)  # its own GPU type's, when it differs
        prefill = serving.Pool(engine=_engine(sm_p, cfg.prefill, output_predictability),
                               replicas=cfg.prefill_replicas)
        # Pools sit on different nodes, as the screen assumes; between two node types the
        # slower NIC sets the pace (crossing.py).
        transfer = serving.kv_transfer(sm_p, tp=cfg.prefill.tp, pp=cfg.prefill.pp,
                                       inter_node=True, cp=cfg.prefill.cp)
        transfer = dataclasses.replace(transfer, bandwidth=min(
            sm_p.gpu.inter_node_bw, sm.gpu.inter_node_bw))
    cluster = serving.Cluster(pool=pool, prefill=prefill, transfer=transfer,
                              request_overhead_ms=sm.facts.request_overhead_ms)
    return cluster, sm


def run(cluster: serving.Cluster, sm: steps.StepModel, prefix_caching: bool,
        sample: serving.RequestStream, seed: int,
        tables: dict[serving.EngineConfig, serving.StepTable] | None = None
        ) -> serving.SimResult:
    if not prefix_caching:
        sample = serving.RequestStream(
            prompt_tokens=sample.prompt_tokens, output_tokens=sample.output_tokens,
            prefix_id=np.full(len(sample), -1), prefix_tokens=np.zeros(len(sample), np.int64),
            arrival_ms=sample.arrival_ms)
    return serving.simulate(cluster, sample, sm, np.random.default_rng(seed),
                            method=serving.Method.FAST, tables=tables)
