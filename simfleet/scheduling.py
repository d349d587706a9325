"""One simulated vLLM engine in real time: the optimizer's scheduler core on asyncio.

The sim-server hands requests to a `Replica` (one `Engine` per attention DP rank); each engine
is an asyncio task that asks the scheduler core (trilemma.optimizer.serving.scheduler, the
same vLLM V1 admission, preemption, chunked prefill and block-hash prefix cache the planner's
simulator runs) what the next step computes, and keeps only what is real-time:

* the step's duration comes from the engine model (engine_model.py), times `time_scale`; the
  task sleeps until the step's end, timed against a virtual deadline, not slept back to back,
  so asyncio's timer jitter does not accumulate: the token rate over many steps is the
  model's;
* then it emits the tokens: one per finished prefill and per decode, 1..k+1 per speculative
  verify step, drawn as the simulator draws them (`scheduler.VerifyDraws`: all of a request's
  verify steps when it starts decoding), so one seed gives both the same run;
* each finished request reports its measured TTFT, inter-token gaps, end-to-end and queue
  times to the metrics sink.
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

from trilemma.optimizer.serving.blockpool import BlockHash, BlockPool
from trilemma.optimizer.serving.scheduler import Batch, Limits, Scheduler, Seq, VerifyDraws
from trilemma.simfleet.engine_model import EngineModel

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
    None) and the timestamps (event-loop seconds). Its scheduling state is `seq`."""

    prompt_tokens: int
    block_hashes: tuple[BlockHash, ...]  # chained hashes of the prompt's full blocks
    max_tokens: int
    arrival: float  # when the server received it
    events: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    seq: Seq = field(init=False)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at first scheduling
    enqueued: float = math.nan
    scheduled: float = math.nan
    emissions: list[float] = field(default_factory=list)  # when tokens left the engine
    token_gaps: list[float] = field(default_factory=list)  # one per output token after the 1st
    preemptions: int = 0
    engine: int = -1  # DP rank serving it, once dispatched
    finished: bool = False
    aborted: bool = False

    def __post_init__(self) -> None:
        self.seq = Seq(index=0, prompt=self.prompt_tokens, output=self.max_tokens,
                       hashes=self.block_hashes)

    @property
    def generated(self) -> int:
        return self.seq.generated

    @property
    def ttft_s(self) -> float:
        return self.emissions[0] - self.arrival if self.emissions else math.nan


def limits(model: EngineModel) -> Limits:
    """The scheduler core's view of a simulated engine."""
    return Limits(kv_blocks=model.kv_blocks, block_size=model.block_size,
                  token_budget=model.token_budget, seats=model.seats,
                  tokens_per_decode=model.tokens_per_decode,
                  prefix_caching=model.prefix_caching, policy=model.engine.policy)


class Engine:
    """One attention DP rank: the scheduler core, its step clock and its token emission."""

    def __init__(self, model: EngineModel, sink: MetricsSink, *, rng: np.random.Generator,
                 time_scale: float = 1.0, on_step: Callable[[], None] | None = None) -> None:
        self.model = model
        self.sink = sink
        self.time_scale = time_scale
        self.on_step = on_step
        self.core = Scheduler(limits(model))
        self.draws = VerifyDraws(model.speculation, rng)
        self._requests: dict[Seq, SimRequest] = {}
        self.steps = 0
        self.busy_s = 0.0  # modelled (scaled) step time so far
        self._wake = asyncio.Event()

    @property
    def pool(self) -> BlockPool:
        return self.core.pool

    @property
    def running(self) -> dict[Seq, None]:
        return self.core.running

    @property
    def waiting(self) -> deque[Seq]:
        return self.core.waiting

    # ---- requests in and out -----------------------------------------------------------------

    def submit(self, req: SimRequest, now: float) -> None:
        if req.aborted:
            return
        req.enqueued = now
        self._requests[req.seq] = req
        self.core.submit(req.seq)
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        """The client went away: drop the request wherever it is."""
        if req.finished or req.aborted:
            return
        req.aborted = True
        self.core.abort(req.seq)
        self.draws.forget(req.seq)
        self._requests.pop(req.seq, None)

    # ---- one step ----------------------------------------------------------------------------

    def plan(self, now: float) -> Batch | None:
        """Ask the core for this step's work (its KV blocks taken); None when there is none."""
        batch = self.core.schedule()
        if batch is None:
            return None
        for seq in batch.preempted:
            self._requests[seq].preemptions += 1
        for seq in batch.admitted:
            req = self._requests[seq]
            if math.isnan(req.scheduled):
                req.scheduled = now
                req.cached_tokens = seq.computed
        return batch

    def duration_s(self, batch: Batch) -> float:
        d, kv, p, s, c = batch.shape()
        ms = self.model.step_ms(decodes=d, decode_kv=kv, prefill_tokens=p, prefill_seqs=s,
                                prefill_context=c)
        return ms / 1e3 * self.time_scale

    def complete(self, batch: Batch, now: float) -> None:
        """The step ended at `now`: move KV forward, emit tokens, finish requests."""
        out = self.core.complete(batch, self.draws)
        self.draws.settle(out)
        if out.decoded and self.model.spec_k:
            # Per verify step: k drafts, and the accepted ones are the tokens emitted past the
            # target's own (an aborted request's step counts nowhere, as in vLLM).
            n = len(out.decoded)
            self.sink.spec_decode(drafts=n, draft_tokens=n * self.model.spec_k,
                                  accepted_tokens=sum(t - 1 for _, t in out.decoded))
        for seq, tokens in out.decoded:
            self._emit(self._requests[seq], tokens, now)
        for seq in out.sampled:
            self._emit(self._requests[seq], 1, now)
        for seq in out.finished:
            self._finish(self._requests.pop(seq), now)

    def _emit(self, req: SimRequest, tokens: int, now: float) -> None:
        if req.emissions:
            # Tokens of one verify step share its gap, so the gaps sum to e2e - TTFT and
            # per-token quantiles weigh each token once (as the metrics expect).
            req.token_gaps.extend([(now - req.emissions[-1]) / tokens] * tokens)
        req.emissions.append(now)
        req.events.put_nowait(tokens)

    def _finish(self, req: SimRequest, now: float) -> None:
        req.finished = True
        req.events.put_nowait(None)
        self.sink.request_finished(
            prompt_tokens=req.prompt_tokens, output_tokens=req.generated,
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
