"""One scheduler, two clocks: the sim-server's engine (asyncio driver) and the simulator's
reference engine (event-heap driver) take the same decisions on the same requests and step
times, so the closed-loop tests measure the model the planner searches with. With speculation
both draw each request's verify steps the same way from the same seed, so they also emit the
same tokens at the same times."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pytest

from trilemma.optimizer import serving
from trilemma.optimizer.catalog.engines import Engine as ServingEngine
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig
from trilemma.optimizer.serving.blockpool import prefix_hashes
from trilemma.optimizer.serving.reference import ReferenceEngine
from trilemma.optimizer.serving.results import Trace
from trilemma.optimizer.serving.scheduler import Batch, Role, Seq
from trilemma.simfleet.engine_model import EngineModel
from trilemma.simfleet.scheduling import Engine, SimRequest

LLAMA = ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(
    gpu="h100_sxm", max_num_seqs=24, max_num_batched_tokens=1024))
Decisions = list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]]
Timeline = list[tuple[float, int]]  # (when, tokens) per emission of one request
SpecCall = tuple[int, int, int]  # drafts, draft tokens, accepted tokens of one step


class _Sink:
    def __init__(self) -> None:
        self.spec: list[SpecCall] = []

    def request_finished(self, **kw: object) -> None:
        pass

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        self.spec.append((drafts, draft_tokens, accepted_tokens))

    def set_load(self, **kw: object) -> None:
        pass


def _small_cache(config: ServingConfig, output_predictability: float = 0.5) -> EngineModel:
    # A small cache: requests preempt each other and shared prefixes get evicted.
    return EngineModel(config, kv_blocks=150, request_overhead_ms=0.0,
                       output_predictability=output_predictability)


@pytest.fixture(scope="module")
def model() -> EngineModel:
    return _small_cache(LLAMA)


def _workload(seed: int) -> serving.RequestStream:
    return serving.sample_requests(
        np.random.default_rng(seed), requests=80,
        prompt_tokens=serving.Lognormal(mean=500, p90=800, high=1200),
        output_tokens=serving.Lognormal(mean=60, p90=110, high=200),
        arrivals=serving.Poisson(rate_per_s=40.0),
        prefix=serving.SharedPrefixes(tokens=300, share=0.7, prefixes=3))


class _Driver(Protocol):
    def submit(self, i: int, now: float) -> None: ...

    def step(self, now: float) -> float | None: ...


def _run(w: serving.RequestStream, plan: _Driver, finish: Callable[[float], object]) -> None:
    """Both drivers' loop on one virtual clock (s): submit what has arrived, step, repeat."""
    arrivals = (w.arrival_ms / 1e3).tolist()
    now, nxt = 0.0, 0
    while True:
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            plan.submit(nxt, now)
            nxt += 1
        duration = plan.step(now)
        if duration is None:
            if nxt == len(arrivals):
                return
            now = arrivals[nxt]
            continue
        now += duration
        finish(now)


def _record(batch: Batch, name: dict[Seq, int] | None = None) -> tuple:
    def n(seq: Seq) -> int:
        return name[seq] if name is not None else seq.index
    return (tuple((n(s), k) for s, k in batch.work), tuple(n(s) for s in batch.preempted))


@dataclass
class _SimRun:
    steps: Decisions
    trace: Trace
    timelines: list[Timeline]
    spec: list[SpecCall]  # what each step with decodes should report to spec_decode


def _simulator(model: EngineModel, w: serving.RequestStream) -> _SimRun:
    run = _SimRun([], Trace(len(w)), [[] for _ in range(len(w))], [])
    trace, steps = run.trace, run.steps
    eng = ReferenceEngine(model.engine, role=Role.COMBINED, index=0, workload=w, trace=trace,
                          price=lambda d, kv, p, s, c: model.step_ms(
                              decodes=d, decode_kv=kv, prefill_tokens=p, prefill_seqs=s,
                              prefill_context=c) / 1e3,
                          rng=np.random.default_rng(0))

    class Plan:
        def submit(self, i: int, now: float) -> None:
            trace.arrival[i] = now
            eng.submit(i)

        def step(self, now: float) -> float | None:
            duration = eng.start_step(now)
            if duration is not None:
                assert eng.batch is not None
                steps.append(_record(eng.batch))
            return duration

    def finish(now: float) -> None:
        # What each request of the step emitted: the core's token count moved by the step.
        assert eng.batch is not None
        before = [(s, s.generated, s.decoding) for s, _ in eng.batch.work]
        eng.finish_step(now)
        decoded = [s.generated - g for s, g, decoding in before if decoding]
        if decoded and model.spec_k:
            run.spec.append((len(decoded), len(decoded) * model.spec_k,
                             sum(t - 1 for t in decoded)))
        for s, g, _ in before:
            if s.generated > g:
                run.timelines[s.index].append((now, s.generated - g))

    _run(w, Plan(), finish)
    return run


def _server(model: EngineModel, w: serving.RequestStream,
            sink: _Sink) -> tuple[Decisions, list[SimRequest]]:
    eng = Engine(model, sink, rng=np.random.default_rng(0))
    block = model.block_size
    reqs = [SimRequest(prompt_tokens=int(w.prompt_tokens[i]), max_tokens=int(w.output_tokens[i]),
                       block_hashes=prefix_hashes(int(w.prefix_id[i]),
                                                  int(w.prefix_tokens[i]) // block),
                       arrival=float(w.arrival_ms[i]) / 1e3)
            for i in range(len(w))]
    name: dict[Seq, int] = {r.seq: i for i, r in enumerate(reqs)}
    steps: Decisions = []
    current: list[Batch] = []

    class Plan:
        def submit(self, i: int, now: float) -> None:
            eng.submit(reqs[i], now)

        def step(self, now: float) -> float | None:
            batch = eng.plan(now)
            if batch is None:
                return None
            steps.append(_record(batch, name))
            current[:] = [batch]
            return eng.duration_s(batch)

    _run(w, Plan(), lambda now: eng.complete(current[0], now))
    return steps, reqs


def _timeline(r: SimRequest) -> Timeline:
    """What the server streamed to the client: tokens per emission, at the emission times."""
    tokens: list[int] = []
    while (t := r.events.get_nowait()) is not None:
        tokens.append(t)
    return list(zip(r.emissions, tokens, strict=True))


def _assert_same_run(model: EngineModel, w: serving.RequestStream) -> _SimRun:
    sim = _simulator(model, w)
    sink = _Sink()
    server_steps, reqs = _server(model, w, sink)
    assert server_steps == sim.steps  # admission, chunks, decodes and preemption order
    for i, r in enumerate(reqs):
        assert r.finished and r.generated == w.output_tokens[i]
        assert _timeline(r) == sim.timelines[i]  # every token at the same time
        assert r.emissions[0] == sim.trace.first_token[i]
        assert r.emissions[-1] == sim.trace.finish[i]
        assert r.preemptions == sim.trace.preemptions[i]
        assert math.isclose(r.scheduled, sim.trace.first_scheduled[i])
    assert sink.spec == sim.spec  # step by step, the accepted drafts that were emitted
    return sim


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sim_server_engine_takes_the_simulators_every_decision(model, seed):
    sim = _assert_same_run(model, _workload(seed))
    assert all(t == 1 for line in sim.timelines for _, t in line)
    assert sim.spec == []


# method, k, predictability: acceptance a = 0.58, 0.88 (EAGLE-3) and 0.15 (n-gram).
@pytest.mark.parametrize(("method", "k", "predictability"),
                         [("eagle3", 1, 0.0), ("eagle3", 3, 1.0), ("ngram", 3, 0.25)])
def test_with_speculation_both_draw_the_same_verify_steps(method, k, predictability):
    worker = dataclasses.replace(LLAMA.worker, spec_method=method, spec_k=k)
    model = _small_cache(dataclasses.replace(LLAMA, worker=worker), predictability)
    assert model.speculation is not None and 0.0 < model.speculation.acceptance < 1.0
    sim = _assert_same_run(model, _workload(2))
    assert sum(sim.trace.preemptions) > 0  # a draw replaced on recompute is redrawn alike
    # The scenario draws every outcome of a verify step, none accepted to all k accepted.
    decode_tokens = {t for line in sim.timelines for _, t in line[1:]}
    assert decode_tokens == set(range(1, k + 2))
    drafts, draft_tokens, accepted = np.sum(sim.spec, axis=0)
    assert draft_tokens == k * drafts and 0 < accepted < draft_tokens


def test_the_scenario_exercises_preemption_and_partial_prefix_hits(model):
    trace = _simulator(model, _workload(0)).trace
    assert sum(trace.preemptions) > 0
    cached = np.asarray(trace.cached_tokens)
    hits = cached[cached > 0]
    assert len(hits) > 10
    # 300-token prefixes cache 18 full blocks; eviction takes tails, so some hits are partial.
    assert np.any(hits % (18 * 16) != 0)


def test_an_sglang_sim_server_engine_schedules_as_the_simulators_sglang_does():
    """The sim-server runs the policy of its engine (SGLang: prefill-first batches, the
    reservation's retractions, lpm order), through the same core as the simulator."""
    model = _small_cache(dataclasses.replace(LLAMA, engine=ServingEngine.SGLANG))
    assert model.engine.policy.prefill_first
    sim = _assert_same_run(model, _workload(0))
    assert sum(sim.trace.preemptions) > 0
