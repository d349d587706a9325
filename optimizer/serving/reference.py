"""The reference engine: vLLM V1's scheduler written plainly, one object per request.

This is the specification of the simulated scheduler; `engine.FastEngine` must reproduce its
every decision (the unit tests compare the two timestamp for timestamp). Each step:

1. Running requests, oldest first. A decoding request verifies `q` tokens (1, or k + 1 with
   speculation) and needs KV slots for them; a partially prefilled one takes the next chunk,
   as much of the remaining token budget as it needs. When blocks run out, idle cached
   prefixes are evicted, then the newest running request is preempted (V1 recompute: its
   blocks are freed and it goes back to the front of the queue to prefill its prompt and the
   tokens generated so far again). A request that has to preempt itself ends the pass.
2. If nothing was preempted: waiting requests, first come first served, while token budget,
   sequence slots (max_num_seqs) and blocks last; a request whose shared prefix is cached
   starts its prefill after it.
3. The step lasts what the perf model says for that batch. Then decodes gain their tokens,
   chunks advance, and a finished prefill samples the next token (the first token of the
   request, unless it was preempted after streaming some).

With speculation, a request draws the tokens of every verify step of its decode when it
starts decoding (one uniform per remaining token), which is the same distribution as drawing
step by step and lets the fast engine plan ahead with the same random numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from trilemma.optimizer.serving.cluster import EngineConfig
from trilemma.optimizer.serving.engine import Role
from trilemma.optimizer.serving.kvcache import KvBlocks
from trilemma.optimizer.serving.requests import Workload
from trilemma.optimizer.serving.results import Trace
from trilemma.optimizer.serving.steptable import Pricer


@dataclass(eq=False, slots=True)
class _Seq:
    index: int
    prompt: int
    output: int
    prefix_id: int
    prefix_blocks: int
    generated: int = 0
    computed: int = 0  # tokens whose KV this engine holds
    target: int = 0  # tokens to prefill before the next token is sampled
    blocks: int = 0  # blocks owned; a borrowed prefix's blocks belong to the cache
    borrowed: int = 0  # blocks of the cached prefix this request starts from
    decoding: bool = False
    kv_ready: bool = False  # arrived from a prefill replica with its KV
    yields: deque[int] = field(default_factory=deque)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ReferenceEngine:
    def __init__(self, cfg: EngineConfig, *, role: Role, index: int, workload: Workload,
                 trace: Trace, price: Pricer, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.role = role
        self.index = index
        self.workload = workload
        self.trace = trace
        self.price = price
        self.rng = rng
        self.q = cfg.tokens_per_decode
        self.kv = KvBlocks(cfg.kv_blocks)
        self.running: list[_Seq] = []
        self.waiting: deque[_Seq] = deque()
        self.handed_off: dict[int, _Seq] = {}
        self.batch: list[tuple[_Seq, int]] = []
        self.busy = False
        self.kick_pending = False
        self.steps = 0
        self.busy_ms = 0.0

    # ---- requests in and out ---------------------------------------------------------------

    def _new(self, i: int) -> _Seq:
        w = self.workload
        prompt = int(w.prompt_tokens[i])
        return _Seq(index=i, prompt=prompt, output=int(w.output_tokens[i]),
                     prefix_id=int(w.prefix_id[i]),
                     prefix_blocks=int(w.prefix_tokens[i]) // self.cfg.block_size,
                     target=prompt)

    def submit(self, i: int) -> None:
        self.waiting.append(self._new(i))

    def submit_transferred(self, i: int) -> None:
        seq = self._new(i)
        seq.kv_ready = True
        self.waiting.append(seq)

    def release(self, i: int) -> None:
        """A handed-off request's KV has reached its decode replica: free the blocks."""
        self._free(self.handed_off.pop(i))

    def _free(self, seq: _Seq) -> None:
        self.kv.release(seq.blocks)
        if seq.borrowed:
            self.kv.give_back(seq.prefix_id)
        seq.blocks = seq.borrowed = 0

    def _blocks_missing(self, seq: _Seq, tokens: int) -> int:
        return _ceil_div(tokens, self.cfg.block_size) - seq.borrowed - seq.blocks

    def _preempt(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.computed = 0
        seq.target = seq.prompt + seq.generated
        seq.decoding = seq.kv_ready = False
        seq.yields.clear()
        self.waiting.appendleft(seq)
        self.trace.preemptions[seq.index] += 1

    def _start_decoding(self, seq: _Seq) -> None:
        seq.decoding = True
        spec = self.cfg.speculation
        if spec is not None:
            u = self.rng.random(seq.output - seq.generated)
            seq.yields = deque(spec.step_tokens(u).tolist())

    # ---- one step ----------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted above to make room for an older request
            if seq.decoding:
                new = self.q
                need = self._blocks_missing(seq, seq.prompt + seq.generated - 1 + self.q)
            else:
                new = min(seq.target - seq.computed, budget)
                if new == 0:
                    continue
                need = self._blocks_missing(seq, seq.computed + new)
            while not self.kv.allocate(need):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq not in self.running:
                break
            seq.blocks += need
            budget -= new
            batch.append((seq, new))

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.cfg.seats):
            seq = self.waiting[0]
            if seq.kv_ready:
                # Its first step recomputes the last prompt token and samples the first one.
                new = self.q
                if budget < new:
                    break
                need = self._blocks_missing(seq, seq.prompt - 1 + self.q)
                if not self.kv.allocate(need):
                    break
                seq.computed = seq.target = seq.prompt - 1
            else:
                hit = self.kv.cached(seq.prefix_id) if seq.prefix_id >= 0 else 0
                # A fully cached prompt still computes its last token (as vLLM does).
                hit = min(hit, (seq.target - 1) // self.cfg.block_size)
                if hit:
                    self.kv.borrow(seq.prefix_id)
                seq.borrowed = hit
                seq.computed = hit * self.cfg.block_size
                new = min(seq.target - seq.computed, budget)
                need = self._blocks_missing(seq, seq.computed + new)
                if not self.kv.allocate(need):
                    if hit:
                        self.kv.give_back(seq.prefix_id, used=False)
                    seq.borrowed = seq.computed = 0
                    break
                if hit:
                    self.kv.touch(seq.prefix_id)
                self.trace.cached_tokens[seq.index] += seq.computed
            self.waiting.popleft()
            self.running.append(seq)
            seq.blocks += need
            if self.trace.first_scheduled[seq.index] != self.trace.first_scheduled[seq.index]:
                self.trace.first_scheduled[seq.index] = now  # still NaN: first time
            budget -= new
            batch.append((seq, new))

        if not batch:
            return None
        decodes = [s for s, _ in batch if s.decoding or s.kv_ready]
        chunks = [(s, n) for s, n in batch if not (s.decoding or s.kv_ready)]
        d = len(decodes)
        kv = sum(s.prompt + s.generated for s in decodes) / d if d else 0.0
        p = sum(n for _, n in chunks)
        s = len(chunks)
        c = sum(seq.computed + n for seq, n in chunks) / s if s else 0.0
        self.batch = batch
        duration = self.price(d, kv, p, s, c)
        self.steps += 1
        self.busy_ms += duration
        return duration

    def finish_step(self, now: float) -> tuple[list[int], list[int]]:
        finished: list[int] = []
        handed: list[int] = []
        for seq, new in self.batch:
            if seq.decoding:
                got = seq.yields.popleft() if seq.yields else 1
                seq.generated += min(got, seq.output - seq.generated)
            else:
                seq.computed += 1 if seq.kv_ready else new
                if seq.computed < seq.target:
                    continue
                self._register_prefix(seq)
                if self.role is Role.PREFILL:
                    self.running.remove(seq)
                    self.handed_off[seq.index] = seq
                    handed.append(seq.index)
                    continue
                seq.kv_ready = False
                seq.generated += 1
                if seq.generated == 1:
                    self.trace.first_token[seq.index] = now
                if seq.generated < seq.output:
                    self._start_decoding(seq)
            if seq.generated >= seq.output:
                self.running.remove(seq)
                self._free(seq)
                self.trace.finish[seq.index] = now
                self.trace.engine[seq.index] = self.index
                finished.append(seq.index)
        self.batch = []
        return finished, handed

    def _register_prefix(self, seq: _Seq) -> None:
        if seq.prefix_id < 0 or seq.borrowed or not seq.prefix_blocks or seq.kv_ready:
            return
        if self.kv.register(seq.prefix_id, seq.prefix_blocks):
            seq.blocks -= seq.prefix_blocks
            seq.borrowed = seq.prefix_blocks
