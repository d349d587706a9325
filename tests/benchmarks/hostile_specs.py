"""Benchmark: the worst one search can cost at the spec bounds (optimizer/spec/limits.py).

    python -m tests.benchmarks.hostile_specs [--case NAME]

Each case is a spec an application team could write, pushed to the bounds the schema allows:
the largest pool, the highest rate, the longest prompts, the widest histogram, every GPU type,
several candidate models. Each search runs in its own process (as the operator runs it: one
screening worker), and the figures are that process's wall time and peak resident memory, so
one case's caches do not flatter the next. The README's threat model quotes the worst line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

from trilemma.optimizer.catalog.models import bundled_models
from trilemma.optimizer.spec import limits

_BASE: dict[str, Any] = {
    "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
    "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                 "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
                 "arrivals": {"kind": "poisson", "requestsPerSecond": 5}},
    "slo": {"ttftMs": {"p90": 1000}, "tpotMs": {"p90": 50}},
    "hardware": {"gpus": [{"gpu": "h100_sxm", "count": 64}]},
}
_ALL_GPUS = ["h100_sxm", "h200_sxm", "b200_sxm", "l40s", "a100_sxm"]


def _case(**changes: Any) -> dict[str, Any]:
    spec = json.loads(json.dumps(_BASE))
    for path, value in changes.items():
        node = spec
        *parents, last = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return spec


CASES: dict[str, dict[str, Any]] = {
    "baseline (64 H100)": _case(),
    "largest pool, fill it": _case(
        hardware__gpus=[{"gpu": "h100_sxm", "count": limits.MAX_POOL_GPUS}],
        objective="max_throughput"),
    "highest rate, largest pool": _case(
        workload__arrivals={"kind": "poisson", "requestsPerSecond": limits.MAX_RATE_RPS},
        hardware__gpus=[{"gpu": g, "count": limits.MAX_POOL_GPUS} for g in _ALL_GPUS]),
    "longest prompts": _case(
        workload__promptTokens={"kind": "fixed", "value": limits.MAX_TOKENS},
        workload__prefix={"sharedTokens": limits.MAX_TOKENS, "hitRate": 1.0}),
    "widest histogram": _case(workload__promptTokens={
        "kind": "histogram", "values": list(range(1, limits.MAX_HISTOGRAM_BINS + 1)),
        "weights": [1.0] * limits.MAX_HISTOGRAM_BINS}),
    # The operator's spec takes at most 16 candidate models (resources.py); the catalog's
    # first 16, on every GPU type at the largest count and the highest rate.
    "16 models, every GPU, highest rate": {**_case(
        workload__arrivals={"kind": "poisson", "requestsPerSecond": limits.MAX_RATE_RPS},
        hardware__gpus=[{"gpu": g, "count": limits.MAX_POOL_GPUS} for g in _ALL_GPUS]),
        "model": None, "models": [{"id": m} for m in sorted(bundled_models())[:16]]},
}


def run_one(name: str) -> dict[str, Any]:
    """Run one case here (the child process) and return its figures."""
    from trilemma.optimizer.errors import InputError
    from trilemma.optimizer.search import InfeasibleSLO, SearchSettings, plan
    from trilemma.optimizer.spec import PlanRequest

    spec = {k: v for k, v in CASES[name].items() if v is not None}
    start = time.perf_counter()
    try:
        result = plan(PlanRequest.model_validate(spec), settings=SearchSettings(workers=1))
        outcome = result.recommended.config.summary()
    except (InfeasibleSLO, InputError) as err:
        outcome = f"refused: {str(err)[:80]}"
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": name, "seconds": round(seconds, 2), "peak_mib": round(peak_mib),
            "outcome": outcome}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="one case (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child)))
        return 0
    rows = []
    for name in [args.case] if args.case else list(CASES):
        out = subprocess.run([sys.executable, "-m", "tests.benchmarks.hostile_specs",
                              "--child", name], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{row['case']:<30} {row['seconds']:>7.1f} s {row['peak_mib']:>6} MiB  "
              f"{row['outcome']}", flush=True)
    worst_s = max(rows, key=lambda r: r["seconds"])
    worst_m = max(rows, key=lambda r: r["peak_mib"])
    print(f"worst time: {worst_s['seconds']} s ({worst_s['case']}); worst memory: "
          f"{worst_m['peak_mib']} MiB ({worst_m['case']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
