"""One scheduler, two clocks: the sim-server's engine (asyncio driver) and the simulator's
reference engine (event-heap driver) take the same decisions on the same requests and step
times, so the closed-loop tests measure the model the planner searches with."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import pytest

from trilemma.optimizer import serving
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


class _Sink:
    def request_finished(self, **kw: object) -> None:
        pass

    def spec_decode(self, **kw: object) -> None:
        pass

    def set_load(self, **kw: object) -> None:
        pass


@pytest.fixture(scope="module")
def model() -> EngineModel:
    # A small cache: requests preempt each other and shared prefixes get evicted.
    return EngineModel(LLAMA, kv_blocks=150, request_overhead_ms=0.0)


def _workload(seed: int) -> serving.Workload:
    return serving.sample_workload(
        np.random.default_rng(seed), requests=80,
        prompt=serving.Lognormal(mean=500, p90=800, high=1200),
        output=serving.Lognormal(mean=60, p90=110, high=200),
        arrivals=serving.Poisson(rate_per_s=40.0),
        prefix=serving.PrefixReuse(tokens=300, share=0.7, prefixes=3))


class _Driver(Protocol):
    def submit(self, i: int, now: float) -> None: ...

    def step(self, now: float) -> float | None: ...


def _run(w: serving.Workload, plan: _Driver, finish: Callable[[float], object]) -> None:
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


def _simulator(model: EngineModel, w: serving.Workload) -> tuple[Decisions, Trace]:
    trace = Trace(len(w))
    eng = ReferenceEngine(model.engine, role=Role.COMBINED, index=0, workload=w, trace=trace,
                          price=lambda d, kv, p, s, c: model.step_ms(
                              decodes=d, decode_kv=kv, prefill_tokens=p, prefill_seqs=s,
                              prefill_context=c) / 1e3,
                          rng=np.random.default_rng(0))
    steps: Decisions = []

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

    _run(w, Plan(), eng.finish_step)
    return steps, trace


def _server(model: EngineModel, w: serving.Workload) -> tuple[Decisions, list[SimRequest]]:
    eng = Engine(model, _Sink(), rng=np.random.default_rng(0))
    block = model.block_size
    reqs = [SimRequest(prompt_len=int(w.prompt_tokens[i]), max_tokens=int(w.output_tokens[i]),
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


@pytest.mark.parametrize("seed", [0, 1])
def test_the_sim_server_engine_takes_the_simulators_every_decision(model, seed):
    w = _workload(seed)
    sim_steps, trace = _simulator(model, w)
    server_steps, reqs = _server(model, w)
    assert server_steps == sim_steps  # admission, chunks, decodes and preemption order
    for i, r in enumerate(reqs):
        assert r.finished and r.generated == w.output_tokens[i]
        assert r.emissions[0] == trace.first_token[i] and r.emissions[-1] == trace.finish[i]
        assert r.preemptions == trace.preemptions[i]
        assert math.isclose(r.scheduled, trace.first_scheduled[i])


def test_the_scenario_exercises_preemption_and_partial_prefix_hits(model):
    _, trace = _simulator(model, _workload(0))
    assert sum(trace.preemptions) > 0
    cached = np.asarray(trace.cached_tokens)
    hits = cached[cached > 0]
    assert len(hits) > 10
    # 300-token prefixes cache 18 full blocks; eviction takes tails, so some hits are partial.
    assert np.any(hits % (18 * 16) != 0)
