"""The engines' scheduler with no clock: admission, preemption, prefix cache and step composition.

The one specification of the simulated scheduler. It decides what a step computes and moves
its requests forward when told the step is over; when that happens is its driver's business:
* `reference.ReferenceEngine` drives it from the simulator's event heap (virtual ms),
* `trilemma.simfleet.scheduling.Engine` from asyncio in the sim-server (real seconds),
and `engine.FastEngine`, the simulator's hot path, must take its every decision (the unit
tests compare whole runs step for step). Each step (`schedule`):

1. Running requests, oldest first. A decoding request verifies `q` tokens (1, or k + 1 with
   speculation) and needs KV slots for them; a partially prefilled one takes the next chunk,
   as much of the remaining token budget as it needs. When blocks run out, idle cached blocks
   are evicted (blockpool.py), then the newest running request is preempted (V1 recompute:
   its blocks are freed and it goes back to the front of the queue to prefill its prompt and
   the tokens generated so far again). A request that has to preempt itself ends the pass.
   (A prefilling request is never older than a decoding one: a prefill left unfinished took
   the whole budget, so nothing was admitted behind it. Hence "oldest first" is also
   "decodes, then the prefill", the order perf.latency prices.)
2. If nothing was preempted: waiting requests, first come first served, while token budget,
   sequence slots (max_num_seqs) and blocks last; the prefix cache supplies the leading
   blocks of the prompt it holds (at least the last prompt token is computed: its logits give
   the first token).
3. `complete`: decodes gain the tokens their verify step yielded (drawn by `VerifyDraws`,
   the one draw scheme of every driver), chunks advance and register their computed blocks
   in the prefix cache, and a finished prefill samples the next token (the first of the
   request, unless it was preempted after streaming some). A prefill-only engine hands such
   a request off instead and frees its blocks when `release` says its KV has arrived.

That is vLLM V1. Under a prefill-first policy (`policy.Policy`, SGLang; the rules and their
sources are in policy.py) steps 1-2 become: a prefill batch (the unfinished chunk, then
waiting requests in the policy's order under SGLang's token and KV budgets) when requests wait
and the batch is not full, the decodes pausing; else a decode step, which retracts requests
when their next tokens find no KV. Step 3 is the same.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from trilemma.optimizer.serving.blockpool import BlockHash, BlockPool
from trilemma.optimizer.serving.policy import (
    VLLM,
    Policy,
    PrefillBudget,
    QueueOrder,
    TokenRatio,
    lpm_order,
    retract_order,
)

# The draws of speculative verify steps, which every driver of this core hands to `complete`,
# live in verify.py; re-exported here where the drivers import the core.
from trilemma.optimizer.serving.verify import VerifyDraws, verify_yields

__all__ = ["Batch", "Limits", "Outcome", "Role", "Scheduler", "Seq", "VerifyDraws",
           "verify_yields"]


class Role(enum.Enum):
    """What an engine does with a request."""

    COMBINED = "combined"  # prefill and decode on the same engine
    PREFILL = "prefill"  # prefill only; hand the KV off to a decode engine
    DECODE = "decode"  # receives requests whose KV a prefill engine computed


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the scheduler needs to know of an engine."""

    kv_blocks: int
    block_size: int
    token_budget: int  # max_num_batched_tokens
    seats: int  # max_num_seqs
    tokens_per_decode: int  # 1, or k + 1 when verifying k drafts
    prefix_caching: bool = True
    policy: Policy = VLLM


@dataclass(eq=False, slots=True, kw_only=True)
class Seq:
    """One request's scheduling state. `index` is the driver's name for it.

    `prompt` and `output` are the request's prompt_tokens and output_tokens (the glossary's
    names), kept short in the step arithmetic.
    """

    index: int
    prompt: int
    output: int
    hashes: tuple[BlockHash, ...] = ()  # cacheable full prompt blocks, chained
    generated: int = 0
    computed: int = 0  # tokens whose KV this engine holds
    target: int = 0  # tokens to prefill before the next token is sampled
    own: int = 0  # private blocks
    held: int = 0  # cached blocks in use: hashes[:held]
    decoding: bool = False
    kv_ready: bool = False  # arrived from a prefill replica with its KV
    aborted: bool = False


@dataclass(slots=True)
class Batch:
    """One step's work: (request, tokens) in scheduling order, admissions last."""

    work: list[tuple[Seq, int]] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)
    preempted: list[Seq] = field(default_factory=list)  # in preemption order

    def shape(self) -> tuple[int, float, int, int, float]:
        """What the step's price depends on: decodes, their mean KV length (prompt +
        generated), prefill tokens, prefilling sequences, their mean context after the step.
        A request arriving with its KV decodes: it computes one token and samples."""
        decodes = [s for s, _ in self.work if s.decoding or s.kv_ready]
        chunks = [(s, n) for s, n in self.work if not (s.decoding or s.kv_ready)]
        d, s = len(decodes), len(chunks)
        kv = sum(q.prompt + q.generated for q in decodes) / d if d else 0.0
        c = sum(q.computed + n for q, n in chunks) / s if s else 0.0
        return d, kv, sum(n for _, n in chunks), s, c


@dataclass(slots=True)
class Outcome:
    """What a completed step produced."""

    decoded: list[tuple[Seq, int]] = field(default_factory=list)  # verify steps' tokens
    sampled: list[Seq] = field(default_factory=list)  # one token at the end of a prefill
    started: list[Seq] = field(default_factory=list)  # began decoding
    finished: list[Seq] = field(default_factory=list)
    handed: list[Seq] = field(default_factory=list)  # prefilled on a prefill-only engine


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    """One engine's queues and KV blocks; see the module docstring for the rules."""

    def __init__(self, limits: Limits, *, role: Role = Role.COMBINED) -> None:
        self.limits = limits
        self.role = role
        self.block = limits.block_size
        self.q = limits.tokens_per_decode
        self.pool = BlockPool(limits.kv_blocks)
        self.running: dict[Seq, None] = {}  # insertion order = scheduling priority
        self.waiting: deque[Seq] = deque()
        self.handed_off: dict[int, Seq] = {}
        self.policy = limits.policy
        reservation = self.policy.reservation
        self.ratio = TokenRatio(reservation) if reservation is not None else None
        self.full = False  # prefill-first: no prefill batch until a running request leaves
        self.chunked: Seq | None = None  # prefill-first: the request prefilled chunk by chunk

    # ---- requests in and out -----------------------------------------------------------------

    def submit(self, seq: Seq, *, kv_ready: bool = False) -> None:
        """Queue a request; `kv_ready`: its KV was computed by a prefill engine."""
        seq.target = seq.prompt
        seq.kv_ready = kv_ready
        self.waiting.append(seq)

    def release(self, index: int) -> None:
        """A handed-off request's KV has reached its decode engine: free the blocks."""
        self._free(self.handed_off.pop(index))

    def abort(self, seq: Seq) -> None:
        """Drop the request wherever it is (the client went away)."""
        seq.aborted = True
        if seq is self.chunked:
            self.chunked = None
        if seq in self.running:
            del self.running[seq]
            self._free(seq)
            self.full = False
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _free(self, seq: Seq) -> None:
        self.pool.release(seq.hashes[:seq.held])
        self.pool.give_back(seq.own)
        seq.own = seq.held = 0

    def _preempt(self, seq: Seq) -> None:
        del self.running[seq]
        self._free(seq)
        seq.computed = 0
        seq.target = seq.prompt + seq.generated
        seq.decoding = seq.kv_ready = False
        if self.policy.prefill_first:
            # SGLang queues retracted requests behind the waiting ones
            # (Scheduler._extend_requests_to_queue); vLLM puts them in front.
            self.full = False
            if seq is self.chunked:
                self.chunked = None
            self.waiting.append(seq)
        else:
            self.waiting.appendleft(seq)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> Batch | None:
        """This step's work (its KV blocks taken), or None when there is none."""
        if self.policy.prefill_first:
            return self._schedule_prefill_first()
        batch = Batch()
        budget = self._schedule_running(batch)
        if not batch.preempted:  # vLLM admits nothing new in a step that had to preempt
            self._admit_waiting(batch, budget)
        return batch if batch.work else None

    def _schedule_running(self, batch: Batch) -> int:
        budget = self.limits.token_budget
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted above to make room for an older request
            if seq.decoding:
                new = self.q
                tokens = seq.prompt + seq.generated - 1 + self.q
            else:
                new = min(seq.target - seq.computed, budget)
                if new == 0:
                    continue
                tokens = seq.computed + new
            if not self._allocate(seq, _ceil_div(tokens, self.block) - seq.held - seq.own,
                                  batch):
                break
            budget -= new
            batch.work.append((seq, new))
        return budget

    def _allocate(self, seq: Seq, need: int, batch: Batch) -> bool:
        """`need` more blocks for running `seq`, preempting from the back; False if `seq`
        itself had to go."""
        while not self.pool.allocate(need):
            victim = next(reversed(self.running))
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        seq.own += need
        return True

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.limits.seats:
            seq = self.waiting[0]
            new = self._admit(seq, budget)
            if new is None:
                break
            self.waiting.popleft()
            self.running[seq] = None
            budget -= new
            batch.work.append((seq, new))
            batch.admitted.append(seq)

    def _admit(self, seq: Seq, budget: int) -> int | None:
        """Take the blocks of `seq`'s first step; its tokens, or None (nothing changed)."""
        if seq.kv_ready:
            # Its first step recomputes the last prompt token and samples the first one.
            if budget < self.q:
                return None
            need = _ceil_div(seq.prompt - 1 + self.q, self.block)
            if not self.pool.allocate(need):
                return None
            seq.computed = seq.target = seq.prompt - 1
            seq.own = need
            return self.q
        hit = 0
        if self.limits.prefix_caching:
            hit = self.pool.lookup(seq.hashes[:(seq.target - 1) // self.block])
        start = hit * self.block
        new = min(seq.target - start, budget)
        need = _ceil_div(start + new, self.block) - hit
        if not self.pool.admit(seq.hashes[:hit], need):
            return None
        seq.held, seq.own, seq.computed = hit, need, start
        return new

    # ---- prefill-first (SGLang; see policy.py) -------------------------------------------------

    def _schedule_prefill_first(self) -> Batch | None:
        batch = Batch()
        if self._prefill_batch(batch):
            if self.policy.mixed_chunk:
                self._decode_step(batch, decay=False)
        else:
            self._decode_step(batch, decay=True)
        if not batch.work:
            assert self.ratio is not None
            self.ratio.reset()  # SGLang re-inits new_token_ratio when idle
            return None
        return batch

    def _prefill_batch(self, batch: Batch) -> bool:
        """SGLang's get_new_batch_prefill; True when a prefill batch runs."""
        decoders = [s for s in self.running if s is not self.chunked]
        if not decoders:
            self.full = False  # an empty running batch is never full
        if self.chunked is None and (self.full or not self.waiting):
            return False
        room = self.limits.seats - len(decoders)
        if room <= 0 and self.chunked is None:
            self.full = True
            return False
        budget = self._prefill_budget(decoders)
        if self.chunked is not None:
            self._resume_chunk(self.chunked, budget, batch)
        if self.role is not Role.DECODE:
            self._order_waiting()
        while self.waiting and not budget.stop:
            if budget.admitted >= room:
                self.full = True
                break
            seq = self.waiting[0]
            new = self._admit_budgeted(seq, budget)
            if not new:
                break
            self.waiting.popleft()
            self.running[seq] = None
            batch.work.append((seq, new))
            batch.admitted.append(seq)
            if not seq.kv_ready and seq.computed + new < seq.target:
                self.chunked = seq
        self.full = self.full or budget.full
        return bool(batch.work)

    def _prefill_budget(self, decoders: list[Seq]) -> PrefillBudget:
        r = self.policy.reservation
        assert r is not None and self.ratio is not None
        left = sum(min(s.output - s.generated, r.clip) for s in decoders)
        return PrefillBudget.for_step(
            self.policy, self.ratio.value, left,
            free_tokens=(self.pool.free + self.pool.evictable) * self.block,
            mixed_tokens=len(decoders) * self.q if self.policy.mixed_chunk else 0,
            token_budget=self.limits.token_budget)

    def _resume_chunk(self, seq: Seq, budget: PrefillBudget, batch: Batch) -> None:
        new = budget.resume(seq.target - seq.computed, seq.output - seq.generated)
        if not new:
            return
        need = _ceil_div(seq.computed + new, self.block) - seq.held - seq.own
        if not self.pool.allocate(need):
            self._preempt(seq)  # SGLang would run out of memory here; the budget rarely lets it
            batch.preempted.append(seq)
            return
        seq.own += need
        batch.work.append((seq, new))
        if seq.computed + new >= seq.target:
            self.chunked = None

    def _cached_blocks(self, seq: Seq) -> int:
        if not self.limits.prefix_caching:
            return 0
        return self.pool.lookup(seq.hashes[:(seq.target - 1) // self.block])

    def _admit_budgeted(self, seq: Seq, budget: PrefillBudget) -> int:
        """Admit `seq` under SGLang's budgets: its tokens this step, or 0 (nothing changed)."""
        if seq.kv_ready:
            new = budget.admit(self.q, seq.output - seq.generated)
        else:
            new = budget.admit(seq.target - self._cached_blocks(seq) * self.block,
                               seq.output - seq.generated)
        if not new:
            return 0
        taken = self._admit(seq, new)
        if taken is None:
            budget.refuse()
            return 0
        return taken

    def _order_waiting(self) -> None:
        p = self.policy
        if (p.order is not QueueOrder.LPM or not self.limits.prefix_caching
                or not 1 < len(self.waiting) <= p.lpm_queue_limit):
            return
        k = _ceil_div(p.in_batch_prefix_tokens, self.block)
        hits = [self._cached_blocks(s) * self.block for s in self.waiting]
        shares = [s.hashes[k - 1] if len(s.hashes) >= k else None for s in self.waiting]
        waiting = list(self.waiting)
        self.waiting = deque(waiting[j] for j in lpm_order(hits, shares, p.in_batch_prefix_tokens))

    def _decode_step(self, batch: Batch, *, decay: bool) -> None:
        """SGLang's update_running_batch: the decodes' next tokens, retracting requests when
        their KV is not there."""
        decoders = [s for s in self.running if s.decoding]
        if not decoders:
            return
        needs = [_ceil_div(s.prompt + s.generated - 1 + self.q, self.block) - s.held - s.own
                 for s in decoders]
        total = sum(needs)
        assert self.ratio is not None
        if total > self.pool.free + self.pool.evictable:
            left = len(decoders)
            for j in retract_order([s.generated for s in decoders],
                                   [s.prompt for s in decoders], self.q > 1):
                if left == 1 or (left < len(decoders)
                                 and total <= self.pool.free + self.pool.evictable):
                    break
                self._preempt(decoders[j])
                batch.preempted.append(decoders[j])
                total -= needs[j]
                left -= 1
            if total > self.pool.free + self.pool.evictable and self.chunked is not None:
                batch.preempted.append(self.chunked)
                self._preempt(self.chunked)
            kept = [s for s in decoders if s in self.running]
            self.ratio.retracted(sum(s.generated for s in kept), sum(s.output for s in kept),
                                 len(kept))
        elif decay:
            self.ratio.steps += 1
        ok = self.pool.allocate(total)
        assert ok, "a lone decode always fits (simulate checks every request fits alone)"
        for s, need in zip(decoders, needs, strict=True):
            if s in self.running:
                s.own += need
                batch.work.append((s, self.q))

    # ---- the step is over --------------------------------------------------------------------

    def complete(self, batch: Batch, draw: Callable[[Seq], int]) -> Outcome:
        """Move the batch's requests forward; `draw` gives the tokens a decode's verify step
        yielded (1 without speculation)."""
        out = Outcome()
        for seq, new in batch.work:
            if seq.aborted:
                continue
            if seq.decoding:
                got = min(draw(seq), seq.output - seq.generated)
                seq.generated += got
                out.decoded.append((seq, got))
            elif not self._prefilled(seq, new, out):
                continue
            if seq.generated >= seq.output:
                del self.running[seq]
                self._free(seq)
                out.finished.append(seq)
                self.full = False  # the running batch shrank
        return out

    def _prefilled(self, seq: Seq, new: int, out: Outcome) -> bool:
        """Advance a prefill chunk; True when it sampled a token on this engine."""
        if seq.kv_ready:
            seq.computed += 1
        else:
            seq.computed += new
            if self.limits.prefix_caching and seq.held < len(seq.hashes):
                full = min(seq.computed, seq.prompt) // self.block
                held = self.pool.register_computed(seq.hashes, seq.held, full)
                seq.own -= held - seq.held
                seq.held = held
        if seq.computed < seq.target:
            return False
        if self.role is Role.PREFILL:
            del self.running[seq]
            self.handed_off[seq.index] = seq
            out.handed.append(seq)
            self.full = False
            return False
        seq.kv_ready = False
        seq.generated += 1
        out.sampled.append(seq)
        if seq.generated < seq.output:
            seq.decoding = True
            out.started.append(seq)
        return True
