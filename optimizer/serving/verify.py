"""The draws of speculative verify steps, shared by every driver of the scheduler core.

Split from scheduler.py (which re-exports both names): `verify_yields` draws the tokens of a
decode's every verify step at once, `VerifyDraws` hands them to `Scheduler.complete`.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from trilemma.optimizer.serving.cluster import Speculation

if TYPE_CHECKING:
    from trilemma.optimizer.serving.scheduler import Outcome, Seq



def verify_yields(spec: Speculation, rng: np.random.Generator, left: int) -> np.ndarray:
    """The tokens of every verify step of a decode with `left` tokens to go, drawn at once:
    one uniform per remaining token (a step yields at least one, so that is enough; the tail
    past the last step goes unused). Drawing a request's steps when it starts decoding has
    the step-by-step distribution and lets the fast engine plan the whole decode ahead on the
    same random numbers as the core's drivers."""
    return spec.step_tokens(rng.random(left))


class VerifyDraws:
    """The `draw` that drivers hand to `Scheduler.complete`, and its random stream.

    `settle` each step's outcome: a request that started decoding draws its verify steps
    (`verify_yields`, in `Outcome.started` order, so one seed gives every driver one run); a
    preempted one draws afresh when it decodes again, its old draws replaced. Without
    speculation every verify step yields one token and nothing is drawn.
    """

    def __init__(self, spec: Speculation | None, rng: np.random.Generator) -> None:
        self.spec = spec
        self.rng = rng
        self._pending: dict[Seq, deque[int]] = {}

    def __call__(self, seq: Seq) -> int:
        drawn = self._pending.get(seq)
        return drawn.popleft() if drawn else 1

    def settle(self, out: Outcome) -> None:
        if self.spec is not None:
            for seq in out.started:
                steps = verify_yields(self.spec, self.rng, seq.output - seq.generated)
                self._pending[seq] = deque(steps.tolist())
        for seq in out.finished:
            self._pending.pop(seq, None)

    def forget(self, seq: Seq) -> None:
        """`seq` left without finishing (aborted)."""
        self._pending.pop(seq, None)
