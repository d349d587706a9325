"""Alternatives beside the front: the best plan on each GPU type and on each engine.

The cost/latency front answers "what else is worth running"; it cannot answer "what would the
other GPUs have cost". When one GPU type is cheaper per request at the pool's prices, the
front is that GPU type's configurations alone (often a single point), and the others vanish.
Here every GPU type (and engine) the request allows gets its best configuration by the
objective, restricted to that type, with its cost and latency against the recommendation
and whether the front dominates it: a user reads what choosing otherwise would cost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.search import decoding, ranking
from trilemma.optimizer.search.configs import Choice, _plain
from trilemma.optimizer.search.screening import RowScreen, WorkloadMeans
from trilemma.optimizer.search.sizing import Candidates
from trilemma.optimizer.search.space import Group, SearchSettings
from trilemma.optimizer.spec.objective import Objective


class By(enum.StrEnum):
    """What an alternative fixes: the GPU type or the serving engine."""

    GPU = "gpu"
    ENGINE = "engine"


def key_of(g: Group, by: By) -> str:
    return g.gpu.key if by is By.GPU else g.engine.value


@dataclass(frozen=True, kw_only=True)
class Alternative:
    """The best configuration by the plan's objective on one GPU type or engine that meets
    the SLO within the pool and budget."""

    by: By
    value: str                # the GPU type's catalog key, or the engine
    choice: Choice
    cost_ratio: float         # its $/hour over the recommendation's
    latency_ratio: float      # its latency axis (TTFT p90 + TPOT p90 x output) over the rec's
    dominated: bool           # a front point is no worse on cost and latency, better on one

    def to_dict(self) -> dict[str, Any]:
        return {"by": self.by.value, "value": self.value, "choice": self.choice.to_dict(),
                "cost_ratio": _plain(self.cost_ratio),
                "latency_ratio": _plain(self.latency_ratio), "dominated": self.dominated}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Alternative:
        return decoding.record(cls, data, where, choice=Choice.from_dict)


@dataclass(frozen=True, kw_only=True)
class Context:
    """What the pipeline holds when it picks alternatives."""

    objective: Objective
    candidates: Candidates
    screens: list[RowScreen]
    settings: SearchSettings
    wl: WorkloadMeans
    recommended: Choice
    front: list[Choice]
    simulated: dict[str, Choice]  # by config hash: passed (or could not run) in simulation
    failed: set[str]              # config hashes that missed the SLO in simulation


def alternatives(ctx: Context, allowed: dict[By, list[str]]) -> list[Alternative]:
    """Per dimension with two or more allowed values (one value has nothing to compare), the
    best configuration on each value that has one; GPU types first, then engines, by name."""
    out: list[Alternative] = []
    for by in By:
        values = sorted(set(allowed.get(by, [])))
        if len(values) < 2:
            continue
        keys = np.array([key_of(rs.rows.group, by) for rs in ctx.screens] or [""])
        per_candidate = keys[ctx.candidates.screen.astype(np.int64)]
        for v in values:
            best = _best(ctx, np.flatnonzero(per_candidate == v), by, v)
            if best is not None:
                out.append(_against(ctx, by, v, best))
    return out


_MAX_TRIES = 32  # candidates tried past simulated misses before giving a value up


def _best(ctx: Context, idx: np.ndarray, by: By, value: str) -> Choice | None:
    rec = ctx.recommended
    spans = len(rec.config.gpus_by_type()) > 1
    if key_of_choice(rec, by) == value and not (by is By.GPU and spans):
        # The best of its own kind by construction (a plan over GPU types is no one type's).
        return rec
    if len(idx) == 0:
        return None
    m = ranking.metrics(ctx.candidates.take(idx), ctx.wl)
    for j in ranking.order(ctx.objective, m)[:_MAX_TRIES]:
        c = ranking.choice(ctx.candidates, int(idx[int(j)]), ctx.screens, ctx.settings, ctx.wl)
        h = c.config.config_hash()
        if h not in ctx.failed:
            return ctx.simulated.get(h, c)
    return None


def key_of_choice(c: Choice, by: By) -> str:
    return c.config.worker.gpu if by is By.GPU else c.config.engine.value


def _against(ctx: Context, by: By, value: str, c: Choice) -> Alternative:
    def point(x: Choice) -> tuple[float, float]:
        p = x.prediction
        return p.cost_per_hour, ranking.e2e_ms(p.ttft_p90_ms, p.tpot_p90_ms, ctx.wl)

    cost, lat = point(c)
    rc, rl = point(ctx.recommended)
    dominated = any(fc <= cost and fl <= lat and (fc < cost or fl < lat)
                    for fc, fl in map(point, ctx.front))
    return Alternative(by=by, value=value, choice=c, cost_ratio=cost / rc,
                       latency_ratio=lat / rl, dominated=dominated)
