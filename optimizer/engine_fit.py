"""Fit the engine constants that no kernel table measures (`trilemma calibrate-engine`).

Four figures in perf/data/engine.yaml are properties of the serving stack and of how a
closed-loop benchmark is run rather than of any kernel: the CPU cost of an engine step
(scheduling, input preparation, sampling), the cost a request pays before its prefill, fixed
(HTTP, streaming the first token) and per prompt token (tokenization, input processing), and
how many requests a benchmark sends per unit of concurrency (its first wave queues). They
are fitted here to measured end-to-end runs by minimising the mean absolute log error of
TTFT and TPOT together; every other figure comes from kernel fits or datasheets.
Deterministic: a fixed grid, then coordinate refinement.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from trilemma.optimizer import validation
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import releases
from trilemma.optimizer.perf.engine import RELEASE_PATTERN, Engine, EngineFacts, engine_facts

FITTED = ("step_overhead_ms", "request_overhead_ms", "request_overhead_per_prompt_token_us",
          "benchmark_requests_per_concurrency")
# Search ranges: physically plausible bounds, not tuning knobs.
_BOUNDS = {
    "step_overhead_ms": (0.0, 5.0),
    "request_overhead_ms": (0.0, 60.0),
    "request_overhead_per_prompt_token_us": (0.0, 20.0),
    "benchmark_requests_per_concurrency": (2.0, 40.0),
}
_GRID = {
    "step_overhead_ms": (0.25, 1.0, 2.0),
    "request_overhead_ms": (5.0, 15.0, 30.0),
    "request_overhead_per_prompt_token_us": (0.0, 2.0, 5.0),
    "benchmark_requests_per_concurrency": (4.0, 10.0, 20.0),
}


@dataclass(frozen=True, kw_only=True)
class EngineFit:
    engine: Engine
    values: Mapping[str, float]
    loss: float                  # mean |log(pred / measured)| over TTFT and TPOT
    rows: int


@dataclass(frozen=True, kw_only=True)
class Release:
    """The engine release a fit's rows ran, and the container image they name."""

    version: str                 # e.g. "0.5.9"
    image: str | None            # e.g. "lmsysorg/sglang:v0.5.9-cu130"; None: no row names one


# A released version ("0.5.9", "0.5.8.post1", "1.2.0rc6"): nightly and unnamed builds are not
# an engine anyone can pin.
_RELEASE = RELEASE_PATTERN
# The image a row names in its provenance ("...; image=lmsysorg/sglang:v0.5.9-cu130; ...").
_IMAGE = re.compile(r"(?:^|[;=\s])([a-z0-9._-]+/[a-z0-9._-]+:v[A-Za-z0-9._-]+)")
# Per-architecture tags of one multi-arch image: the plain tag runs on either.
_ARCH_SUFFIX = re.compile(r"-(amd64|arm64)$")


def calibrated_release(rows: Sequence[Mapping[str, str]], engine: Engine) -> Release:
    """The release most of `engine`'s fitted rows ran (ties: the newer), and the image most of
    those rows name: the engine version the fitted figures describe, to deploy with."""
    chosen = engine_rows(rows, engine)
    counts = Counter(v for r in chosen if _RELEASE.match(v := (r.get("backend_version") or "")))
    if not counts:
        raise InputError("backend_version", engine.value, "no fitted row names a release")
    version = max(counts, key=lambda v: (counts[v], releases.version_key(v)))
    images = Counter(_ARCH_SUFFIX.sub("", m.group(1)) for r in chosen
                     if r.get("backend_version") == version
                     and (m := _IMAGE.search(r.get("silicon_data_source") or "")))
    image = max(images, key=lambda i: (images[i], i)) if images else None
    return Release(version=version, image=image)


def with_values(base: EngineFacts, values: Mapping[str, float]) -> EngineFacts:
    """`base` with the FITTED constants taken from `values` (which holds all of them)."""
    return dataclasses.replace(
        base, step_overhead_ms=values["step_overhead_ms"],
        request_overhead_ms=values["request_overhead_ms"],
        request_overhead_per_prompt_token_us=values["request_overhead_per_prompt_token_us"],
        benchmark_requests_per_concurrency=values["benchmark_requests_per_concurrency"])


def _loss(rows: Sequence[Mapping[str, str]], facts: EngineFacts,
          simulate: bool = False) -> float:
    results = validation.predict_rows(rows, facts={facts.engine: facts},
                                      simulate={facts.engine} if simulate else ())
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


def fitted_keys(base: EngineFacts, simulate: bool = False) -> tuple[str, ...]:
    """The FITTED constants the engine's scheduler model uses: a prefill-first engine's
    closed loop moves in whole waves, so the first-wave weight has nothing to fit there; nor
    has it under `simulate`, where the simulator runs the client's own requests (its count
    comes from bench_clients.yaml)."""
    fitted = tuple(k for k in FITTED if k != "benchmark_requests_per_concurrency"
                   or not (base.prefill_first or simulate))
    if base.prefill_first:
        # Nor is its per-request overhead split by prompt length: SGLang's model keeps one.
        return tuple(k for k in fitted if k != "request_overhead_per_prompt_token_us")
    return fitted


def fit(rows: Sequence[Mapping[str, str]], engine: Engine = Engine.VLLM,
        simulate: bool = False) -> EngineFit:
    """Fit FITTED on the aggregated rows of `engine`, scoring the closed form's predictions,
    or with `simulate` the serving simulator's replay of each row's benchmark client
    (validation_sim: about a minute per pass over the dev set, and a fit makes dozens)."""
    chosen = engine_rows(rows, engine)
    base = engine_facts(engine)

    def facts_for(values: Mapping[str, float]) -> EngineFacts:
        return with_values(base, values)

    keys = fitted_keys(base, simulate)
    best_values: dict[str, float] = {}
    best = math.inf
    for point in itertools.product(*(_GRID[k] if k in keys else (getattr(base, k),)
                                     for k in FITTED)):
        values = dict(zip(FITTED, point, strict=True))
        loss = _loss(chosen, facts_for(values), simulate)
        if loss < best:
            best, best_values = loss, values
    # Coordinate refinement: shrink a step per parameter until it stops helping.
    steps = {k: (hi - lo) / 8.0 for k, (lo, hi) in _BOUNDS.items()}
    for _ in range(4):
        for key in keys:
            lo, hi = _BOUNDS[key]
            for direction in (-1.0, 1.0):
                while True:
                    trial = dict(best_values)
                    trial[key] = min(hi, max(lo, best_values[key] + direction * steps[key]))
                    if trial[key] == best_values[key]:
                        break
                    loss = _loss(chosen, facts_for(trial), simulate)
                    if loss >= best - 1e-9:
                        break
                    best, best_values = loss, trial
            steps[key] /= 2.0
    rounded = {k: round(v, 3) for k, v in best_values.items()}
    return EngineFit(engine=engine, values=rounded, loss=round(best, 5), rows=len(chosen))


def write(fitted: EngineFit, release: Release, path: Path | None = None) -> Path:
    """Rewrite the fitted values and the release they were fitted on in engine.yaml in place,
    keeping its comments and sources."""
    path = path or default_engine_yaml()
    text = path.read_text()
    section = f"\n{fitted.engine.value}:\n"
    start = text.index(section)
    end = _next_top_level_key(text, start + len(section))
    block = text[start:end]
    entries = [(rf"(\n  {key}:\n    value: )[-0-9.e]+", str(value))
               for key, value in fitted.values.items()]
    entries.append((r'(\n  calibrated_release:\n    version: )"[^"\n]*"', f'"{release.version}"'))
    entries.append((r'(\n  calibrated_release:\n    version: "[^"\n]*"\n    image: )[^\n]*',
                    f'"{release.image}"' if release.image else "null"))
    for pattern, value in entries:
        # Backslashes doubled: the value is literal text in the replacement template.
        block, count = re.subn(pattern, r"\g<1>" + value.replace("\\", "\\\\"), block)
        if count != 1:
            raise ValueError(f"{path}: no single '{pattern}' entry under {fitted.engine.value}")
    path.write_text(text[:start] + block + text[end:])
    return path


def _next_top_level_key(text: str, pos: int) -> int:
    match = re.search(r"\n[A-Za-z_]", text[pos:])
    return pos + match.start() if match else len(text)


def default_engine_yaml() -> Path:
    return Path(str(resources.files("trilemma.optimizer.perf").joinpath("data/engine.yaml")))


def main(csv_path: Path, engine: Engine = Engine.VLLM,
         simulate: bool = False) -> tuple[EngineFit, Release]:
    rows = validation.read_rows(csv_path)
    return fit(rows, engine, simulate), calibrated_release(rows, engine)


def holdout(csv_path: Path, engine: Engine, system: str,
            simulate: bool = False) -> tuple[EngineFit, validation.Summary]:
    """Fit on every system but `system`, then score `system`'s rows with those constants.

    The shipped constants are fitted on all rows, so `trilemma validate` on the same file is
    in-sample for these figures; this gives the out-of-sample view.
    """
    rows = engine_rows(validation.read_rows(csv_path), engine)
    train = [r for r in rows if r.get("system") != system]
    test = [r for r in rows if r.get("system") == system]
    if not train or not test:
        raise InputError("holdout_system", system, "needs rows both on and off that system")
    fitted = fit(train, engine, simulate)
    facts = with_values(engine_facts(engine), fitted.values)
    summary = validation.summarize(validation.predict_rows(
        test, facts={engine: facts}, simulate={engine} if simulate else ()))
    return fitted, summary
