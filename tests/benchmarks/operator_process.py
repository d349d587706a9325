"""The operator as its own process for the benchmark: real Kopf, real handlers, and a
planner that returns one precomputed plan, so that the figures exclude search time.

    python -m tests.benchmarks.operator_process --plan PLAN.json --liveness-port N
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import kopf

from trilemma.operator import handlers
from trilemma.operator.endpoint import OperatorConfig
from trilemma.optimizer.search import Plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--liveness-port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    plan = Plan.from_dict(json.loads(args.plan.read_text()))

    def planner(_request: Any) -> Plan:
        return plan  # frozen: every reconcile may share it

    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    runtime = handlers.build_runtime(
        OperatorConfig(max_concurrent_optimizations=args.concurrency,
                       cache_dir="/tmp/trilemma-bench"), planner=planner)
    kopf.run(registry=registry, clusterwide=True, standalone=True,
             memo=kopf.Memo(runtime=runtime),
             liveness_endpoint=f"http://127.0.0.1:{args.liveness_port}/healthz")


if __name__ == "__main__":
    main()
