"""The fast engine's prefill-first steps (SGLang; policy.py): `scheduler.Scheduler`'s decisions.

Split from engine.py, whose FastEngine carries these methods (one engine class, two modules:
engine.py would pass 500 lines). Each method is the counterpart of the core's method of the
same name (`_prefill_batch`, `_resume_chunk`, `_order_waiting`, `_decode_step`); the unit
tests compare whole runs of the two step for step.

A prefill-only step does not move the decodes: the fast engine's `tick` counts the steps the
decodes take (every step under vLLM), so their plans stay valid across prefill batches.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from trilemma.optimizer.serving.policy import (
    PrefillBudget,
    QueueOrder,
    TokenRatio,
    lpm_order,
    retract_order,
)
from trilemma.optimizer.serving.scheduler import Role

if TYPE_CHECKING:
    from trilemma.optimizer.serving.engine import FastEngine


class PrefillFirstState:
    """The core's `ratio` and `full`; whether the step in flight moves the decodes; the
    decodes' prompt and output totals, and those whose max output to go is past the
    reservation's clip (`long`)."""

    __slots__ = ("decoded", "full", "long", "o_sum", "p_sum", "ratio")

    def __init__(self, ratio: TokenRatio) -> None:
        self.ratio = ratio
        self.full = False
        self.decoded = True
        self.p_sum = self.o_sum = 0
        self.long: dict[int, None] = {}


class PrefillFirst:
    """FastEngine's prefill-first methods; `self` is the FastEngine."""

    def _start_prefill_first(self: FastEngine, now: float,
                             pf: PrefillFirstState) -> float | None:
        chunks: list[tuple[int, int]] = []
        if not self.n_dec:
            pf.full = False  # an empty running batch is never full
        # Most steps only decode: skip the prefill batch's call when it would return at once.
        first = (self._prefill_batch(chunks, now, pf)
                 if self.prefilling or (self.waiting and not pf.full) else None)
        pf.decoded = first is None or self.cfg.policy.mixed_chunk
        if pf.decoded and self.n_dec:
            self._decode_step(pf, decay=first is None)
        first_decodes, first_ctx = first or (0, 0)
        duration = self._price(chunks, first_decodes, first_ctx, decodes=pf.decoded)
        if duration is None:
            pf.ratio.reset()  # SGLang re-inits new_token_ratio when idle
        return duration

    def _prefill_batch(self: FastEngine, chunks: list[tuple[int, int]], now: float,
                       pf: PrefillFirstState) -> tuple[int, int] | None:
        """Admissions of a prefill batch as (transferred requests, their KV) like
        `_admit_waiting`, or None when no prefill batch runs."""
        st = self.st
        chunked = self.prefilling[0] if self.prefilling else None
        if chunked is None and (pf.full or not self.waiting):
            return None
        room = self.seats - self.n_dec
        if room <= 0 and chunked is None:
            pf.full = True
            return None
        policy = self.cfg.policy
        budget = PrefillBudget.for_step(
            policy, pf.ratio.value, self._left(pf),
            free_tokens=(self.kv.free + self.kv.evictable) * self.block,
            mixed_tokens=self.n_dec * self.q if policy.mixed_chunk else 0,
            token_budget=self.cfg.max_num_batched_tokens)
        if chunked is not None:
            self._resume_chunk(chunked, budget, chunks)
        if self.role is not Role.DECODE:
            self._order_waiting()
        first_decodes = first_ctx = 0
        while self.waiting and not budget.stop:
            if budget.admitted >= room:
                pf.full = True
                break
            i = self.waiting[0]
            left = st.output[i] - st.generated[i]
            if st.kv_ready[i]:
                new = budget.admit(self.q, left)
                taken = self._admit_transferred(i, new) if new else None
            else:
                new = budget.admit(st.target[i] - self._cached_blocks(i) * self.block, left)
                taken = self._admit_prefill(i, new) if new else None
            if not new:
                break
            if taken is None:
                budget.refuse()
                break
            d, ctx = self._take_in(i, taken, now, chunks)
            first_decodes += d
            first_ctx += ctx
        pf.full = pf.full or budget.full
        return (first_decodes, first_ctx) if chunks else None

    def _left(self: FastEngine, pf: PrefillFirstState) -> int:
        """The decodes' max output tokens to go, each clipped (the core sums them one by one):
        the sum from the running totals, less what the clip takes off the long ones."""
        st = self.st
        r = self.cfg.policy.reservation
        assert r is not None
        left = pf.o_sum + pf.p_sum - self.ctx_sum
        for i in list(pf.long):
            over = st.output[i] - self._generated_now(i) - r.clip
            if over > 0:
                left -= over
            else:
                del pf.long[i]  # never long again while it decodes
        return left

    def _generated_now(self: FastEngine, i: int) -> int:
        st = self.st
        done = self.tick - st.t0[i]
        if self.spec is None:
            return st.g0[i] + done
        tokens = st.plan_tokens[i]
        assert tokens is not None
        return st.g0[i] + int(tokens[:done].sum())

    def _resume_chunk(self: FastEngine, i: int, budget: PrefillBudget,
                      chunks: list[tuple[int, int]]) -> None:
        st = self.st
        new = budget.resume(st.target[i] - st.computed[i], st.output[i] - st.generated[i])
        if not new:
            return
        need = -(-(st.computed[i] + new) // self.block) - st.held[i] - st.own[i]
        if not self.kv.allocate(need):
            self._preempt(i)
            return
        st.own[i] += need
        chunks.append((i, new))

    def _cached_blocks(self: FastEngine, i: int) -> int:
        st = self.st
        prefix = st.prefix_id[i]
        if prefix < 0:
            return 0
        return self.kv.lookup(prefix, min(st.prefix_tokens[i] // self.block,
                                          (st.target[i] - 1) // self.block))

    def _order_waiting(self: FastEngine) -> None:
        policy = self.cfg.policy
        if (policy.order is not QueueOrder.LPM
                or not 1 < len(self.waiting) <= policy.lpm_queue_limit):
            return
        st = self.st
        waiting = list(self.waiting)
        if all(st.prefix_id[i] < 0 for i in waiting):
            return  # no hits, nothing shared: the order stays
        k = -(-policy.in_batch_prefix_tokens // self.block)
        hits = [self._cached_blocks(i) * self.block for i in waiting]
        shares = [st.prefix_id[i] if st.prefix_id[i] >= 0 and st.prefix_tokens[i] // self.block >= k
                  else None for i in waiting]
        order = lpm_order(hits, shares, policy.in_batch_prefix_tokens)
        self.waiting = deque(waiting[j] for j in order)

    def _decode_step(self: FastEngine, pf: PrefillFirstState, *, decay: bool) -> None:
        tick = self.tick
        if self.spec is None:
            need = self.residues[-tick % self.block]
        else:
            need = int(self.plan_blocks[tick]) if tick < len(self.plan_blocks) else 0
        ratio = pf.ratio
        if need > self.kv.free + self.kv.evictable:
            self._retract(ratio)
            return
        ok = self.kv.allocate(need)
        assert ok
        if decay:
            ratio.steps += 1

    def _retract(self: FastEngine, ratio: TokenRatio) -> None:
        st = self.st
        kv = self.kv
        decoders = [i for i in self.running if st.decoding[i]]
        needs = [self._decoder_need(i, self.tick) for i in decoders]
        total = sum(needs)
        left = len(decoders)
        for j in retract_order([self._generated_now(i) for i in decoders],
                               [st.prompt[i] for i in decoders], self.spec is not None):
            if left == 1 or (left < len(decoders) and total <= kv.free + kv.evictable):
                break
            self._preempt(decoders[j])
            total -= needs[j]
            left -= 1
        if total > kv.free + kv.evictable and self.prefilling:
            self._preempt(self.prefilling[0])
        kept = [i for i in decoders if i in self.running]
        ratio.retracted(sum(self._generated_now(i) for i in kept),
                        sum(st.output[i] for i in kept), len(kept))
        ok = kv.allocate(total)
        assert ok, "a lone decode always fits (simulate checks every request fits alone)"
