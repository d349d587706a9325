"""The event loop: `simulate(cluster, workload, perf_model, rng) -> SimResult`.

Pops the earliest event, lets its engine, balancer or client act, pushes what follows. Events:
  ARRIVE    a client sends a request (open loop: at its stamp; closed loop: when one of its
            requests finishes; offline: all at 0);
  DISPATCH  the request reaches the front end after the request overhead; a balancer picks
            an engine of the pool (the prefill pool when disaggregated);
  KICK      an idle engine got work: schedule a step once every event of this instant is in;
  STEP      an engine's step ends: record tokens, hand finished prefills to the KV link,
            schedule the next step;
  TRANSFER  a request's KV reached its decode engine: the prefill engine frees its blocks.
Ties break by push order, so a run is a pure function of its inputs and the generator.
"""

from __future__ import annotations

import enum
import heapq
import math

import numpy as np

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.serving.cluster import Cluster, EngineConfig, LoadBalancer, Pool
from trilemma.optimizer.serving.engine import FastEngine, Role, SeqState
from trilemma.optimizer.serving.reference import ReferenceEngine
from trilemma.optimizer.serving.requests import LoadMode, Workload
from trilemma.optimizer.serving.results import SimResult, Trace
from trilemma.optimizer.serving.steptable import DirectPricer, Pricer, StepCost, StepTable

_ARRIVE, _DISPATCH, _KICK, _STEP, _TRANSFER = range(5)


class Method(enum.Enum):
    """How faithfully to run: all three take the same scheduling decisions."""

    FAST = "fast"  # fast engine, step times interpolated from a StepTable
    EXACT = "exact"  # fast engine, one perf-model call per step
    REFERENCE = "reference"  # the plain reference engine, one perf-model call per step


def max_context(workload: Workload, engine: EngineConfig) -> int:
    """The longest KV a request of the workload reaches on `engine` (speculative slots too)."""
    return int((workload.prompt_tokens + workload.output_tokens).max()) + engine.tokens_per_decode


def _check_fits(workload: Workload, pool: Pool, *, prefill_only: bool, field: str) -> None:
    """A request that cannot fit alone in an engine's KV would be preempted forever; vLLM
    refuses such prompts at the door (max_model_len), so do we."""
    e = pool.engine
    tokens = workload.prompt_tokens if prefill_only else (
        workload.prompt_tokens + workload.output_tokens - 1 + e.tokens_per_decode)
    blocks = -(-tokens // e.block_size)
    worst = int(np.argmax(blocks))
    if blocks[worst] > e.kv_blocks:
        raise InputError(field, e.kv_blocks,
                         f"request {worst} needs {int(blocks[worst])} KV blocks; the engine has "
                         f"{e.kv_blocks}")


def simulate(cluster: Cluster, workload: Workload, perf_model: StepCost,
             rng: np.random.Generator, *, method: Method = Method.FAST,
             tables: dict[EngineConfig, StepTable] | None = None) -> SimResult:
    """Run `workload` through `cluster`, pricing steps with `perf_model`.

    `rng` draws the speculative acceptances (nothing else is random once the workload is
    sampled). `tables` lets repeated runs on the same engines share their step tables: pass
    a dict, and tables built here are added to it.
    """
    _check_fits(workload, cluster.pool, prefill_only=False, field="kv_blocks")
    if cluster.prefill is not None:
        _check_fits(workload, cluster.prefill, prefill_only=True, field="prefill.kv_blocks")
    n = len(workload)
    trace = Trace(n)
    state = SeqState(workload)
    tables = {} if tables is None else tables
    pricers: list[DirectPricer | StepTable] = []

    def pricer(cfg: EngineConfig) -> Pricer:
        if method is not Method.FAST:
            direct = DirectPricer(perf_model, cfg)
            pricers.append(direct)
            return direct
        table = tables.get(cfg)
        if (table is None or table.perf_model is not perf_model
                or table.kv_axis[-1] < max_context(workload, cfg)):
            table = StepTable(perf_model, cfg, max_context=max_context(workload, cfg))
            tables[cfg] = table
        if table not in pricers:
            pricers.append(table)
        return table

    def build(pool: Pool, role: Role, first: int) -> list[FastEngine | ReferenceEngine]:
        price = pricer(pool.engine)
        # Engines past the n-th never receive a request: round robin sends request j to
        # engine j, and least-outstanding always finds one of the first n idle (at most n - 1
        # are busy) and breaks ties by the lowest index. Simulating n of them gives the same
        # result and keeps memory independent of the replica count (a pool may hold 100k).
        count = min(pool.engines, max(n, 1))
        if method is Method.REFERENCE:
            return [ReferenceEngine(pool.engine, role=role, index=first + j, workload=workload,
                                    trace=trace, price=price, rng=rng)
                    for j in range(count)]
        return [FastEngine(pool.engine, role=role, index=first + j, state=state, trace=trace,
                           price=price, rng=rng) for j in range(count)]

    main_role = Role.DECODE if cluster.disaggregated else Role.COMBINED
    engines = build(cluster.pool, main_role, 0)
    main_lb = LoadBalancer(cluster.pool.balancer, len(engines))
    if cluster.prefill is not None:
        prefill_engines = build(cluster.prefill, Role.PREFILL, len(engines))
        entry_lb = LoadBalancer(cluster.prefill.balancer, len(prefill_engines))
        first_prefill = len(engines)
        engines = engines + prefill_engines
    else:
        entry_lb, first_prefill = main_lb, 0
    transfer = cluster.transfer
    overhead = cluster.request_overhead_ms
    prompt = state.prompt

    heap: list[tuple[float, int, int, int]] = []
    counter = 0
    if workload.mode is LoadMode.OPEN:
        heap = [(t, j, _ARRIVE, j) for j, t in enumerate(workload.arrival_ms.tolist())]
        counter = n
    else:
        first = n if workload.mode is LoadMode.OFFLINE else min(workload.concurrency, n)
        heap = [(0.0, j, _ARRIVE, j) for j in range(first)]
        counter = first
    heapq.heapify(heap)
    next_row = counter  # closed loop: the next request a client sends
    closed = workload.mode is LoadMode.CLOSED
    source = [-1] * n  # prefill engine of each request (disaggregated)
    in_system = 0
    occ_t, occ_n = trace.occupancy_ms, trace.occupancy
    push, pop = heapq.heappush, heapq.heappop

    while heap:
        now, _, kind, a = pop(heap)
        if kind == _STEP:
            eng = engines[a]
            eng.busy = False
            finished, handed = eng.finish_step(now)
            for _ in finished:
                main_lb.done(a)
                in_system -= 1
                if closed and next_row < n:
                    push(heap, (now, counter, _ARRIVE, next_row))
                    counter += 1
                    next_row += 1
            if finished:
                occ_t.append(now)
                occ_n.append(in_system)
            for i in handed:
                entry_lb.done(a - first_prefill)
                assert transfer is not None
                source[i] = a
                push(heap, (now + transfer.ms(prompt[i]), counter, _TRANSFER, i))
                counter += 1
            duration = eng.start_step(now)
            if duration is not None:
                eng.busy = True
                push(heap, (now + duration, counter, _STEP, a))
                counter += 1
            continue
        if kind == _ARRIVE:
            trace.arrival[a] = now
            in_system += 1
            occ_t.append(now)
            occ_n.append(in_system)
            if overhead > 0.0:
                push(heap, (now + overhead, counter, _DISPATCH, a))
                counter += 1
                continue
            kind = _DISPATCH
        if kind == _DISPATCH:
            e = entry_lb.pick() + first_prefill
            engines[e].submit(a)
        elif kind == _TRANSFER:
            src = engines[source[a]]
            src.release(a)
            if not src.busy and not src.kick_pending:
                src.kick_pending = True
                push(heap, (now, counter, _KICK, source[a]))
                counter += 1
            e = main_lb.pick()
            engines[e].submit_transferred(a)
        else:  # _KICK
            eng = engines[a]
            eng.kick_pending = False
            if not eng.busy:
                duration = eng.start_step(now)
                if duration is not None:
                    eng.busy = True
                    push(heap, (now + duration, counter, _STEP, a))
                    counter += 1
            continue
        eng = engines[e]
        if not eng.busy and not eng.kick_pending:
            eng.kick_pending = True
            push(heap, (now, counter, _KICK, e))
            counter += 1

    if any(math.isnan(t) for t in trace.finish):
        raise RuntimeError("simulation ended with unfinished requests")  # a scheduler bug
    evaluations = sum(p.calls if isinstance(p, DirectPricer) else p.evaluations
                      for p in pricers)
    return SimResult.from_trace(trace, prompt_tokens=workload.prompt_tokens,
                                output_tokens=workload.output_tokens,
                                engine_steps=[e.steps for e in engines],
                                engine_busy_ms=[e.busy_ms for e in engines],
                                step_evaluations=evaluations)
