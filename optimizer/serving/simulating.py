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
from trilemma.optimizer.serving.engine import FastEngine, SeqState
from trilemma.optimizer.serving.reference import ReferenceEngine
from trilemma.optimizer.serving.requests import LoadMode, RequestStream
from trilemma.optimizer.serving.results import SimResult, Trace
from trilemma.optimizer.serving.scheduler import Role
from trilemma.optimizer.serving.steptable import DirectPricer, StepCost, StepTable

_ARRIVE, _DISPATCH, _KICK, _STEP, _TRANSFER = range(5)


class Method(enum.Enum):
    """How faithfully to run: all three take the same scheduling decisions."""

    FAST = "fast"  # fast engine, step times interpolated from a StepTable
    EXACT = "exact"  # fast engine, one perf-model call per step
    REFERENCE = "reference"  # the plain reference engine, one perf-model call per step


def max_context(workload: RequestStream, engine: EngineConfig) -> int:
    """The longest KV a request of the workload reaches on `engine` (speculative slots too)."""
    return int((workload.prompt_tokens + workload.output_tokens).max()) + engine.tokens_per_decode


def _check_fits(workload: RequestStream, pool: Pool, *, prefill_only: bool, field: str) -> None:
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


Engine = FastEngine | ReferenceEngine


def simulate(cluster: Cluster, workload: RequestStream, perf_model: StepCost,
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
    pricers = _Pricers(perf_model, workload, method, {} if tables is None else tables)
    run = _Run(cluster, workload, _Fleet(cluster, workload, pricers, method, rng))
    run.loop()
    trace = run.trace
    if any(math.isnan(t) for t in trace.finish):
        raise RuntimeError("simulation ended with unfinished requests")  # a scheduler bug
    return SimResult.from_trace(trace, prompt_tokens=workload.prompt_tokens,
                                output_tokens=workload.output_tokens,
                                engine_steps=[e.steps for e in run.fleet.engines],
                                engine_busy_ms=[e.busy_ms for e in run.fleet.engines],
                                step_evaluations=pricers.evaluations())


class _Pricers:
    """The step pricer of each engine configuration, and how many model calls they made."""

    def __init__(self, perf_model: StepCost, workload: RequestStream, method: Method,
                 tables: dict[EngineConfig, StepTable]) -> None:
        self.perf_model = perf_model
        self.workload = workload
        self.method = method
        self.tables = tables
        self.used: list[DirectPricer | StepTable] = []

    def __call__(self, cfg: EngineConfig) -> DirectPricer | StepTable:
        if self.method is not Method.FAST:
            direct = DirectPricer(self.perf_model, cfg)
            self.used.append(direct)
            return direct
        table = self.tables.get(cfg)
        longest = max_context(self.workload, cfg)
        if table is None or table.perf_model is not self.perf_model or table.kv_axis[-1] < longest:
            table = StepTable(self.perf_model, cfg, max_context=longest)
            self.tables[cfg] = table
        if table not in self.used:
            self.used.append(table)
        return table

    def evaluations(self) -> int:
        return sum(p.calls if isinstance(p, DirectPricer) else p.evaluations for p in self.used)


class _Fleet:
    """The engines of a run (decode or combined pool first, then the prefill pool) and their
    balancers."""

    def __init__(self, cluster: Cluster, workload: RequestStream, pricers: _Pricers, method: Method,
                 rng: np.random.Generator) -> None:
        self.workload = workload
        self.trace = Trace(len(workload))
        self.state = SeqState(workload)
        self.pricers = pricers
        self.method = method
        self.rng = rng
        main_role = Role.DECODE if cluster.disaggregated else Role.COMBINED
        self.engines = self._build(cluster.pool, main_role, 0)
        self.main_engines = len(self.engines)
        self.main_lb = LoadBalancer(cluster.pool.balancer, len(self.engines))
        self.entry_lb, self.first_prefill = self.main_lb, 0
        if cluster.prefill is not None:
            prefill = self._build(cluster.prefill, Role.PREFILL, len(self.engines))
            self.entry_lb = LoadBalancer(cluster.prefill.balancer, len(prefill))
            self.first_prefill = len(self.engines)
            self.engines = self.engines + prefill

    def _build(self, pool: Pool, role: Role, first: int) -> list[Engine]:
        price = self.pricers(pool.engine)
        # Engines past the n-th never receive a request: round robin sends request j to
        # engine j, and least-outstanding always finds one of the first n idle (at most n - 1
        # are busy) and breaks ties by the lowest index. Simulating n of them gives the same
        # result and keeps memory independent of the replica count (a pool may hold 100k).
        count = min(pool.engines, max(len(self.workload), 1))
        if self.method is Method.REFERENCE:
            return [ReferenceEngine(pool.engine, role=role, index=first + j,
                                    workload=self.workload, trace=self.trace, price=price,
                                    rng=self.rng) for j in range(count)]
        return [FastEngine(pool.engine, role=role, index=first + j, state=self.state,
                           trace=self.trace, price=price, rng=self.rng) for j in range(count)]


class _Run:
    """The event heap and what each kind of event does."""

    def __init__(self, cluster: Cluster, workload: RequestStream, fleet: _Fleet) -> None:
        self.fleet = fleet
        self.trace = fleet.trace
        self.transfer = cluster.transfer
        self.overhead = cluster.request_overhead_ms
        self.prompt = fleet.state.prompt
        n = len(workload)
        if workload.mode is LoadMode.OPEN:
            self.heap = [(t, j, _ARRIVE, j) for j, t in enumerate(workload.arrival_ms.tolist())]
        else:
            first = n if workload.mode is LoadMode.OFFLINE else min(workload.concurrency, n)
            self.heap = [(0.0, j, _ARRIVE, j) for j in range(first)]
        heapq.heapify(self.heap)
        self.counter = len(self.heap)
        self.next_row = self.counter  # closed loop: the next request a client sends
        self.closed = workload.mode is LoadMode.CLOSED
        self.n = n
        self.steps: list[tuple[float, int, int, int]] = []  # step ends of main-pool engines
        # Main-pool engines run ahead (the reference engine steps one by one).
        self.n_ahead = 0 if fleet.method is Method.REFERENCE else fleet.main_engines
        self.live = [-1] * len(fleet.engines)  # each engine's current step event (push order)
        self.source = [-1] * n  # prefill engine of each request (disaggregated)
        self.in_system = 0

    def push(self, t: float, kind: int, a: int) -> None:
        heapq.heappush(self.heap, (t, self.counter, kind, a))
        self.counter += 1

    def push_step(self, now: float, duration: float, e: int) -> None:
        """Engine e started a step. A main-pool engine then runs ahead through its
        decode-only steps (FastEngine.ahead): for sure up to the first event that could
        bring it work, tentatively beyond (`cut` takes back what work overtakes). Its step
        ends wait in their own heap: in open loop they create no event."""
        end = now + duration
        self.live[e] = self.counter
        if e < self.n_ahead:
            heap, steps = self.heap, self.steps
            limit = heap[0][0] if heap else math.inf
            if self.closed and steps:
                limit = min(limit, steps[0][0])  # a finish sends the next request
            eng = self.fleet.engines[e]
            assert isinstance(eng, FastEngine)
            end = eng.ahead(end, limit)
            heapq.heappush(steps, (end, self.counter, _STEP, e))
        else:
            heapq.heappush(self.heap, (end, self.counter, _STEP, e))
        self.counter += 1

    def cut(self, now: float, e: int) -> None:
        """Work reaches main-pool engine e: its tentative steps after `now` are taken back
        and its step event moves to the end of the step in flight (the old one goes stale)."""
        eng = self.fleet.engines[e]
        if e < self.n_ahead and eng.busy:
            assert isinstance(eng, FastEngine)
            end = eng.rewind(now)
            if end is not None:
                self.live[e] = self.counter
                heapq.heappush(self.steps, (end, self.counter, _STEP, e))
                self.counter += 1

    def loop(self) -> None:
        heap, steps, pop = self.heap, self.steps, heapq.heappop
        on_step, on_arrive, on_transfer = self.on_step, self.on_arrive, self.on_transfer
        engines, live = self.fleet.engines, self.live
        while heap or steps:
            # Both heaps as one: (time, push order) is unique.
            if steps and (not heap or steps[0] < heap[0]):
                now, c, kind, a = pop(steps)
            else:
                now, c, kind, a = pop(heap)
            if kind == _STEP:
                if c != live[a]:
                    continue  # moved earlier by `cut`
                eng = engines[a]
                eng.busy = False
                finished, handed = eng.finish_step(now)
                if finished or handed:
                    on_step(now, a, finished, handed)
                duration = eng.start_step(now)
                if duration is not None:
                    eng.busy = True
                    self.push_step(now, duration, a)
            elif kind == _ARRIVE:
                on_arrive(now, a)
            elif kind == _DISPATCH:
                self.dispatch(now, a)
            elif kind == _TRANSFER:
                on_transfer(now, a)
            else:  # _KICK
                eng = engines[a]
                eng.kick_pending = False
                if not eng.busy:
                    self.start(now, a)

    def start(self, now: float, e: int) -> None:
        """Engine e is idle: start its next step, if it has work."""
        eng = self.fleet.engines[e]
        duration = eng.start_step(now)
        if duration is not None:
            eng.busy = True
            self.push_step(now, duration, e)

    def kick(self, now: float, e: int) -> None:
        """Engine e got work: if idle, let it step once every event of this instant is in."""
        eng = self.fleet.engines[e]
        if not eng.busy and not eng.kick_pending:
            eng.kick_pending = True
            self.push(now, _KICK, e)

    def on_step(self, now: float, e: int, finished: list[int], handed: list[int]) -> None:
        """Engine e's step ended with requests done: send the next requests of closed-loop
        clients, hand finished prefills to the KV link."""
        fleet = self.fleet
        if finished:
            for _ in finished:
                fleet.main_lb.done(e)
                self.in_system -= 1
                if self.closed and self.next_row < self.n:
                    self.push(now, _ARRIVE, self.next_row)
                    self.next_row += 1
            self.trace.occupancy_ms.append(now)
            self.trace.occupancy.append(self.in_system)
        for i in handed:
            fleet.entry_lb.done(e - fleet.first_prefill)
            assert self.transfer is not None
            self.source[i] = e
            self.push(now + self.transfer.ms(self.prompt[i]), _TRANSFER, i)

    def on_arrive(self, now: float, i: int) -> None:
        trace = self.trace
        trace.arrival[i] = now
        self.in_system += 1
        trace.occupancy_ms.append(now)
        trace.occupancy.append(self.in_system)
        if self.overhead > 0.0:
            self.push(now + self.overhead, _DISPATCH, i)
        else:
            self.dispatch(now, i)

    def dispatch(self, now: float, i: int) -> None:
        """Request i reaches the front end: its pool's balancer picks the engine."""
        fleet = self.fleet
        e = fleet.entry_lb.pick() + fleet.first_prefill
        self.cut(now, e)
        fleet.engines[e].submit(i)
        self.kick(now, e)

    def on_transfer(self, now: float, i: int) -> None:
        """Request i's KV reached the decode pool: free it on its prefill engine."""
        fleet = self.fleet
        fleet.engines[self.source[i]].release(i)
        self.kick(now, self.source[i])
        e = fleet.main_lb.pick()
        self.cut(now, e)
        fleet.engines[e].submit_transferred(i)
        self.kick(now, e)
