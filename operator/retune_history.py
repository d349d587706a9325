"""The retune loop's record: `status.retuneHistory`, the last decisions and why.

Each check's decision (retune.py), each judged re-plan (acceptance.py) and each failure
becomes one entry; a hold repeated at every check folds into one, so that a long cooldown does
not push the re-plans out of the ten entries kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trilemma.operator import retune
from trilemma.operator.acceptance import Acceptance
from trilemma.operator.retune import stamp
from trilemma.operator.status_models import MAX_HISTORY, RetuneHistoryEntry, RetuneStep

# What an entry records; the enum is the status model's, so that the CRD lists its values.
Step = RetuneStep


@dataclass(frozen=True, kw_only=True)
class RetuneEvent:
    time: float
    action: Step
    reason: str
    cause: str | None = None  # the decision's Why, when the event comes from one
    from_hash: str | None = None
    to_hash: str | None = None
    figures: Mapping[str, float] = field(default_factory=dict)

    def to_status(self) -> RetuneHistoryEntry:
        return RetuneHistoryEntry(
            time=stamp(self.time), action=self.action, reason=self.reason, cause=self.cause,
            from_hash=self.from_hash, to_hash=self.to_hash,
            figures={k: self.figures[k] for k in sorted(self.figures)} or None)

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


def append(history: Sequence[RetuneHistoryEntry | Mapping[str, Any]] | None,
           event: RetuneEvent, keep: int = MAX_HISTORY) -> list[RetuneHistoryEntry]:
    """`status.retuneHistory` (its models or wire form) with `event` added, oldest first, at
    most `keep` entries. A hold with the same cause as the entry before it replaces that entry,
    so that a hold reported at every check (a long cooldown) does not push the re-plans out of
    the history."""
    entries = [RetuneHistoryEntry.model_validate(e) for e in history or ()]
    new = event.to_status()
    if (new.action is Step.HOLD and entries and entries[-1].action is Step.HOLD
            and entries[-1].cause == new.cause):
        entries.pop()
    return [*entries, new][-keep:] if keep > 0 else []
