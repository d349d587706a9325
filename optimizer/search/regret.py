"""`python -m trilemma.optimizer.search.regret`: what the search's cut-offs cost, measured.

The pipeline (`planning.plan`) prunes to stay fast: dominated engine limits leave the space,
a coarse pass drops layouts before the full screen, and only a handful of finalists reach the
simulator. Here each of a set of random specs, small enough to enumerate, is planned twice:
once by the pipeline, once exhaustively (`exhaustive_settings`: the same predictor and
simulator, nothing pruned, every layout fully screened, more finalists simulated). The regret
of the pipeline's pick is how much worse it scores on the objective's own axis than the
exhaustive pick; the run prints it per spec, then the median and the worst.

Specs are drawn from a seed: the same seed prints the same table on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.search import planning, ranking, screening
from trilemma.optimizer.search.configs import Choice
from trilemma.optimizer.search.explaining import InfeasibleSLO
from trilemma.optimizer.search.space import SearchSettings
from trilemma.optimizer.spec import parse_spec
from trilemma.optimizer.spec.objective import Objective
from trilemma.optimizer.spec.plan_request import PlanRequest

# Small models, two of them MoE (attention DP and EP multiply their layouts), and a few GPU
# types: every space below screens exhaustively in seconds.
MODELS = ("meta-llama/Llama-3.1-8B", "Qwen/Qwen3-8B", "Qwen/Qwen2.5-Coder-14B-Instruct",
          "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-v0.1")
GPUS = ("l40s", "a100_sxm", "h100_sxm", "h200_sxm")
EXHAUSTIVE_TOP_K = 16  # finalists the exhaustive run simulates (the pipeline: simulate_top_k)
_TRIES = 8             # draws per spec until one has a feasible SLO


def random_raw(rng: np.random.Generator) -> dict[str, Any]:
    """One spec document: 1-2 models, 1-2 GPU types of 8 to 32, a lognormal workload, an
    SLO between tight and loose (some draws meet none: the caller draws again)."""
    models = rng.choice(len(MODELS), size=int(rng.integers(1, 3)), replace=False)
    gpus = rng.choice(len(GPUS), size=int(rng.integers(1, 3)), replace=False)
    prompt = float(rng.choice([256, 1024, 2048, 4096]))
    output = float(rng.choice([64, 256, 512]))
    workload: dict[str, Any] = {
        "promptTokens": {"kind": "lognormal", "mean": prompt, "p90": 2 * prompt},
        "outputTokens": {"kind": "lognormal", "mean": output, "p90": 2 * output},
        "arrivals": {"kind": "poisson",
                     "requestsPerSecond": float(rng.choice([0.5, 2, 4, 8, 16, 32]))}}
    if rng.random() < 0.5:
        workload["prefix"] = {"sharedTokens": int(prompt // 2), "hitRate": 0.8}
    pool = [GPUS[int(i)] for i in sorted(gpus)]
    # The A100 has no fp8 tensor cores: a pool of A100s alone may not ask for fp8.
    quants = ["bf16"] if pool == ["a100_sxm"] else ["bf16", "fp8"]
    return {
        "models": [{"id": MODELS[int(i)]} for i in sorted(models)],
        "workload": workload,
        "slo": {"ttftMs": {"p90": round(float(np.exp(rng.uniform(np.log(200), np.log(4000)))))},
                "tpotMs": {"p90": round(float(rng.uniform(12, 80)), 1)}},
        "hardware": {"gpus": [{"gpu": g, "count": int(rng.choice([8, 16, 32]))} for g in pool]},
        "objective": str(rng.choice([o.value for o in Objective])),
        "bounds": {"quantizations": quants, "kvDtypes": ["bf16"],
                   "speculation": ["none"], "maxPipelineParallel": 2,
                   "allowDisaggregation": bool(rng.random() < 0.3)},
    }


def exhaustive_settings(settings: SearchSettings) -> SearchSettings:
    """`settings` without the pipeline's cut-offs: the same ladders and predictor."""
    return dataclasses.replace(settings, prune_dominated=False, coarse_screen=False,
                               simulate_top_k=max(settings.simulate_top_k, EXHAUSTIVE_TOP_K),
                               explain_sensitivity=False)


def regret(objective: Objective, pick: Choice, best: Choice, others: list[Choice],
           wl: screening.WorkloadMeans) -> float:
    """How much worse `pick` scores than `best` on the objective's axis, as a fraction:
    cost, latency or capacity relative to the best's; for balanced, the knee distance over
    `others` (the exhaustive front), in units of the front's span on each axis."""
    p, b = pick.prediction, best.prediction
    lat = [ranking.e2e_ms(c.prediction.ttft_p90_ms, c.prediction.tpot_p90_ms, wl)
           for c in (pick, best)]
    if objective is Objective.MIN_COST:
        return p.cost_per_hour / b.cost_per_hour - 1.0
    if objective is Objective.MIN_LATENCY:
        return lat[0] / lat[1] - 1.0
    if objective is Objective.MAX_THROUGHPUT:
        return b.capacity_rps / p.capacity_rps - 1.0
    everything = [pick, best, *others]
    d = ranking.knee_distance(
        np.array([c.prediction.cost_per_hour for c in everything]),
        np.array([ranking.e2e_ms(c.prediction.ttft_p90_ms, c.prediction.tpot_p90_ms, wl)
                  for c in everything]))
    return float(d[0] - d[1])


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One spec: what the pipeline and the exhaustive run picked, and the regret."""

    label: str
    objective: Objective
    pipeline: Choice
    exhaustive: Choice
    regret: float
    cut: int         # candidates the pipeline pruned as dominated or in the coarse pass
    candidates: int  # feasible candidates the exhaustive run screened


def measure(request: PlanRequest, settings: SearchSettings, seed: int,
            label: str = "") -> Outcome:
    """Plan `request` both ways (raises InfeasibleSLO when nothing meets its SLO)."""
    pipe = planning.plan(request, settings=settings, seed=seed)
    full = planning.plan(request, settings=exhaustive_settings(settings), seed=seed)
    wl = screening.WorkloadMeans.of(request)
    r = regret(request.objective, pipe.recommended, full.recommended, full.front, wl)
    return Outcome(label=label, objective=request.objective, pipeline=pipe.recommended,
                   exhaustive=full.recommended, regret=r,
                   cut=sum(pipe.counts.pruned.get(k, 0)
                           for k in ("coarse", "dominated", "prefix_caching")),
                   candidates=full.counts.feasible)


def describe(raw: dict[str, Any]) -> str:
    models = "+".join(m["id"].split("/")[-1] for m in raw["models"])
    pool = "+".join(f"{g['count']}x{g['gpu']}" for g in raw["hardware"]["gpus"])
    wl = raw["workload"]
    slo = raw["slo"]
    return (f"{models} on {pool}, {wl['arrivals']['requestsPerSecond']:g} rps, "
            f"{wl['promptTokens']['mean']:g}/{wl['outputTokens']['mean']:g} tok, "
            f"TTFT<={slo['ttftMs']['p90']} TPOT<={slo['tpotMs']['p90']}")


def run(n: int, seed: int, settings: SearchSettings) -> Iterator[Outcome]:
    """`n` random specs with a feasible SLO, drawn from `seed`, each measured as it comes."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        for _ in range(_TRIES):
            raw = random_raw(rng)
            try:
                yield measure(parse_spec(raw), settings, seed, describe(raw))
                break
            except InfeasibleSLO:
                continue
        else:
            raise RuntimeError(f"no feasible spec in {_TRIES} draws: widen the SLO ranges")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trilemma.optimizer.search.regret",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--specs", type=int, default=20, help="random specs to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=SearchSettings.simulate_requests,
                    help="requests per confirming simulation")
    args = ap.parse_args(argv)
    settings = SearchSettings(simulate_requests=args.requests)
    print(f"{'#':>3} {'objective':<15} {'regret':>8} {'cut':>7} {'feasible':>8}  "
          f"{'pipeline pick':<34} "
          f"{'exhaustive pick':<34} spec")
    regrets = []
    for i, o in enumerate(run(args.specs, args.seed, settings)):
        regrets.append(o.regret)
        print(f"{i:>3} {o.objective.value:<15} {o.regret:>8.2%} {o.cut:>7} {o.candidates:>8}  "
              f"{o.pipeline.config.summary():<34} {o.exhaustive.config.summary():<34} "
              f"{o.label}", flush=True)
    r = np.array(regrets)
    print(f"\nregret over {len(r)} specs: median {np.median(r):.2%}, worst {r.max():.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
