"""The reference engine: the scheduler core (scheduler.py) on the simulator's event heap.

The slow, plain path: one `Seq` object per request, one call into the core per step, the
step priced by the perf model and the trace written from what the core reports.
`engine.FastEngine` must reproduce its every decision (the unit tests compare the two
timestamp for timestamp).

With speculation, a request draws the tokens of every verify step of its decode when it
starts decoding (`scheduler.VerifyDraws`, one uniform per remaining token), which is the same
distribution as drawing step by step and lets the fast engine plan ahead with the same random
numbers; the sim-server draws the same way.
"""

from __future__ import annotations

import numpy as np

from trilemma.optimizer.serving.blockpool import prefix_hashes
from trilemma.optimizer.serving.cluster import EngineConfig
from trilemma.optimizer.serving.requests import RequestStream
from trilemma.optimizer.serving.results import Trace
from trilemma.optimizer.serving.scheduler import (
    Batch,
    Limits,
    Role,
    Scheduler,
    Seq,
    VerifyDraws,
)
from trilemma.optimizer.serving.steptable import Pricer


def limits(cfg: EngineConfig) -> Limits:
    """The scheduler's view of an engine configuration."""
    return Limits(kv_blocks=cfg.kv_blocks, block_size=cfg.block_size,
                  token_budget=cfg.max_num_batched_tokens, seats=cfg.seats,
                  tokens_per_decode=cfg.tokens_per_decode, policy=cfg.policy)


class ReferenceEngine:
    def __init__(self, cfg: EngineConfig, *, role: Role, index: int, workload: RequestStream,
                 trace: Trace, price: Pricer, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.index = index
        self.workload = workload
        self.trace = trace
        self.price = price
        self.core = Scheduler(limits(cfg), role=role)
        self.draws = VerifyDraws(cfg.speculation, rng)
        self.batch: Batch | None = None
        self.busy = False
        self.kick_pending = False
        self.steps = 0
        self.busy_ms = 0.0

    # ---- requests in and out ---------------------------------------------------------------

    def _new(self, i: int) -> Seq:
        w = self.workload
        blocks = int(w.prefix_tokens[i]) // self.cfg.block_size
        return Seq(index=i, prompt=int(w.prompt_tokens[i]), output=int(w.output_tokens[i]),
                   hashes=prefix_hashes(int(w.prefix_id[i]), blocks))

    def submit(self, i: int) -> None:
        self.core.submit(self._new(i))

    def submit_transferred(self, i: int) -> None:
        self.core.submit(self._new(i), kv_ready=True)

    def release(self, i: int) -> None:
        self.core.release(i)

    # ---- one step ----------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        batch = self.core.schedule()
        if batch is None:
            return None
        trace = self.trace
        for seq in batch.preempted:
            trace.preemptions[seq.index] += 1
        for seq in batch.admitted:
            if not seq.kv_ready:
                trace.cached_tokens[seq.index] += seq.computed
            if trace.first_scheduled[seq.index] != trace.first_scheduled[seq.index]:
                trace.first_scheduled[seq.index] = now  # still NaN: first time
        self.batch = batch
        duration = self.price(*batch.shape())
        self.steps += 1
        self.busy_ms += duration
        return duration

    def finish_step(self, now: float) -> tuple[list[int], list[int]]:
        assert self.batch is not None
        out = self.core.complete(self.batch, self.draws)
        self.draws.settle(out)
        self.batch = None
        trace = self.trace
        for seq in out.sampled:
            if seq.generated == 1:
                trace.first_token[seq.index] = now
        for seq in out.finished:
            trace.finish[seq.index] = now
            trace.engine[seq.index] = self.index
        return [s.index for s in out.finished], [s.index for s in out.handed]
