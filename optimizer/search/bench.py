"""`python -m trilemma.optimizer.search.bench`: the three case studies, phase by phase.

Prints, per case study, candidates enumerated, screened and simulated and the wall time of
each phase (enumerate, screen, size/rank, simulate, explain) and in total.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trilemma.optimizer.search import planning
from trilemma.optimizer.spec import load_spec

CASES = Path(__file__).resolve().parents[2] / "tests" / "unit" / "fixtures" / "search"


def main(argv: list[str] | None = None) -> int:
    names = argv if argv else ["chatbot", "code_completion", "code_rewriting"]
    print(f"{'case':<16} {'enumerated':>12} {'screened':>9} {'feasible':>9} {'sim':>4} "
          f"{'enum':>6} {'screen':>7} {'size':>6} {'sim':>6} {'explain':>7} {'total':>7}")
    for name in names:
        req = load_spec(CASES / f"{name}.yaml")
        t = time.perf_counter()
        p = planning.plan(req)
        wall = time.perf_counter() - t
        c, tm = p.counts, p.timings
        print(f"{name:<16} {c.enumerated:>12,} {c.screened:>9,} {c.feasible:>9,} "
              f"{c.simulated:>4} {tm['enumerate']:>6.2f} {tm['screen']:>7.2f} "
              f"{tm['size_rank']:>6.2f} {tm['simulate']:>6.2f} {tm['explain']:>7.2f} "
              f"{wall:>7.2f}")
        rec = p.recommended
        print(f"  -> {rec.config.summary()}  ${rec.prediction.cost_per_hour:.2f}/h")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
