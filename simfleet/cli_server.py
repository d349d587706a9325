"""`trilemma sim-server`: one simulated replica behind an OpenAI-compatible HTTP server.

Configured from a plan (`--plan plan.json`: a ServingConfig, or `trilemma optimize --json`
output, whose recommendation is served) or from the very flags a `vllm serve` container gets
(everything after `--`), so that the sim-server can replace the vLLM container of a rendered
Deployment in a cluster without GPUs:

    trilemma sim-server --gpu h100_sxm -- meta-llama/Llama-3.1-8B-Instruct \\
        --tensor-parallel-size 2 --max-num-seqs 256 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from pathlib import Path

from trilemma.optimizer import commands
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.cli import Subcommand
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search.configs import Mode, ServingConfig
from trilemma.simfleet import engine_flags
from trilemma.simfleet.engine_model import DEFAULT_PREDICTABILITY, EngineModel
from trilemma.simfleet.server import SimServer

DEFAULT_GPU = "h100_sxm"
DEFAULT_PORT = 8000  # vLLM's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", type=Path, default=None,
                   help="a ServingConfig or a plan (JSON/YAML); serves one replica of it")
    p.add_argument("--gpu", default=None,
                   help=f"GPU key to emulate (default: the plan's, else {DEFAULT_GPU})")
    p.add_argument("--engine", choices=["vllm", "sglang"], default=None,
                   help="engine to emulate: timing constants and /metrics names")
    p.add_argument("--host", default=None,
                   help="default 127.0.0.1 with --plan; 0.0.0.0 (vLLM's) with vLLM flags")
    p.add_argument("--port", type=int, default=None, help=f"default {DEFAULT_PORT}")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiplies every step time (0.1 runs ten times faster)")
    p.add_argument("--output-predictability", type=float, default=DEFAULT_PREDICTABILITY,
                   help="0 (creative) .. 1 (rewriting): speculative acceptance")
    # The spelling before the glossary (README), kept so scripts still run.
    p.add_argument("--predictability", dest="output_predictability", type=float,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="vLLM's (>= 0.18): on SIGTERM, answer 503 and let the requests in "
                        "flight finish for up to this many seconds (default 0: abort them)")
    p.add_argument("--request-overhead-ms", type=float, default=None,
                   help="API-server time per request (default: the fitted engine constant)")
    p.add_argument("engine_args", nargs="*", metavar="-- VLLM_FLAG",
                   help="`vllm serve` arguments after --: model, parallelism, limits, ...")


def _from_plan(args: argparse.Namespace) -> ServingConfig:
    config = commands.load_config(args.plan)
    if config.mode is Mode.DISAGGREGATED:
        _warn("the plan is disaggregated; serving one replica of its decode worker, "
              "prefilling and decoding in the same engine")
    worker = config.worker
    if args.gpu:
        worker = dataclasses.replace(worker, gpu=args.gpu)
    engine = Engine(args.engine) if args.engine else config.engine
    return dataclasses.replace(config, engine=engine, worker=worker,
                               mode=Mode.AGGREGATED, replicas=1, prefill=None,
                               prefill_replicas=0)


def _warn(text: str) -> None:
    print(f"trilemma sim-server: warning: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.plan is not None and args.engine_args:
        raise InputError("plan", str(args.plan), "give --plan or vLLM's flags after --, not both")
    if not args.time_scale > 0:
        raise InputError("time_scale", args.time_scale, "must be positive")
    host, port, name = args.host, args.port, args.served_model_name
    shutdown_timeout = args.shutdown_timeout
    if args.plan is not None:
        config = _from_plan(args)
        host = host or "127.0.0.1"
    elif args.engine_args:
        flags = engine_flags.parse_vllm_args(args.engine_args, gpu=args.gpu or DEFAULT_GPU,
                                             engine=args.engine or "vllm")
        if flags.ignored:
            _warn(f"ignoring vLLM flags the simulator does not model: {' '.join(flags.ignored)}")
        if flags.no_effect:
            _warn(f"accepted without effect in a simulator: {' '.join(flags.no_effect)}")
        config = flags.config
        host = host or flags.host or "0.0.0.0"
        port = port if port is not None else flags.port
        name = name or flags.served_model_name
        if shutdown_timeout is None:
            shutdown_timeout = flags.shutdown_timeout
    else:
        raise InputError("plan", None, "give --plan FILE or vLLM's serve flags after --")
    model = EngineModel(config, output_predictability=args.output_predictability,
                        request_overhead_ms=args.request_overhead_ms)
    for note in model.notes:
        _warn(note)
    server = SimServer(model, served_model_name=name, seed=args.seed,
                       time_scale=args.time_scale, shutdown_timeout_s=shutdown_timeout or 0.0)
    asyncio.run(_serve(server, host, DEFAULT_PORT if port is None else port))
    return 0


async def _serve(server: SimServer, host: str, port: int) -> None:
    await server.start(host, port)
    m = server.model
    print(f"sim-server: {server.served_model_name} as {m.config.summary()} "
          f"({m.config.engine}, {m.engines} engine(s), {m.kv_blocks} KV blocks each, "
          f"max_model_len {m.max_model_len}) listening on {host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.shutdown()


SUBCOMMAND = Subcommand(
    name="sim-server",
    help="serve a simulated vLLM replica (OpenAI API, /metrics) timed by the perf model",
    add_arguments=add_arguments, run=run)
