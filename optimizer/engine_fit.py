"""Fit the engine constants that no kernel table measures (`trilemma calibrate-engine`).

Three figures in perf/data/engine.yaml are properties of the serving stack and of how a
closed-loop benchmark is run rather than of any kernel: the fixed cost of an engine step
(scheduling, input preparation, sampling), the fixed cost a request pays before its prefill
(HTTP, tokenization, streaming the first token), and how many requests a benchmark sends per
unit of concurrency (its first wave queues). They are fitted here to measured end-to-end
runs by minimising the mean absolute log error of TTFT and TPOT together; every other figure
comes from kernel fits or datasheets. Deterministic: a fixed grid, then coordinate refinement.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from trilemma.optimizer import validation
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf.engine import Engine, EngineFacts, engine_facts

FITTED = ("step_overhead_ms", "request_overhead_ms", "benchmark_requests_per_concurrency")
# Search ranges: physically plausible bounds, not tuning knobs.
_BOUNDS = {
    "step_overhead_ms": (0.0, 5.0),
    "request_overhead_ms": (0.0, 60.0),
    "benchmark_requests_per_concurrency": (2.0, 40.0),
}
_GRID = {
    "step_overhead_ms": (0.25, 1.0, 2.0),
    "request_overhead_ms": (5.0, 15.0, 30.0),
    "benchmark_requests_per_concurrency": (4.0, 10.0, 20.0),
}


@dataclass(frozen=True, kw_only=True)
class EngineFit:
    engine: Engine
    values: Mapping[str, float]
    loss: float                  # mean |log(pred / measured)| over TTFT and TPOT
    rows: int


def with_values(base: EngineFacts, values: Mapping[str, float]) -> EngineFacts:
    """`base` with the FITTED constants taken from `values` (which holds all of them)."""
    return dataclasses.replace(
        base, step_overhead_ms=values["step_overhead_ms"],
        request_overhead_ms=values["request_overhead_ms"],
        benchmark_requests_per_concurrency=values["benchmark_requests_per_concurrency"])


def _loss(rows: Sequence[Mapping[str, str]], facts: EngineFacts) -> float:
    results = validation.predict_rows(rows, facts={facts.engine: facts})
    errs = []
    for r in results:
        if r.skipped:
            continue
        for pred, meas in ((r.pred_ttft_ms, r.measured_ttft_ms),
                           (r.pred_tpot_ms, r.measured_tpot_ms)):
            if pred and meas:
                errs.append(abs(math.log(pred / meas)))
    return float(np.mean(errs)) if errs else math.inf


def engine_rows(rows: Sequence[Mapping[str, str]], engine: Engine) -> list[Mapping[str, str]]:
    """The aggregated rows measured on `engine`: what its constants are fitted to."""
    return [r for r in rows if (r.get("backend") or "").strip().lower() == engine.value
            and (r.get("mode") or "").strip() == "agg"]


def fit(rows: Sequence[Mapping[str, str]], engine: Engine = Engine.VLLM) -> EngineFit:
    """Fit FITTED on the aggregated rows of `engine`."""
    chosen = engine_rows(rows, engine)
    base = engine_facts(engine)

    def facts_for(values: Mapping[str, float]) -> EngineFacts:
        return with_values(base, values)

    best_values: dict[str, float] = {}
    best = math.inf
    for s in _GRID["step_overhead_ms"]:
        for q in _GRID["request_overhead_ms"]:
            for n in _GRID["benchmark_requests_per_concurrency"]:
                values = dict(zip(FITTED, (s, q, n), strict=True))
                loss = _loss(chosen, facts_for(values))
                if loss < best:
                    best, best_values = loss, values
    # Coordinate refinement: shrink a step per parameter until it stops helping.
    steps = {k: (hi - lo) / 8.0 for k, (lo, hi) in _BOUNDS.items()}
    for _ in range(4):
        for key in FITTED:
            lo, hi = _BOUNDS[key]
            for direction in (-1.0, 1.0):
                while True:
                    trial = dict(best_values)
                    trial[key] = min(hi, max(lo, best_values[key] + direction * steps[key]))
                    if trial[key] == best_values[key]:
                        break
                    loss = _loss(chosen, facts_for(trial))
                    if loss >= best - 1e-9:
                        break
                    best, best_values = loss, trial
            steps[key] /= 2.0
    rounded = {k: round(v, 3) for k, v in best_values.items()}
    return EngineFit(engine=engine, values=rounded, loss=round(best, 5), rows=len(chosen))


def write(fitted: EngineFit, path: Path | None = None) -> Path:
    """Rewrite the fitted values in engine.yaml in place, keeping its comments and sources."""
    path = path or default_engine_yaml()
    text = path.read_text()
    section = f"\n{fitted.engine.value}:\n"
    start = text.index(section)
    end = _next_top_level_key(text, start + len(section))
    block = text[start:end]
    for key, value in fitted.values.items():
        block, count = re.subn(rf"(\n  {key}:\n    value: )[-0-9.e]+", rf"\g<1>{value}", block)
        if count != 1:
            raise ValueError(f"{path}: no single '{key}: value:' entry under {fitted.engine.value}")
    path.write_text(text[:start] + block + text[end:])
    return path


def _next_top_level_key(text: str, pos: int) -> int:
    match = re.search(r"\n[A-Za-z_]", text[pos:])
    return pos + match.start() if match else len(text)


def default_engine_yaml() -> Path:
    return Path(str(resources.files("trilemma.optimizer.perf").joinpath("data/engine.yaml")))


def main(csv_path: Path, engine: Engine = Engine.VLLM) -> EngineFit:
    return fit(validation.read_rows(csv_path), engine)


def holdout(csv_path: Path, engine: Engine, system: str) -> tuple[EngineFit, validation.Summary]:
    """Fit on every system but `system`, then score `system`'s rows with those constants.

    The shipped constants are fitted on all rows, so `trilemma validate` on the same file is
    in-sample for these three figures; this gives the out-of-sample view.
    """
    rows = engine_rows(validation.read_rows(csv_path), engine)
    train = [r for r in rows if r.get("system") != system]
    test = [r for r in rows if r.get("system") == system]
    if not train or not test:
        raise InputError("holdout_system", system, "needs rows both on and off that system")
    fitted = fit(train, engine)
    facts = with_values(engine_facts(engine), fitted.values)
    summary = validation.summarize(validation.predict_rows(test, facts={engine: facts}))
    return fitted, summary
