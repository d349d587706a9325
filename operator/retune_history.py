"""The retune loop's record: `status.retuneHistory`, the last decisions and why.

Each check's decision (retune.py), each judged re-plan (acceptance.py) and each failure
becomes one entry; a hold repeated at every check folds into one, so that a long cooldown does
not push the re-plans out of the ten entries kept.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trilemma.operator import retune
from trilemma.operator.acceptance import Acceptance
from trilemma.operator.retune import stamp

Obj = dict[str, Any]


class Step(enum.StrEnum):
    """What a `status.retuneHistory` entry records."""

    REPLAN = "Replan"  # a re-plan was started
    ROLL_OUT = "RollOut"  # its recommendation is rolling out
    KEEP = "Keep"  # its recommendation was not worth a rollout
    FAILED = "Failed"  # the re-plan or its rollout failed
    HOLD = "Hold"  # a re-plan was due but held (cooldown, same workload failed)


@dataclass(frozen=True, kw_only=True)
class RetuneEvent:
    time: float
    action: Step
    reason: str
    cause: str | None = None  # the decision's Why, when the event comes from one
    from_hash: str | None = None
    to_hash: str | None = None
    figures: Mapping[str, float] = field(default_factory=dict)

    def to_status(self) -> Obj:
        out: Obj = {"time": stamp(self.time), "action": self.action.value,
                    "reason": self.reason}
        if self.cause is not None:
            out["cause"] = self.cause
        if self.from_hash is not None:
            out["fromHash"] = self.from_hash
        if self.to_hash is not None:
            out["toHash"] = self.to_hash
        if self.figures:
            out["figures"] = {k: self.figures[k] for k in sorted(self.figures)}
        return out

    @classmethod
    def of_decision(cls, decision: retune.Decision, now: float,
                    serving_hash: str | None = None) -> RetuneEvent:
        step = Step.REPLAN if decision.action is retune.Action.REPLAN else Step.HOLD
        return cls(time=now, action=step, reason=decision.message, cause=decision.why.value,
                   from_hash=serving_hash, figures=decision.figures)

    @classmethod
    def of_acceptance(cls, acceptance: Acceptance, now: float) -> RetuneEvent:
        return cls(time=now, action=Step.ROLL_OUT if acceptance.roll_out else Step.KEEP,
                   reason=acceptance.reason, from_hash=acceptance.current_hash,
                   to_hash=acceptance.candidate_hash, figures=acceptance.figures)


def append(history: Sequence[Mapping[str, Any]] | None, event: RetuneEvent,
           keep: int = 10) -> list[Obj]:
    """`status.retuneHistory` with `event` added, oldest first, at most `keep` entries. A hold
    with the same cause as the entry before it replaces that entry, so that a hold reported at
    every check (a long cooldown) does not push the re-plans out of the history."""
    entries = [dict(e) for e in history or ()]
    new = event.to_status()
    last = entries[-1] if entries else {}
    if (new["action"] == Step.HOLD.value and last.get("action") == Step.HOLD.value
            and last.get("cause") == new.get("cause")):
        entries.pop()
    return [*entries, new][-keep:] if keep > 0 else []
