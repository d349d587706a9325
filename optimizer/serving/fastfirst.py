"""The fast engine's prefill-first steps (SGLang; policy.py): `scheduler.Scheduler`'s decisions.

Split from engine.py (which would pass 500 lines): functions of the FastEngine, which calls
`start_prefill_first` for each step when its policy is prefill-first. Each is the counterpart
of the core's method of the same name (`_prefill_batch`, `_resume_chunk`, `_order_waiting`,
`_decode_step`); the unit tests compare whole runs of the two step for step.

A prefill-only step does not move the decodes: the fast engine's `tick` counts the steps the
decodes take (every step under vLLM), so their plans stay valid across prefill batches.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from trilemma.optimizer.serving.decodeplan import decoder_need
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


def start_prefill_first(eng: FastEngine, now: float,
                         pf: PrefillFirstState) -> float | None:
    chunks: list[tuple[int, int]] = []
    if not eng.n_dec:
        pf.full = False  # an empty running batch is never full
    # Most steps only decode: skip the prefill batch's call when it would return at once.
    first = (prefill_batch(eng, chunks, now, pf)
             if eng.prefilling or (eng.waiting and not pf.full) else None)
    pf.decoded = first is None or eng.cfg.policy.mixed_chunk
    if pf.decoded and eng.n_dec:
        decode_step(eng, pf, decay=first is None)
    first_decodes, first_ctx = first or (0, 0)
    duration = eng._price(chunks, first_decodes, first_ctx, decodes=pf.decoded)
    if duration is None:
        pf.ratio.reset()  # SGLang re-inits new_token_ratio when idle
    return duration


def prefill_batch(eng: FastEngine, chunks: list[tuple[int, int]], now: float,
                   pf: PrefillFirstState) -> tuple[int, int] | None:
    """Admissions of a prefill batch as (transferred requests, their KV) like
    `_admit_waiting`, or None when no prefill batch runs."""
    st = eng.st
    chunked = eng.prefilling[0] if eng.prefilling else None
    if chunked is None and (pf.full or not eng.waiting):
        return None
    room = eng.seats - eng.n_dec
    if room <= 0 and chunked is None:
        pf.full = True
        return None
    policy = eng.cfg.policy
    budget = PrefillBudget.for_step(
        policy, pf.ratio.value, decodes_left(eng, pf),
        free_tokens=(eng.kv.free + eng.kv.evictable) * eng.block,
        mixed_tokens=eng.n_dec * eng.q if policy.mixed_chunk else 0,
        token_budget=eng.cfg.max_num_batched_tokens)
    if chunked is not None:
        resume_chunk(eng, chunked, budget, chunks)
    if eng.role is not Role.DECODE:
        order_waiting(eng, )
    first_decodes = first_ctx = 0
    while eng.waiting and not budget.stop:
        if budget.admitted >= room:
            pf.full = True
            break
        i = eng.waiting[0]
        left = st.output[i] - st.generated[i]
        if st.kv_ready[i]:
            new = budget.admit(eng.q, left)
            taken = eng._admit_transferred(i, new) if new else None
        else:
            new = budget.admit(st.target[i] - cached_blocks(eng, i) * eng.block, left)
            taken = eng._admit_prefill(i, new) if new else None
        if not new:
            break
        if taken is None:
            budget.refuse()
            break
        d, ctx = eng._take_in(i, taken, now, chunks)
        first_decodes += d
        first_ctx += ctx
    pf.full = pf.full or budget.full
    return (first_decodes, first_ctx) if chunks else None


def decodes_left(eng: FastEngine, pf: PrefillFirstState) -> int:
    """The decodes' max output tokens to go, each clipped (the core sums them one by one):
    the sum from the running totals, less what the clip takes off the long ones."""
    st = eng.st
    r = eng.cfg.policy.reservation
    assert r is not None
    left = pf.o_sum + pf.p_sum - eng.ctx_sum
    for i in list(pf.long):
        over = st.output[i] - generated_now(eng, i) - r.clip
        if over > 0:
            left -= over
        else:
            del pf.long[i]  # never long again while it decodes
    return left


def generated_now(eng: FastEngine, i: int) -> int:
    st = eng.st
    done = eng.tick - st.t0[i]
    if eng.spec is None:
        return st.g0[i] + done
    tokens = st.plan_tokens[i]
    assert tokens is not None
    return st.g0[i] + int(tokens[:done].sum())


def resume_chunk(eng: FastEngine, i: int, budget: PrefillBudget,
                  chunks: list[tuple[int, int]]) -> None:
    st = eng.st
    new = budget.resume(st.target[i] - st.computed[i], st.output[i] - st.generated[i])
    if not new:
        return
    need = -(-(st.computed[i] + new) // eng.block) - st.held[i] - st.own[i]
    if not eng.kv.allocate(need):
        eng._preempt(i)
        return
    st.own[i] += need
    chunks.append((i, new))


def cached_blocks(eng: FastEngine, i: int) -> int:
    st = eng.st
    prefix = st.prefix_id[i]
    if prefix < 0:
        return 0
    return eng.kv.lookup(prefix, min(st.prefix_tokens[i] // eng.block,
                                      (st.target[i] - 1) // eng.block))


def order_waiting(eng: FastEngine) -> None:
    policy = eng.cfg.policy
    if (policy.order is not QueueOrder.LPM
            or not 1 < len(eng.waiting) <= policy.lpm_queue_limit):
        return
    st = eng.st
    waiting = list(eng.waiting)
    if all(st.prefix_id[i] < 0 for i in waiting):
        return  # no hits, nothing shared: the order stays
    k = -(-policy.in_batch_prefix_tokens // eng.block)
    hits = [cached_blocks(eng, i) * eng.block for i in waiting]
    shares = [st.prefix_id[i] if st.prefix_id[i] >= 0 and st.prefix_tokens[i] // eng.block >= k
              else None for i in waiting]
    order = lpm_order(hits, shares, policy.in_batch_prefix_tokens)
    eng.waiting = deque(waiting[j] for j in order)


def decode_step(eng: FastEngine, pf: PrefillFirstState, *, decay: bool) -> None:
    tick = eng.tick
    if eng.spec is None:
        need = eng.residues[-tick % eng.block]
    else:
        need = int(eng.plan_blocks[tick]) if tick < len(eng.plan_blocks) else 0
    ratio = pf.ratio
    if need > eng.kv.free + eng.kv.evictable:
        retract(eng, ratio)
        return
    ok = eng.kv.allocate(need)
    assert ok
    if decay:
        ratio.steps += 1


def retract(eng: FastEngine, ratio: TokenRatio) -> None:
    st = eng.st
    kv = eng.kv
    decoders = [i for i in eng.running if st.decoding[i]]
    needs = [decoder_need(eng, i, eng.tick) for i in decoders]
    total = sum(needs)
    left = len(decoders)
    for j in retract_order([generated_now(eng, i) for i in decoders],
                           [st.prompt[i] for i in decoders], eng.spec is not None):
        if left == 1 or (left < len(decoders) and total <= kv.free + kv.evictable):
            break
        eng._preempt(decoders[j])
        total -= needs[j]
        left -= 1
    if total > kv.free + kv.evictable and eng.prefilling:
        eng._preempt(eng.prefilling[0])
    kept = [i for i in decoders if i in eng.running]
    ratio.retracted(sum(generated_now(eng, i) for i in kept),
                    sum(st.output[i] for i in kept), len(kept))
    ok = kv.allocate(total)
    assert ok, "a lone decode always fits (simulate checks every request fits alone)"
