"""One simulated vLLM engine in real time: continuous batching with chunked prefill.

The sim-server hands requests to a `Replica` (one `Engine` per attention DP rank); each engine
is an asyncio task that repeats vLLM V1's scheduling step:

1. running requests, oldest first, decodes before prefills (as perf.latency models it): a
   decoding one takes its q tokens of the step's `max_num_batched_tokens` budget (q = 1, or
   k + 1 verifying k drafts), a prefilling one the next chunk of its prompt; when KV blocks
   run out the newest running request is preempted (recompute: its blocks are freed and it
   goes back to the front of the queue);
2. waiting requests, first come first served, while budget, seats (`max_num_seqs`) and KV
   blocks last; the prefix cache (prefix_cache.py) supplies the leading blocks it holds;
3. the step's duration comes from the engine model (engine_model.py), times `time_scale`;
   the task sleeps until the step's end, then emits the tokens: one per finished prefill and
   per decode, 1..k+1 per speculative verify step.

Steps are timed against a virtual deadline, not slept back to back, so asyncio's timer jitter
does not accumulate: the token rate over many steps is the model's. Each finished request
reports its measured TTFT, inter-token gaps, end-to-end and queue times to the metrics sink.
Outputs always run to `max_tokens` (the simulator has no end-of-sequence token).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trilemma.simfleet.engine_model import EngineModel
from trilemma.simfleet.prefix_cache import BlockPool

_log = logging.getLogger(__name__)

# How far the step clock may trail the wall clock (s) before the lag is forgiven rather than
# made up with back-to-back steps: a stalled event loop would otherwise release a burst.
MAX_LAG_S = 0.05
FINISHED_REASON = "length"  # every request stops at max_tokens


class MetricsSink(Protocol):
    """What the engines report to: vllm_metrics.EngineMetrics, or a test's recorder."""

    def request_finished(self, *, prompt_tokens: int, output_tokens: int, cached_tokens: int,
                         ttft_s: float, inter_token_s: Sequence[float], e2e_s: float,
                         queue_s: float, finished_reason: str = "stop") -> None: ...

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None: ...

    def set_load(self, *, running: int, waiting: int, kv_cache_usage: float) -> None: ...


@dataclass(eq=False, kw_only=True)
class SimRequest:
    """A request inside the engine; the server reads `events` (tokens per emission, then
    None) and the timestamps (event-loop seconds)."""

    prompt_len: int
    block_hashes: tuple[int, ...]  # chained hashes of the prompt's full blocks
    max_tokens: int
    arrival: float  # when the server received it
    events: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    target: int = 0  # tokens to hold KV for before the next token is sampled
    computed: int = 0  # tokens whose KV is computed
    generated: int = 0
    held: list[int] = field(default_factory=list)  # cached prompt blocks in use, in order
    own: int = 0  # private blocks
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at first scheduling
    enqueued: float = math.nan
    scheduled: float = math.nan
    emissions: list[float] = field(default_factory=list)  # when tokens left the engine
    token_gaps: list[float] = field(default_factory=list)  # one per output token after the 1st
    preemptions: int = 0
    engine: int = -1  # DP rank serving it, once dispatched
    finished: bool = False
    aborted: bool = False

    @property
    def blocks(self) -> int:
        return len(self.held) + self.own

    @property
    def ttft_s(self) -> float:
        return self.emissions[0] - self.arrival if self.emissions else math.nan


@dataclass(kw_only=True)
class _Step:
    decodes: list[SimRequest]
    chunks: list[tuple[SimRequest, int]]


class Engine:
    """One attention DP rank's scheduler, KV blocks and step clock."""

    def __init__(self, model: EngineModel, sink: MetricsSink, *, rng: np.random.Generator,
                 time_scale: float = 1.0, on_step: Callable[[], None] | None = None) -> None:
        self.model = model
        self.sink = sink
        self.rng = rng
        self.time_scale = time_scale
        self.on_step = on_step
        self.block = model.block_size
        self.pool = BlockPool(model.kv_blocks)
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[SimRequest, None] = {}  # insertion order = scheduling priority
        self.steps = 0
        self.busy_s = 0.0  # modelled (scaled) step time so far
        self._wake = asyncio.Event()

    # ---- requests in and out -----------------------------------------------------------------

    def submit(self, req: SimRequest, now: float) -> None:
        if req.aborted:
            return
        req.target = req.prompt_len
        req.enqueued = now
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: drop the request wherever it is."""
        if req.finished or req.aborted:
            return
        req.aborted = True
        if req in self.running:
            del self.running[req]
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _free(self, req: SimRequest) -> None:
        self.pool.release(req.held)
        self.pool.give_back(req.own)
        req.held = []
        req.own = 0

    def _preempt(self, req: SimRequest) -> None:
        del self.running[req]
        self._free(req)
        req.computed = 0
        req.target = req.prompt_len + req.generated
        req.preemptions += 1
        self.waiting.appendleft(req)

    def _allocate(self, req: SimRequest, need: int) -> bool:
        """`need` more blocks for `req`, preempting from the back; False if `req` itself was."""
        while not self.pool.allocate(need):
            victim = next(reversed(self.running))
            self._preempt(victim)
            if victim is req:
                return False
        req.own += max(need, 0)
        return True

    # ---- one step ----------------------------------------------------------------------------

    def plan(self, now: float) -> _Step | None:
        """Choose this step's work (and take its KV blocks); None when there is none."""
        block = self.block
        q = self.model.tokens_per_decode
        budget = self.model.token_budget
        step = _Step(decodes=[], chunks=[])
        preempted = False
        # Running decodes first, then running prefills (the order perf.latency assumes).
        for decoding in (True, False):
            for req in list(self.running):
                if req not in self.running or (req.computed >= req.target) != decoding:
                    continue  # preempted earlier in this pass, or not of this kind
                new = q if decoding else min(req.target - req.computed, budget)
                if new > budget or new <= 0:
                    break
                before = len(self.running)
                if not self._allocate(req, -(-(req.computed + new) // block) - req.blocks):
                    preempted = True
                    continue
                preempted = preempted or len(self.running) < before
                budget -= new
                if decoding:
                    step.decodes.append(req)
                else:
                    step.chunks.append((req, new))
        if preempted:
            # A victim may have been planned already: it no longer runs this step.
            step.decodes = [r for r in step.decodes if r in self.running]
            step.chunks = [(r, n) for r, n in step.chunks if r in self.running]
        # vLLM admits nothing new in a step that had to preempt.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.model.seats):
            req = self.waiting[0]
            hit = 0
            if self.model.prefix_caching:
                # At least the last prompt token is computed: its logits give the first token.
                hit = self.pool.lookup(req.block_hashes[:(req.target - 1) // block])
            hashes = req.block_hashes[:hit]
            self.pool.acquire(hashes)
            start = hit * block
            new = min(req.target - start, budget)
            need = -(-(start + new) // block) - hit
            if not self.pool.allocate(need):
                self.pool.release(hashes)
                break
            self.waiting.popleft()
            self.running[req] = None
            req.held, req.own, req.computed = list(hashes), need, start
            if math.isnan(req.scheduled):
                req.scheduled = now
                req.cached_tokens = start
            budget -= new
            step.chunks.append((req, new))
        if not step.decodes and not step.chunks:
            return None
        return step

    def duration_s(self, step: _Step) -> float:
        d = len(step.decodes)
        s = len(step.chunks)
        # A decode attends over prompt + generated tokens (FastEngine's convention).
        kv = sum(r.computed + 1 for r in step.decodes) / d if d else 0.0
        p = sum(n for _, n in step.chunks)
        c = sum(r.computed + n for r, n in step.chunks) / s if s else 0.0
        ms = self.model.step_ms(decodes=d, decode_kv=kv, prefill_tokens=p, prefill_seqs=s,
                                prefill_context=c)
        return ms / 1e3 * self.time_scale

    def complete(self, step: _Step, now: float) -> None:
        """The step ended at `now`: move KV forward, emit tokens, finish requests."""
        if step.decodes:
            tokens = self.model.verify_tokens(self.rng, len(step.decodes)).tolist()
            accepted = 0
            for req, t in zip(step.decodes, tokens, strict=True):
                if req.aborted:
                    continue
                t = min(t, req.max_tokens - req.generated)
                accepted += t - 1
                req.computed += t
                self._emit(req, t, now)
            if self.model.spec_k:
                n = len(step.decodes)
                self.sink.spec_decode(drafts=n, draft_tokens=n * self.model.spec_k,
                                      accepted_tokens=accepted)
        for req, new in step.chunks:
            if req.aborted:
                continue
            req.computed += new
            self._register_prefix(req)
            if req.computed >= req.target:
                self._emit(req, 1, now)

    def _emit(self, req: SimRequest, tokens: int, now: float) -> None:
        if req.emissions:
            # Tokens of one verify step share its gap, so the gaps sum to e2e - TTFT and
            # per-token quantiles weigh each token once (as the metrics expect).
            req.token_gaps.extend([(now - req.emissions[-1]) / tokens] * tokens)
        req.generated += tokens
        req.emissions.append(now)
        req.events.put_nowait(tokens)
        if req.generated >= req.max_tokens:
            self._finish(req, now)

    def _register_prefix(self, req: SimRequest) -> None:
        if not self.model.prefix_caching:
            return
        full = min(req.computed, req.prompt_len) // self.block
        while len(req.held) < min(full, len(req.block_hashes)):
            h = req.block_hashes[len(req.held)]
            if not self.pool.register(h):
                # Computed concurrently by another request: share its copy, free ours.
                self.pool.acquire([h])
                self.pool.give_back(1)
            req.own -= 1
            req.held.append(h)

    def _finish(self, req: SimRequest, now: float) -> None:
        del self.running[req]
        self._free(req)
        req.finished = True
        req.events.put_nowait(None)
        self.sink.request_finished(
            prompt_tokens=req.prompt_len, output_tokens=req.generated,
            cached_tokens=req.cached_tokens, ttft_s=req.ttft_s, inter_token_s=req.token_gaps,
            e2e_s=now - req.arrival, queue_s=req.scheduled - req.enqueued,
            finished_reason=FINISHED_REASON)

    # ---- the clock ---------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            now = loop.time()
            step = self.plan(now)
            if step is None:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
                continue
            duration = self.duration_s(step)
            deadline = max(deadline, now - MAX_LAG_S) + duration
            # sleep(0) still yields, so the server's handlers run between back-to-back steps.
            await asyncio.sleep(max(deadline - loop.time(), 0.0))
            self.steps += 1
            self.busy_s += duration
            self.complete(step, loop.time())
            if self.on_step is not None:
                self.on_step()


def _log_crash(task: asyncio.Task[None]) -> None:
    # Requests on a dead engine never finish: say why at once, not only at stop().
    if not task.cancelled() and task.exception() is not None:
        _log.error("simulated engine crashed", exc_info=task.exception())


class Replica:
    """One replica: an Engine per attention DP rank behind a least-loaded dispatcher.

    A request enters its engine `request_overhead_ms` (scaled) after it arrives, the time
    vLLM's API server spends on HTTP and tokenization before the engine sees it.
    """

    def __init__(self, model: EngineModel, sink: MetricsSink, *, seed: int = 0,
                 time_scale: float = 1.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.model = model
        self.sink = sink
        self.time_scale = time_scale
        self.engines = [Engine(model, sink, rng=np.random.default_rng([seed, rank]),
                               time_scale=time_scale, on_step=self._report_load)
                        for rank in range(model.engines)]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._report_load()
        self._tasks = [asyncio.get_running_loop().create_task(e.run()) for e in self.engines]
        for task in self._tasks:
            task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop the engines; an engine that had crashed re-raises its error here."""
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for result in results:
            if isinstance(result, Exception):
                raise result

    def submit(self, req: SimRequest) -> None:
        delay = self.model.request_overhead_ms / 1e3 * self.time_scale
        asyncio.get_running_loop().call_later(delay, self._dispatch, req)

    def _dispatch(self, req: SimRequest) -> None:
        if req.aborted:
            return
        # Fewest requests in the engine; ties to the lowest rank, so runs repeat exactly.
        rank = min(range(len(self.engines)),
                   key=lambda i: len(self.engines[i].running) + len(self.engines[i].waiting))
        req.engine = rank
        self.engines[rank].submit(req, asyncio.get_running_loop().time())
        self._report_load()

    def abort(self, req: SimRequest) -> None:
        if req.engine < 0:
            req.aborted = True
        else:
            self.engines[req.engine].abort(req)
            self._report_load()

    def _report_load(self) -> None:
        used = sum(e.pool.usage * e.pool.total for e in self.engines)
        total = sum(e.pool.total for e in self.engines)
        self.sink.set_load(running=sum(len(e.running) for e in self.engines),
                           waiting=sum(len(e.waiting) for e in self.engines),
                           kv_cache_usage=used / total)
