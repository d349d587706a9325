"""The fast engine: the scheduler core's decisions at O(1) cost per step.

`scheduler.Scheduler` (driven by `reference.ReferenceEngine`) is the specification; this class
must take the same decision at every step (the unit tests compare whole runs timestamp for
timestamp). What makes it fast is that a decoding request needs no attention between the step
it starts decoding and the step it finishes, except for a KV block every `block_size` tokens.
So when a request starts decoding, its whole decode is planned at once:

* without speculation every step yields one token: the finishing step is known, and the
  steps at which it needs a new block are those where (prompt + generated - 1) is a multiple
  of the block size; requests are counted by that residue, so one lookup gives the blocks all
  decodes need at a step;
* with speculation, the tokens of each verify step are drawn up front (`verify_yields`, as
  the core's drivers draw them), and the tokens and blocks per step are added into per-step
  arrays with numpy.

Per step the engine then reads the block need of all decodes in one lookup, allocates it in
one go, and moves the sum of KV lengths forward by the tokens of the step. Only when blocks
run out does it fall back to the core's request-by-request pass to pick the victims. The KV
blocks and prefix cache are `prefixruns.PrefixRuns`, which takes the core's
`blockpool.BlockPool` decisions (a request's cached blocks are a leading run of its prefix's
chain, so a count per request says which it holds, and the pool needs a few integers per
prefix instead of a dict entry per block).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable

import numpy as np

from trilemma.optimizer.serving import decodeplan, fastfirst
from trilemma.optimizer.serving.cluster import EngineConfig
from trilemma.optimizer.serving.decodeplan import decoder_need, drop_decoder
from trilemma.optimizer.serving.fastfirst import PrefillFirstState
from trilemma.optimizer.serving.policy import TokenRatio
from trilemma.optimizer.serving.prefixruns import PrefixRuns
from trilemma.optimizer.serving.results import Trace
from trilemma.optimizer.serving.scheduler import Role
from trilemma.optimizer.serving.seqstate import SeqState
from trilemma.optimizer.serving.steptable import DirectPricer, StepTable

__all__ = ["FastEngine", "Role", "SeqState"]  # SeqState lives in seqstate.py
# Tentative steps past the last sure one: enough to skip the arrivals that go to other
# replicas, few enough that the ones taken back (work came first) stay cheap. Measured on
# the bench cases: 24-32 beats none by ~10% and unlimited by ~10%.
_TENTATIVE = 32


class FastEngine:
    def __init__(self, cfg: EngineConfig, *, role: Role, index: int, state: SeqState,
                 trace: Trace, price: DirectPricer | StepTable, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.role = role
        self.index = index
        self.st = state
        self.trace = trace
        self.price = price
        self.rng = rng
        self.spec = cfg.speculation
        self.q = cfg.tokens_per_decode
        self.block = cfg.block_size
        self.seats = cfg.seats
        self.kv = PrefixRuns(cfg.kv_blocks)
        self.running: dict[int, None] = {}  # insertion order = scheduling priority
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []  # running requests still prefilling, oldest first
        self.chunks: list[tuple[int, int]] = []  # this step's (request, prefill tokens)
        self.tick = 0  # index of the current step
        self.n_dec = 0  # requests decoding
        self.ctx_sum = 0  # their KV lengths (prompt + generated), summed
        self.residues = [0] * self.block
        self.finishing: dict[int, list[int]] = {}
        self.plan_tokens = np.zeros(0, dtype=np.int64)
        self.plan_blocks = np.zeros(0, dtype=np.int64)
        self.busy = False
        self.kick_pending = False
        self._run: tuple[int, list[tuple[float, int, float, int]]] | None = None  # tentative
        self.steps = 0
        self.busy_ms = 0.0
        # Prefill-first (SGLang) state, None under vLLM. One attribute: past 30 instance
        # attributes CPython stops sharing their keys and every `self.x` gets slower (the
        # vLLM path measured 7% slower with them spread out).
        reservation = cfg.policy.reservation
        self.pf = (PrefillFirstState(TokenRatio(reservation))
                   if cfg.policy.prefill_first and reservation is not None else None)

    # ---- requests in and out -----------------------------------------------------------------

    def submit(self, i: int) -> None:
        st = self.st
        st.generated[i] = st.computed[i] = 0
        st.target[i] = st.prompt[i]
        st.kv_ready[i] = False
        self.waiting.append(i)

    def submit_transferred(self, i: int) -> None:
        st = self.st
        st.generated[i] = 0
        st.target[i] = st.prompt[i]
        st.kv_ready[i] = True
        self.waiting.append(i)

    def release(self, i: int) -> None:
        self._free(i)

    def _free(self, i: int) -> None:
        st = self.st
        if st.held[i]:
            self.kv.release(st.prefix_id[i], st.held[i])
        self.kv.give_back(st.own[i])
        st.own[i] = st.held[i] = 0

    def _finish(self, i: int, now: float) -> None:
        if self.pf is not None:
            self.pf.full = False  # the running batch shrank
        del self.running[i]
        self._free(i)
        self.trace.finish[i] = now
        self.trace.engine[i] = self.index

    def _preempt(self, i: int) -> None:
        st = self.st
        if st.decoding[i]:
            self.finishing[st.finish_step[i]].remove(i)
            drop_decoder(self, i, self.tick - st.t0[i])
        else:
            self.prefilling.remove(i)
        del self.running[i]
        self._free(i)
        st.computed[i] = 0
        st.target[i] = st.prompt[i] + st.generated[i]
        st.kv_ready[i] = False
        if self.pf is not None:
            self.pf.full = False  # SGLang retracts to the back of the queue
            self.waiting.append(i)
        else:
            self.waiting.appendleft(i)
        self.trace.preemptions[i] += 1

    # ---- the decode plan: decodeplan.py ------------------------------------------------------

    def _decoders_one_by_one(self) -> bool:
        """The reference pass over running decodes, for when their blocks do not all fit."""
        preempted = False
        for i in list(self.running):
            if i not in self.running or not self.st.decoding[i]:
                continue
            need = decoder_need(self, i, self.tick)
            while not self.kv.allocate(need):
                victim = next(reversed(self.running))
                self._preempt(victim)
                preempted = True
                if victim == i:
                    break
            if i not in self.running:
                break
        return preempted

    # ---- one step ----------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        if self.pf is not None:
            return fastfirst.start_prefill_first(self, now, self.pf)
        budget = self.cfg.max_num_batched_tokens
        preempted = False
        if self.n_dec:
            preempted = self._allocate_decodes()
            budget -= self.n_dec * self.q
        chunks: list[tuple[int, int]] = []
        if self.prefilling:
            budget, cut = self._schedule_prefills(chunks, budget)
            preempted = preempted or cut
        first_decodes = first_ctx = 0
        # vLLM admits nothing new in a step that had to preempt.
        if not preempted and self.waiting and budget > 0 and len(self.running) < self.seats:
            first_decodes, first_ctx = self._admit_waiting(chunks, budget, now)
        return self._price(chunks, first_decodes, first_ctx)

    def ahead(self, end: float, limit: float) -> float:
        """Run the steps after the one in flight (ending at `end`) for as long as they would
        only decode: no chunk, nothing waiting, nobody finishing, their blocks available.
        Stepping one by one through the event heap takes exactly these decisions and times
        (same sums in the same order) at several times the cost. Steps starting before
        `limit` (the first event that could bring this engine work) are final; later ones
        are tentative, taken back by `rewind` if work comes first. Returns the end of the
        step now in flight."""
        self._run = None
        n = self.n_dec
        # Waiting requests stop the run, except on a prefill-first engine whose batch is full:
        # it tries no prefill until a request finishes, which ends the run anyway.
        blocked = self.waiting and not (self.pf is not None and self.pf.full)
        if self.chunks or blocked or self.prefilling or not n:
            return end
        last = min(self.finishing)  # this step finishes a request: it runs for real
        if last <= self.tick:
            return end
        at = self.price.decode_cursor(n)
        kv = self.kv
        end = self._walk(last, end, limit, kv.free + kv.evictable, at, None)
        if self.tick < last:
            # Free blocks only: giving them back undoes the allocation, an eviction would not.
            trail = [(end, self.ctx_sum, self.busy_ms, 0)]
            first = self.tick
            end = self._walk(min(last, first + _TENTATIVE), end, math.inf, kv.free, at, trail)
            if self.tick > first:
                self._run = (first, trail)
        return end

    def _walk(self, last: int, end: float, limit: float, room: int,
              at: Callable[[float], float],
              trail: list[tuple[float, int, float, int]] | None) -> float:
        """Take decode-only steps up to tick `last` while they start before `limit` and
        their blocks fit in `room`; `trail` records (end, KV sum, busy, blocks) after each."""
        n, spec, block, residues = self.n_dec, self.spec, self.block, self.residues
        tokens, blocks = self.plan_tokens, self.plan_blocks
        t = start = self.tick
        ctx, busy, taken = self.ctx_sum, self.busy_ms, 0
        while t < last and end < limit:
            made = n if spec is None else int(tokens[t])  # step t's tokens
            need = residues[-(t + 1) % block] if spec is None else int(blocks[t + 1])
            if taken + need > room:
                break  # someone would be preempted: the step-by-step path picks who
            taken += need
            ctx += made
            t += 1
            duration = at(ctx / n)
            busy += duration
            end += duration
            if trail is not None:
                trail.append((end, ctx, busy, taken))
        if t > start:
            ok = self.kv.allocate(taken)
            assert ok  # one allocation of the sum evicts what one per step would
            self.ctx_sum, self.busy_ms, self.tick = ctx, busy, t
            self.steps += t - start
            if self.pf is not None:
                self.pf.ratio.steps += t - start  # decode steps: SGLang's ratio decays
        return end

    def rewind(self, now: float) -> float | None:
        """Work reaches this engine at `now`: take back the tentative steps that would have
        started after it (they would have admitted it). Returns the new end of the step in
        flight, or None when nothing changes."""
        run, self._run = self._run, None
        if run is None:
            return None
        first, trail = run
        taken = len(trail) - 1
        # Tentative step m (1..taken) starts when step m - 1 ends: trail[m - 1][0].
        kept = bisect.bisect_left([r[0] for r in trail], now, 0, taken)
        if kept == taken:
            return None
        end, ctx, busy, _ = trail[kept]
        self.kv.give_back(trail[taken][3] - trail[kept][3])
        self.steps -= taken - kept
        if self.pf is not None:
            self.pf.ratio.steps -= taken - kept
        self.ctx_sum, self.busy_ms, self.tick = ctx, busy, first + kept
        return end

    def _allocate_decodes(self) -> bool:
        """Blocks for every running decode in one go; True if someone had to be preempted."""
        tick = self.tick
        if self.spec is None:
            need = self.residues[-tick % self.block]
        else:
            need = int(self.plan_blocks[tick]) if tick < len(self.plan_blocks) else 0
        if need and not self.kv.allocate(need):
            return self._decoders_one_by_one()
        return False

    def _schedule_prefills(self, chunks: list[tuple[int, int]], budget: int) -> tuple[int, bool]:
        """The next chunk of each running prefill; the budget left and whether a request was
        preempted."""
        st = self.st
        preempted = False
        for i in list(self.prefilling):
            if i not in self.running:
                continue
            new = min(st.target[i] - st.computed[i], budget)
            if new == 0:
                continue
            need = -(-(st.computed[i] + new) // self.block) - st.held[i] - st.own[i]
            while not self.kv.allocate(need):
                victim = next(reversed(self.running))
                self._preempt(victim)
                preempted = True
                if victim == i:
                    break
            if i not in self.running:
                break
            st.own[i] += need
            budget -= new
            chunks.append((i, new))
        return budget, preempted

    def _admit_waiting(self, chunks: list[tuple[int, int]], budget: int,
                       now: float) -> tuple[int, int]:
        """Admit waiting requests while budget, seats and blocks last; the number that arrived
        with their KV (they decode this step) and their KV lengths, summed."""
        st = self.st
        running = self.running
        waiting = self.waiting
        first_decodes = first_ctx = 0
        while waiting and budget > 0 and len(running) < self.seats:
            i = waiting[0]
            new = (self._admit_transferred(i, budget) if st.kv_ready[i]
                   else self._admit_prefill(i, budget))
            if new is None:
                break
            d, ctx = self._take_in(i, new, now, chunks)
            first_decodes += d
            first_ctx += ctx
            budget -= new
        return first_decodes, first_ctx

    def _take_in(self, i: int, new: int, now: float,
                 chunks: list[tuple[int, int]]) -> tuple[int, int]:
        """Waiting request i was admitted for `new` tokens: it runs. Returns (1, its KV) when
        it arrived with its KV (it decodes this step), else (0, 0)."""
        st = self.st
        self.waiting.popleft()
        self.running[i] = None
        if math.isnan(self.trace.first_scheduled[i]):
            self.trace.first_scheduled[i] = now
        chunks.append((i, new))
        if st.kv_ready[i]:
            return 1, st.prompt[i]
        self.trace.cached_tokens[i] += st.computed[i]
        self.prefilling.append(i)
        return 0, 0

    def _admit_transferred(self, i: int, budget: int) -> int | None:
        # Its first step recomputes the last prompt token and samples the first one.
        st = self.st
        if budget < self.q:
            return None
        need = -(-(st.prompt[i] - 1 + self.q) // self.block)
        if not self.kv.allocate(need):
            return None
        st.computed[i] = st.target[i] = st.prompt[i] - 1
        st.own[i] = need
        return self.q

    def _admit_prefill(self, i: int, budget: int) -> int | None:
        st = self.st
        block = self.block
        target = st.target[i]
        if st.prefix_id[i] < 0:  # nothing to look up (the common case: kept short)
            new = min(target, budget)
            need = -(-new // block)
            if not self.kv.allocate(need):
                return None
            st.computed[i] = 0
            st.own[i] = need
            return new
        prefix = st.prefix_id[i]
        # At least the last prompt token is computed: its logits give the first token.
        hit = self.kv.lookup(prefix, min(st.prefix_tokens[i] // block, (target - 1) // block))
        start = hit * block
        new = min(target - start, budget)
        need = -(-(start + new) // block) - hit
        if not self.kv.admit(prefix, hit, need):
            return None
        st.held[i] = hit
        st.computed[i] = start
        st.own[i] = need
        return new

    def _price(self, chunks: list[tuple[int, int]], first_decodes: int,
               first_ctx: int, *, decodes: bool = True) -> float | None:
        """The step's time; `decodes`: the running decodes are in it."""
        st = self.st
        d = (self.n_dec if decodes else 0) + first_decodes
        p = s = ctx = 0
        for i, new in chunks:
            if not st.kv_ready[i]:
                p += new
                s += 1
                ctx += st.computed[i] + new
        if d == 0 and s == 0:
            return None
        self.chunks = chunks
        kv = (self.ctx_sum if decodes else 0) + first_ctx
        duration = self.price(d, kv / d if d else 0.0, p, s, ctx / s if s else 0.0)
        self.steps += 1
        self.busy_ms += duration
        return duration

    def finish_step(self, now: float) -> tuple[list[int], list[int]]:
        st = self.st
        tick = self.tick
        finished: list[int] = []
        handed: list[int] = []
        decoded = self.pf is None or self.pf.decoded
        next_tick = tick + 1 if decoded else tick  # a prefill-only step: decodes wait
        if self.n_dec and decoded:
            if self.spec is None:
                self.ctx_sum += self.n_dec
            else:
                self.ctx_sum += int(self.plan_tokens[tick])
            done = self.finishing.pop(tick, None)
            if done:
                for i in done:
                    drop_decoder(self, i, tick + 1 - st.t0[i])
                    self._finish(i, now)
                    finished.append(i)
        for i, new in self.chunks:
            if st.kv_ready[i]:
                st.kv_ready[i] = False
                st.generated[i] = 1
                self.trace.first_token[i] = now
            else:
                st.computed[i] += new
                if st.prefix_id[i] >= 0:
                    self._register_blocks(i)
                if st.computed[i] < st.target[i]:
                    continue
                self.prefilling.remove(i)
                if self.role is Role.PREFILL:
                    del self.running[i]
                    handed.append(i)
                    if self.pf is not None:
                        self.pf.full = False
                    continue
                st.generated[i] += 1
                if st.generated[i] == 1:
                    self.trace.first_token[i] = now
            if st.generated[i] >= st.output[i]:
                self._finish(i, now)
                finished.append(i)
            else:
                decodeplan.add_decoder(self, i, next_tick)
        self.chunks = []
        self.tick = next_tick
        return finished, handed

    def _register_blocks(self, i: int) -> None:
        """The prefix blocks request i has computed so far go into the prefix cache."""
        st = self.st
        blocks = st.prefix_tokens[i] // self.block
        if st.held[i] < blocks:
            full = min(st.computed[i], st.prompt[i]) // self.block
            held = self.kv.register_computed(st.prefix_id[i], blocks, st.held[i], full)
            st.own[i] -= held - st.held[i]
            st.held[i] = held
