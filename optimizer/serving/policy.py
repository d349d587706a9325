"""How an engine composes its steps: vLLM V1's policy or SGLang's, as data the one scheduler reads.

`scheduler.Scheduler` (and `engine.FastEngine`, which takes its every decision) run vLLM V1 by
default: running requests first, prefill chunks mixed into the decode steps under the token
budget, admission by free KV blocks alone. `Policy.prefill_first` switches them to SGLang
v0.5.9's scheduler (github.com/sgl-project/sglang, python/sglang/srt/managers/):

* scheduler.py `Scheduler.get_next_batch_to_run`: when requests wait (or a chunked prefill is
  unfinished) and the batch is not marked full, a prefill batch runs and the decodes wait;
  otherwise a decode step. Prefill chunks ride in decode steps only with --enable-mixed-chunk.
* schedule_policy.py `PrefillAdder` (`PrefillBudget` here): a prefill batch takes the unfinished
  chunk first, then waiting requests while the new tokens fit --chunked-prefill-size (one
  request is truncated to the rest) and --max-prefill-tokens, and while the free KV tokens
  exceed what is promised: every running request's remaining max output (clipped at 4096)
  times `new_token_ratio`, plus each admitted request's prompt and whole max output. Cached
  prefix tokens (the radix cache) are neither computed nor counted. A request that does not
  fit marks the batch full: no prefill is tried again until a running request leaves.
* scheduler.py `update_running_batch` (`TokenRatio` here): a decode step that finds no KV for
  its tokens retracts requests (fewest tokens generated first, then the longest prompt;
  schedule_batch.py `ScheduleBatch.retract_decode`) back to the waiting queue and raises the
  ratio to what the survivors have used; every other decode step lowers it by a fixed decay
  to a floor; an idle engine resets it.
* schedule_policy.py `SchedulePolicy.calc_priority`: under `lpm` (the default with the radix
  cache) the waiting queue is sorted by cached prefix length before each prefill batch,
  except when more than 128 wait; a request sharing an uncached prefix with an earlier
  waiting one goes last, so one computes the prefix and the others hit it.

Constants are SGLang's, cited in perf/data/engine.yaml (`sglang.scheduler`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml


class QueueOrder(enum.Enum):
    """SGLang's --schedule-policy values the simulator models."""

    FCFS = "fcfs"
    LPM = "lpm"  # longest prefix match


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """SGLang's promise of future decode tokens (`new_token_ratio`)."""

    init_ratio: float
    min_ratio: float
    decay: float  # per decode step
    retract_steps: int  # tokens per survivor the ratio adds after a retraction
    clip: int  # a request's max output counts at most this much


@dataclass(frozen=True, kw_only=True)
class Policy:
    """How one engine schedules. The default is vLLM V1's."""

    prefill_first: bool = False
    mixed_chunk: bool = False  # SGLang --enable-mixed-chunk
    order: QueueOrder = QueueOrder.FCFS
    max_prefill_tokens: int | None = None  # SGLang --max-prefill-tokens
    reservation: Reservation | None = None
    lpm_queue_limit: int = 0  # lpm falls back to fcfs above this many waiting
    in_batch_prefix_tokens: int = 0  # in-batch prefix sharing threshold (tokens)

    def __post_init__(self) -> None:
        if self.prefill_first and (self.reservation is None or self.max_prefill_tokens is None):
            raise ValueError("a prefill-first policy needs SGLang's reservation and prefill cap")


VLLM = Policy()


@cache
def _sglang_block() -> dict[str, Any]:
    text = resources.files("trilemma.optimizer.perf").joinpath("data/engine.yaml").read_text()
    block: dict[str, Any] = yaml.safe_load(text)["sglang"]["scheduler"]
    return block


def _value(name: str) -> Any:
    return _sglang_block()[name]["value"]


def sglang(*, mixed_chunk: bool = False, order: QueueOrder | None = None,
           prefix_caching: bool = True) -> Policy:
    """SGLang v0.5.9's scheduler with its defaults; `order` None: --schedule-policy's default
    (lpm, which SGLang turns into fcfs without the radix cache)."""
    init = float(_value("init_new_token_ratio"))
    floor = init * float(_value("min_new_token_ratio_factor"))
    chosen = order or QueueOrder(_value("schedule_policy"))
    if not prefix_caching:
        chosen = QueueOrder.FCFS
    return Policy(
        prefill_first=True, mixed_chunk=mixed_chunk, order=chosen,
        max_prefill_tokens=int(_value("max_prefill_tokens")),
        reservation=Reservation(init_ratio=init, min_ratio=floor,
                                decay=(init - floor) / float(_value("new_token_ratio_decay_steps")),
                                retract_steps=int(_value("retract_decode_steps")),
                                clip=int(_value("clip_max_new_tokens"))),
        lpm_queue_limit=int(_value("lpm_queue_limit")),
        in_batch_prefix_tokens=int(_value("in_batch_prefix_threshold")))


# ---- runtime state shared by the scheduler core and the fast engine -----------------------------


class TokenRatio:
    """SGLang's `new_token_ratio`. Kept as (base, decode steps since) so that the fast engine,
    which takes decode steps in bulk and takes some back, computes the same floats."""

    def __init__(self, r: Reservation) -> None:
        self.r = r
        self.base = r.init_ratio
        self.steps = 0

    @property
    def value(self) -> float:
        return max(self.base - self.steps * self.r.decay, self.r.min_ratio)

    def reset(self) -> None:
        """The engine went idle."""
        self.base, self.steps = self.r.init_ratio, 0

    def retracted(self, generated: int, output: int, survivors: int) -> None:
        """A decode step retracted requests: the ratio the survivors have shown so far."""
        self.base = min(1.0, (generated + self.r.retract_steps * survivors) / max(output, 1))
        self.steps = 0


class PrefillBudget:
    """One prefill batch's budgets, SGLang's `PrefillAdder` arithmetic in tokens (page size
    1, SGLang's default). `full` after a refusal: SGLang then marks the running batch full."""

    def __init__(self, *, free_tokens: int, promised: float, input_tokens: int,
                 chunk_tokens: int, clip: int) -> None:
        self.rem_total = free_tokens - promised
        self.rem_input = input_tokens
        self.rem_chunk = chunk_tokens
        self.clip = clip
        self.stop = False
        self.full = False
        self.admitted = 0

    @classmethod
    def for_step(cls, policy: Policy, ratio: float, left: int, *, free_tokens: int,
                 mixed_tokens: int, token_budget: int) -> PrefillBudget:
        """The budgets of a prefill batch beside running decodes that have `left` max output
        tokens to go (each clipped), `mixed_tokens` of them riding in the batch
        (--enable-mixed-chunk). One expression for both engines: the same floats."""
        r = policy.reservation
        assert r is not None and policy.max_prefill_tokens is not None
        return cls(free_tokens=free_tokens, promised=ratio * left + mixed_tokens,
                   input_tokens=policy.max_prefill_tokens - mixed_tokens,
                   chunk_tokens=token_budget - mixed_tokens, clip=r.clip)

    def _take(self, tokens: int, promise: int) -> None:
        self.rem_total -= tokens + promise
        self.rem_input -= tokens
        self.rem_chunk -= tokens
        self.admitted += 1
        # PrefillAdder.budget_state after each admission.
        if self.rem_total <= 0:
            self.stop = self.full = True
        elif self.rem_input <= 0 or self.rem_chunk <= 0:
            self.stop = True

    def resume(self, left: int, max_new: int) -> int:
        """The unfinished chunked request's next chunk (`add_chunked_req`): not checked
        against the KV budget; promises its output only with its last chunk."""
        new = max(0, min(left, self.rem_chunk))
        self._take(new, min(max_new, self.clip) if new == left else 0)
        return new

    def admit(self, extend: int, max_new: int) -> int:
        """Tokens a waiting request prefills in this batch (fewer than `extend`: it is
        chunked), or 0: it and everything behind it wait (`add_one_req`)."""
        if self.stop:
            return 0
        if extend + min(max_new, self.clip) >= self.rem_total:
            self.stop = self.full = True
            return 0
        if extend >= self.rem_input and self.admitted:
            self.stop = True
            return 0
        if extend <= self.rem_chunk:
            self._take(extend, min(max_new, self.clip))
            return extend
        new = self.rem_chunk
        if new <= 0:
            self.stop = True
            return 0
        self._take(new, 0)
        self.stop = True
        return new

    def refuse(self) -> None:
        """The KV blocks of an admitted request were not there after all (block rounding)."""
        self.stop = self.full = True


def lpm_order(hits: list[int], shares: list[Any], threshold: int) -> list[int]:
    """Positions of the waiting requests in SGLang's lpm order: longest cached prefix first
    (tokens in `hits`), stable; a request with at most `threshold` cached tokens whose first
    `threshold` tokens (`shares`: their identity, None when shorter) an earlier such request
    brings goes last (`SchedulePolicy._compute_prefix_matches`)."""
    seen: set[Any] = set()
    keys: list[float] = []
    for hit, share in zip(hits, shares, strict=True):
        if hit <= threshold and share is not None:
            if share in seen:
                keys.append(float("inf"))
                continue
            seen.add(share)
        keys.append(-hit)
    return sorted(range(len(keys)), key=keys.__getitem__)


def retract_order(generated: list[int], prompt: list[int], speculative: bool) -> list[int]:
    """Positions of the running decodes (in batch order) in the order SGLang retracts them:
    fewest tokens generated, then the longest prompt, then the newest; with speculation the
    newest first (`ScheduleBatch.retract_decode`)."""
    n = len(generated)
    if speculative:
        return list(range(n - 1, -1, -1))
    keep = sorted(range(n), key=lambda j: (generated[j], -prompt[j]), reverse=True)
    return keep[::-1]
