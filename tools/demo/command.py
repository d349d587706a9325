"""`trilemma demo`: the command line (its options, the printed summary, the exit code).

Exit 0 when the loop re-planned and rolled out, 1 otherwise, 2 when Prometheus is not
installed (after the planning part, which needs none) or, on the emulated API, KMock is not
(`pip install 'trilemma[demo]'`), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from trilemma.optimizer.cli import Subcommand
from trilemma.tools.demo.run import run_demo
from trilemma.tools.demo.scenario import CONTROL_PLANES, INTERVAL_S, SHIFTS, WINDOW_S, DemoOptions
from trilemma.tools.demo.scoring import EXIT_INTERRUPTED, DemoResult, Estimate, FigureKey, errors


def summary_lines(result: DemoResult) -> list[str]:
    lines = ["", "summary"]
    plan, new = result.plan, result.new_plan
    if result.rolled_out:
        lines.append(f"  re-planned and rolled out: {plan.get('summary')} -> "
                     f"{new.get('summary')}")
    elif result.replanned:
        verdict = ("kept the running configuration" if result.accepted is False else
                   "no rollout completed")
        lines.append(f"  re-planned after the shift; {verdict}")
    else:
        lines.append("  no re-plan after the shift")
    delay = result.detection_delay_s
    from trilemma.operator import retune  # heavy (the optimizer): only when summarising
    from trilemma.operator.resources import Retune

    needed = retune.drift_checks_needed(Retune(enabled=True, interval_seconds=INTERVAL_S,
                                               window_seconds=WINDOW_S))
    lines.append("  detection delay: " + (f"{delay:.0f} s after the shift (checks every "
                                           f"{INTERVAL_S} s over a {WINDOW_S} s window; a "
                                           f"drift must show in {needed} checks in a row, "
                                           "an SLO miss in 2)"
                                           if delay is not None else "not detected"))
    lines.append(f"  during steady traffic: {result.steady_replans} re-plan(s), "
                 f"{result.steady_rollouts} rollout(s) (expected: 0)")
    lines += _estimate_table(result.estimates)
    for name, figures in result.load.items():
        if figures["sent"]:
            refused = sum(figures["errors"].values())
            lines.append(f"  loadgen {name}: {figures['sent']} requests in "
                         f"{figures['durationSeconds']:g} s ({figures['rateRps']:.2f} req/s), "
                         f"prompt mean {figures['promptMean']}, output mean "
                         f"{figures['outputMean']}, {refused} failed")
    if result.log_problems:
        lines.append(f"  operator log: {len(result.log_problems)} warning(s)/error(s), the "
                     f"last: {result.log_problems[-1]} (--verbose shows the log)")
    lines.append(f"  exit code {result.exit_code}")
    return lines


def _estimate_table(estimates: list[Estimate]) -> list[str]:
    """Each phase's estimate against loadgen's truth, one row per figure."""
    if not estimates:
        return []
    lines = ["  the operator's estimate (status.observedWorkload) against what loadgen saw "
             "finish in the same window:",
             f"    {'':18}" + "".join(f"{e.phase + ('' if e.full_window else ' (part)'):>28}"
                                   for e in estimates)]
    rows: tuple[tuple[FigureKey, str], ...] = (
        ("rate", "rate req/s"), ("prompt", "prompt tokens mean"),
        ("output", "output tokens mean"), ("prefix", "prefix hit share"),
        ("ttft_p90_ms", "TTFT p90 ms"))
    for key, label in rows:
        cells = []
        for e in estimates:
            seen, true = e.observed.get(key), e.truth.get(key)
            err = errors(e)
            if seen is None or true is None:
                cells.append("-")
            elif key == "prefix":
                cells.append(f"{seen:.3f} vs {true:.3f} ({err['prefix_points']:+.1f} pt)")
            else:
                digits = 2 if key == "rate" else 0
                cells.append(f"{seen:.{digits}f} vs {true:.{digits}f} "
                             f"({err[key]:+.1%})")
        lines.append(f"    {label:18}" + "".join(f"{c:>28}" for c in cells))
    lines.append("    (TTFT: the server's histogram, whose buckets jump from 100 to 250 ms, "
                 "against the client's own clock)")
    return lines


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steady-s", type=_positive, default=DemoOptions.steady_s,
                   help="seconds of traffic matching the spec before the shift (a check "
                        f"needs a full {WINDOW_S} s window of it; default %(default)g)")
    p.add_argument("--shift-s", type=_positive, default=DemoOptions.shift_s,
                   help="at most this many seconds of shifted traffic; the demo ends sooner "
                        "once the rollout is through (default %(default)g)")
    p.add_argument("--shift", choices=SHIFTS, default=DemoOptions.shift,
                   help="prompt: prompts 4x longer (the GPU then misses the TTFT SLO: a new "
                        "layout rolls out); rate: 4x the requests/s (the planned GPU has "
                        "the headroom: the loop re-plans and keeps it)")
    p.add_argument("--seed", type=int, default=DemoOptions.seed,
                   help="seed of the traffic and the simulated servers")
    p.add_argument("--control-plane", choices=CONTROL_PLANES, default="auto",
                   help="real: kube-apiserver, controllers, scheduler and kwok GPU nodes "
                        "(bash .ci/install-kube builds them); kmock: the emulated API; auto "
                        "(default): real when built")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (timeline, plans, figures) instead")
    p.add_argument("--verbose", action="store_true", help="the operator's log on stderr")


def run(args: argparse.Namespace) -> int:
    options = DemoOptions(steady_s=args.steady_s, shift_s=args.shift_s, shift=args.shift,
                          seed=args.seed, verbose=args.verbose,
                          control_plane=args.control_plane)
    out = None if args.json else sys.stdout
    try:
        result = asyncio.run(run_demo(options, out=out))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("trilemma demo: interrupted; everything it started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in summary_lines(result):
            print(line)
    if result.message:
        print(f"trilemma demo: {result.message}", file=sys.stderr)
    return result.exit_code


SUBCOMMAND = Subcommand(
    name="demo",
    help="run the closed loop on this machine: plan, traffic shift, detection, re-plan, "
         "rollout (needs the prometheus binary)",
    add_arguments=add_arguments, run=run)
