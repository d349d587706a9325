"""`trilemma loadgen`: synthetic traffic against OpenAI-compatible endpoints, and its report.

The flags describe one phase; `--phases FILE.yaml` lists several, each changing only what it
names (the flags give the starting values):

    phases:
      - {duration_s: 30, rate: 5, prompt_mean: 1000, prompt_p90: 2000}
      - {duration_s: 30, rate: 20, prompt_mean: 8000, prompt_p90: 12000}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import yaml

from trilemma.optimizer.cli import Subcommand
from trilemma.optimizer.errors import InputError
from trilemma.simfleet import loadgen

EXIT_NOTHING_COMPLETED = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", nargs="+", default=["http://127.0.0.1:8000"],
                   help="base URL(s) of the server(s); several are load-balanced")
    p.add_argument("--balance", choices=[b.value for b in loadgen.Balance],
                   default=loadgen.Balance.ROUND_ROBIN.value)
    p.add_argument("--model", default=None, help="model name to send (default: /v1/models)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds (one phase)")
    p.add_argument("--rate", type=float, default=5.0, help="open loop: requests/s")
    p.add_argument("--arrivals", choices=[a.value for a in loadgen.Arrival],
                   default=loadgen.Arrival.POISSON.value)
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: CV of the gaps")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: this many users, one request each at a time")
    p.add_argument("--think", type=float, default=0.0,
                   help="closed loop: mean think time between a user's requests (s)")
    p.add_argument("--prompt-mean", type=float, default=1000.0)
    p.add_argument("--prompt-p90", type=float, default=None,
                   help="lognormal prompts with this p90 (default: all prompt-mean)")
    p.add_argument("--output-mean", type=float, default=200.0)
    p.add_argument("--output-p90", type=float, default=None)
    p.add_argument("--prefix-share", type=float, default=0.0,
                   help="share of requests that start with a shared prefix")
    p.add_argument("--prefix-tokens", type=int, default=0, help="tokens of each shared prefix")
    p.add_argument("--prefixes", type=int, default=1, help="how many shared prefixes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", type=Path, default=None, help="YAML/JSON list of phases")
    p.add_argument("--drain", type=float, default=120.0,
                   help="seconds to wait for requests in flight after the last phase")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")


def phases_from_args(args: argparse.Namespace) -> list[loadgen.LoadStage]:
    base = loadgen.LoadStage(
        duration_s=args.duration, rate=args.rate, arrivals=loadgen.Arrival(args.arrivals),
        cv=args.cv, concurrency=args.concurrency, think_s=args.think,
        prompt_mean=args.prompt_mean, prompt_p90=args.prompt_p90,
        output_mean=args.output_mean, output_p90=args.output_p90,
        prefix_share=args.prefix_share, prefix_tokens=args.prefix_tokens,
        prefixes=args.prefixes)
    if args.phases is None:
        return [base]
    try:
        doc = yaml.safe_load(args.phases.read_text())
    except OSError as exc:
        raise InputError("phases", str(args.phases), f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError("phases", str(args.phases), f"not YAML or JSON: {exc}") from None
    return loadgen.parse_phases(doc, base)


def run(args: argparse.Namespace) -> int:
    phases = phases_from_args(args)
    try:
        report = asyncio.run(loadgen.run_load(
            args.url, phases, seed=args.seed, model=args.model,
            balance=loadgen.Balance(args.balance), drain_s=args.drain))
    except aiohttp.ClientError as exc:
        print(f"trilemma loadgen: error: {exc}", file=sys.stderr)
        return EXIT_NOTHING_COMPLETED
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    sent = report.overall.sent
    return EXIT_NOTHING_COMPLETED if sent and not report.overall.completed else 0


SUBCOMMAND = Subcommand(
    name="loadgen",
    help="send phases of synthetic traffic to OpenAI-compatible servers and report it",
    add_arguments=add_arguments, run=run)
