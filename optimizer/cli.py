"""The `trilemma` command line: optimize, simulate, render, estimate, validate, calibrate.

Thin: parse arguments, call the optimizer's modules, print. Bad input exits 2 with the field,
the value and why; the library never prints or exits on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trilemma.optimizer import validation
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import estimate as est

if TYPE_CHECKING:  # imported where used: only `validate` on a latency table needs it
    from trilemma.optimizer import validation_tables

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Subcommand:
    """A command another package adds to `trilemma` (the operator's `crds`, `operator`...).

    The optimizer cannot import those packages; they hand their commands in through `main`.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="meta-llama/Llama-3.1-8B",
                   help="bundled model id (e.g. meta-llama/Llama-3.1-70B) or a config.json path")
    p.add_argument("--gpu", default="h100_sxm", help="GPU key, e.g. h100_sxm, b200_sxm, mi300x")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline parallel size")
    p.add_argument("--dp", type=_positive_int, default=1,
                   help="attention data parallel size (MoE models)")
    p.add_argument("--ep", action="store_true", help="expert parallel MoE layers")
    p.add_argument("--quant", default=None,
                   help="bf16 | fp8 | int8 | int4 | nvfp4 | mxfp4 (default: the checkpoint's)")
    p.add_argument("--kv-dtype", default="bf16", help="bf16 | fp8")
    p.add_argument("--spec", default="none",
                   help="speculation: none | ngram:K | eagle:K | eagle3:K | mtp:K | draft:ID:K")
    p.add_argument("--engine", default="vllm", help="vllm | sglang")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=None)
    p.add_argument("--max-num-seqs", type=_positive_int, default=None)


# The subparsers object argparse hands back (its class is private to argparse).
_Subparsers = argparse._SubParsersAction


def _parser(extra: Sequence[Subcommand] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trilemma", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_estimate(sub)
    _add_validate_and_calibrate(sub)
    _add_optimize_and_simulate(sub)
    _add_render_and_bench(sub)
    for command in extra:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def _add_estimate(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("estimate", help="predict latency, throughput and memory of one config")
    _config_args(p)
    p.add_argument("--phase", choices=["serve", "decode", "prefill"], default="serve",
                   help="serve: closed-loop benchmark at --concurrency; decode/prefill: one step")
    p.add_argument("--concurrency", type=_positive_int, default=16,
                   help="clients of the closed-loop benchmark")
    p.add_argument("--prompt-tokens", type=_positive_int, default=1024,
                   help="prompt tokens per request (--phase prefill: per prompt)")
    p.add_argument("--output-tokens", type=_positive_int, default=1024,
                   help="output tokens per request")
    p.add_argument("--cached-tokens", type=int, default=0,
                   help="prompt tokens served from prefix cache")
    p.add_argument("--output-predictability", type=float, default=0.5,
                   help="0 (creative) .. 1 (rewriting): drives speculation acceptance")
    # The spellings before the glossary (README) named these, kept so scripts still run.
    for old, dest, kind in (("--isl", "prompt_tokens", _positive_int),
                            ("--prompt", "prompt_tokens", _positive_int),
                            ("--osl", "output_tokens", _positive_int),
                            ("--cached", "cached_tokens", int),
                            ("--predictability", "output_predictability", float)):
        p.add_argument(old, dest=dest, type=kind, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
    p.add_argument("--batch", type=_positive_int, default=1, help="--phase decode/prefill batch")
    p.add_argument("--kv-len", type=_positive_int, default=1024, help="--phase decode KV length")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def _add_validate_and_calibrate(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("validate", help="score predictions against measured serving runs")
    p.add_argument("csv", type=Path, help="rows in the AIConfigurator silicon-sample schema")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--compare", choices=["aiconfigurator"], default=None,
                   help="also run NVIDIA AIConfigurator on the same rows and compare "
                        "(pip install 'trilemma[compare]')")
    p.add_argument("--simulate", choices=["vllm", "sglang", "all"], default=None,
                   help="replay each row's benchmark client through the serving simulator "
                        "for this engine's rows instead of the closed form (about a minute "
                        "for the dev set)")

    p = sub.add_parser("calibrate", help="refit the kernel calibration from measured profiles")
    p.add_argument("--aic", type=Path, default=Path("../shared/data/aic"),
                   help="root of the AIConfigurator data (systems/, profiles/)")
    p.add_argument("--sglang-tables", type=Path, default=None,
                   help="SGLang's measured kernel tables, <gpu>/<family>/sglang/<version>/ "
                        "(default: those of the installed aiconfigurator-core, the [compare] "
                        "extra)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: the packaged calibration.json)")

    p = sub.add_parser("calibrate-engine",
                       help="refit the engine constants to measured end-to-end runs")
    p.add_argument("csv", type=Path, nargs="?",
                   default=Path("../shared/data/validation/aic_silicon_sample_dev.csv"),
                   help="rows in the AIConfigurator silicon-sample schema")
    p.add_argument("--engine", default="vllm", help="vllm | sglang")
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument("--holdout-system", default=None,
                   help="fit without this system's rows and score them (writes nothing)")
    p.add_argument("--simulate", action="store_true",
                   help="fit to the serving simulator's replay of each row's benchmark "
                        "instead of the closed form (slow: a minute per pass, dozens of passes)")


def _add_optimize_and_simulate(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("optimize", help="search the configuration space of a spec file")
    p.add_argument("spec", type=Path, help="workload, SLO, pool and objective (YAML or JSON)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the plan as JSON")
    fmt.add_argument("--yaml", action="store_true", help="print the plan as YAML")
    p.add_argument("--plot", type=Path, default=None,
                   help="write rate-vs-latency curves here and the Pareto scatter beside it")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a configuration file to draw as the baseline (see examples/)")
    p.add_argument("--baseline-key", default=None,
                   help="which entry of a multi-baseline file (e.g. chatbot)")
    p.add_argument("--seed", type=int, default=0, help="seed of the confirming simulations")
    p.add_argument("--no-context-parallel", action="store_true",
                   help="leave decode context parallelism out of the search (offered by "
                        "default for mean prompts of 16k tokens and more, on vLLM)")

    p = sub.add_parser("simulate", help="simulate one configuration under a spec's workload")
    p.add_argument("spec", type=Path)
    p.add_argument("--config", type=Path, required=True,
                   help="a configuration or a plan (JSON/YAML; a plan's recommendation)")
    p.add_argument("--mode", choices=["open", "closed", "offline"], default="open",
                   help="open: the spec's arrivals; closed: --concurrency clients; "
                        "offline: every request queued at once")
    p.add_argument("--requests", type=_positive_int, default=2000)
    p.add_argument("--concurrency", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _add_render_and_bench(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="engine arguments and Kubernetes manifests of a plan")
    p.add_argument("plan", type=Path, help="plan JSON (trilemma optimize --json) or a config")
    p.add_argument("--engine", choices=["vllm", "sglang"], default=None,
                   help="default: the plan's engine")
    p.add_argument("--name", default="llm", help="endpoint name (Service and label)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--image", default=None, help="engine container image")
    p.add_argument("--router-command", default=None,
                   help="disaggregated vLLM plans: the request router's command line "
                        "(vLLM ships no production prefill/decode router)")
    p.add_argument("--inference-pool", action="store_true",
                   help="also render a Gateway API InferencePool <name> over the serving pods "
                        "and its endpoint picker (<name>-epp)")
    p.add_argument("--endpoint-picker", default=None, metavar="SERVICE",
                   help="with --inference-pool: reference this existing endpoint picker "
                        "Service instead of rendering one")

    p = sub.add_parser("bench", help="time the vectorized model on a batch of candidates")
    p.add_argument("--candidates", type=_positive_int, default=100_000)
    p.add_argument("--repeat", type=_positive_int, default=3)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1024**3:8.2f} GiB"


def _estimate(args: argparse.Namespace) -> int:
    cfg = est.resolve(model=args.model, gpu=args.gpu, tp=args.tp, pp=args.pp, dp=args.dp,
                      ep=args.ep, quant=args.quant, kv_dtype=args.kv_dtype, spec=args.spec,
                      engine=args.engine, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_num_seqs=args.max_num_seqs)
    head = {"model": cfg.arch.id, "gpu": cfg.gpu.key, "layout": cfg.par.summary(),
            "gpus": cfg.par.gpus, "quant": cfg.quant.value, "kv_dtype": cfg.kv.value,
            "spec": f"{cfg.spec.method.value}:{cfg.spec.k}" if cfg.spec.k else "none",
            "engine": cfg.engine.value}
    if args.phase in ("decode", "prefill"):
        prov = est.provenance(cfg)
        if args.phase == "decode":
            ms = est.decode_step_ms(cfg, batch=args.batch, kv_len=args.kv_len)
            what = {"phase": "decode", "batch": args.batch, "kv_len": args.kv_len}
        else:
            ms = est.prefill_ms(cfg, batch=args.batch, prompt_tokens=args.prompt_tokens)
            what = {"phase": "prefill", "batch": args.batch, "prompt": args.prompt_tokens}
        doc = {**head, **what, "step_ms": round(ms, 4), "provenance": prov}
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(f"{cfg.arch.id} on {cfg.par.gpus}x {cfg.gpu.key} ({cfg.par.summary()}, "
                  f"{cfg.quant.value}): one {args.phase} step = {ms:.3f} ms")
            _print_provenance(prov)
        return 0
    e = est.closed_loop(cfg, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                        output_tokens=args.output_tokens, cached_tokens=args.cached_tokens,
                        output_predictability=args.output_predictability)
    prov = e.provenance
    # JSON keys as before the glossary: scripts read them (README maps isl/osl).
    doc = {**head, "concurrency": args.concurrency, "isl": args.prompt_tokens,
           "osl": args.output_tokens, "cached": args.cached_tokens, "fits": e.fits,
           "ttft_ms": round(e.ttft_ms, 3), "tpot_ms": round(e.tpot_ms, 3),
           "e2e_ms": round(e.e2e_ms, 3), "requests_per_s": round(e.requests_per_s, 4),
           "output_tokens_per_s": round(e.output_tokens_per_s, 2),
           "output_tokens_per_s_per_gpu": round(e.output_tokens_per_s_per_gpu, 2),
           "decode_step_ms": round(e.decode_step_ms, 3),
           "mixed_step_ms": round(e.mixed_step_ms, 3),
           "tokens_per_step": round(e.tokens_per_step, 3),
           "memory_bytes_per_gpu": {k: round(v) for k, v in e.memory.items()},
           "max_seqs": e.max_seqs, "kv_tokens": e.kv_tokens, "provenance": prov}
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"{cfg.arch.id} on {cfg.par.gpus}x {cfg.gpu.key} ({cfg.par.summary()}, "
          f"{cfg.quant.value}, KV {cfg.kv.value}, spec {head['spec']}, {cfg.engine.value})")
    print(f"workload: concurrency {args.concurrency}, ISL {args.prompt_tokens}, "
          f"OSL {args.output_tokens}, cached {args.cached_tokens}")
    if not e.fits:
        print("DOES NOT FIT: the weights, activations and runtime leave no room for one "
              "sequence's KV cache")
    print(f"  TTFT              {e.ttft_ms:10.1f} ms")
    print(f"  TPOT              {e.tpot_ms:10.2f} ms")
    print(f"  end-to-end        {e.e2e_ms:10.1f} ms")
    print(f"  throughput        {e.output_tokens_per_s:10.1f} output tok/s "
          f"({e.output_tokens_per_s_per_gpu:.1f} per GPU, {e.requests_per_s:.3f} req/s)")
    if cfg.spec.k:
        print(f"  accepted/step     {e.tokens_per_step:10.2f} tokens")
    print("memory per GPU:")
    for k, v in e.memory.items():
        print(f"  {k:<16}{_fmt_bytes(v)}")
    print(f"  KV capacity       {e.kv_tokens:>10d} tokens = {e.max_seqs} sequences of "
          f"{args.prompt_tokens + args.output_tokens} tokens")
    _print_provenance(prov)
    return 0


def _print_provenance(prov: dict[str, str]) -> None:
    print("calibration: " + ", ".join(f"{k} {v}" for k, v in sorted(prov.items())))
    if "datasheet" in prov.values():
        print("UNCALIBRATED: no measured kernel profiles for this GPU; datasheet rooflines at "
              "the calibrated GPUs' median efficiencies")
    elif "kernels" in prov:
        print(f"EXTRAPOLATED: no measured kernel profiles for this GPU; {prov['kernels']}'s "
              "fitted kernels at this GPU's datasheet rates".replace("extrapolated from ", ""))


def _validate(args: argparse.Namespace) -> int:
    if _is_latency_table(args.csv):
        if args.compare:
            raise InputError("--compare", args.compare,
                             "compares on silicon-sample rows only, not latency tables")
        return _validate_tables(args)
    rows = validation.read_rows(args.csv)
    results = validation.predict_rows(rows, simulate=_simulated_engines(args.simulate))
    summary = validation.summarize(results)
    if args.compare:
        return _validate_compare(args, rows, results, summary)
    if args.json:
        print(json.dumps({"rows": [r.as_json() for r in results], "summary": summary},
                         indent=1, sort_keys=True))
        return 0
    _print_summary(summary)
    return 0


def _simulated_engines(choice: str | None) -> frozenset[Engine]:
    """`validate --simulate`'s engines: those whose rows the simulator replays."""
    if choice is None:
        return frozenset()
    return frozenset(Engine) if choice == "all" else frozenset({Engine(choice)})


def _print_summary(summary: validation.Summary) -> None:
    print("\n".join(validation.summary_lines(summary)))
    _print_skips(summary)


def _validate_compare(args: argparse.Namespace, rows: list[dict[str, str]],
                      results: list[validation.RowResult], summary: validation.Summary) -> int:
    """`validate --compare aiconfigurator`: both models' tables, then the head-to-head."""
    from importlib import metadata

    from trilemma.optimizer import compare_aic

    try:
        aic_version = metadata.version("aiconfigurator")
    except metadata.PackageNotFoundError:
        raise InputError("--compare", args.compare, "AIConfigurator is not installed: "
                         "pip install 'trilemma[compare]'") from None
    run = compare_aic.predict_aic(rows)
    aic_summary = validation.summarize(run.results)
    pairs = compare_aic.compare(results, run.results, run.versions)
    databases = {f"{s}/{b}": v for (s, b), v in sorted(run.versions.items())}
    if args.json:
        print(json.dumps({"rows": [r.as_json() for r in results], "summary": summary,
                          "aiconfigurator": {"version": aic_version, "databases": databases,
                                             "rows": [r.as_json() for r in run.results],
                                             "summary": aic_summary},
                          "compare": pairs}, indent=1, sort_keys=True))
        return 0
    print("== trilemma ==")
    _print_summary(summary)
    print(f"\n== AIConfigurator {aic_version} (aggregated estimate, SILICON database) ==")
    print(f"AIConfigurator {aic_version} answers only its queryable database versions and "
          "rejects the rows' own engine builds (e.g. vLLM '0.19.0'): every row was estimated "
          f"against its system's {compare_aic.DATABASE_SLOT!r} database: "
          + ", ".join(f"{k} {v}" for k, v in databases.items()))
    _print_summary(aic_summary)
    print("\n== head to head: median APE on the rows both predict ==")
    for line in compare_aic.comparison_lines(pairs):
        print(line)
    return 0


def _print_skips(summary: validation.Summary | validation_tables.Summary) -> None:
    if summary["skip_reasons"]:
        print("\nskipped rows, by reason:")
        for reason, n in summary["skip_reasons"].items():
            print(f"  {n:5d}  {reason}")


def _is_latency_table(path: Path) -> bool:
    """Latency-vs-load tables (TTFT/ITL against concurrency) have their own schema."""
    import csv

    from trilemma.optimizer import validation_tables

    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except OSError:
        return False  # validation.read_rows reports the unreadable file
    return validation_tables.matches_columns(header)


def _validate_tables(args: argparse.Namespace) -> int:
    from trilemma.optimizer import validation_tables

    results = validation_tables.predict_table_rows(validation_tables.read_table(args.csv))
    summary = validation_tables.summarize(results)
    if args.json:
        print(json.dumps({"rows": [r.as_json() for r in results], "summary": summary},
                         indent=1, sort_keys=True))
        return 0
    ov = summary["overall"]
    print(f"{summary['rows']} rows: {summary['modelled']} modelled, "
          f"{summary['skipped']} skipped (latency-vs-load table)")
    print(f"overall  TTFT median APE {ov['ttft']['median_ape']}%  p90 {ov['ttft']['p90_ape']}%"
          f"   ITL median APE {ov['itl']['median_ape']}%  p90 {ov['itl']['p90_ape']}%")
    for g in summary["groups"]:
        label = " / ".join(str(g[k]) for k in ("engine", "model", "gpu") if k in g)
        print(f"  {label:<70} n={g['ttft']['n']:<4} TTFT {g['ttft']['median_ape']}%  "
              f"ITL {g['itl']['median_ape']}%")
    _print_skips(summary)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from trilemma.optimizer.perf import fitting  # needs the [calibrate] extra

    out = args.out or fitting.default_output()
    fitting.write_calibration(args.aic, out, args.sglang_tables)
    print(f"wrote {out}")
    return 0


def _calibrate_engine(args: argparse.Namespace) -> int:
    from trilemma.optimizer import engine_fit
    from trilemma.optimizer.perf.engine import Engine

    try:
        engine = Engine(args.engine)
    except ValueError:
        raise InputError("engine", args.engine, "must be vllm or sglang") from None
    if args.holdout_system:
        fitted, summary = engine_fit.holdout(args.csv, engine, args.holdout_system,
                                             simulate=args.simulate)
        ov = summary["overall"]
        print(f"fitted without {args.holdout_system}: "
              + ", ".join(f"{k}={v}" for k, v in fitted.values.items()))
        print(f"held-out {args.holdout_system}: {ov['ttft']['n']} rows, TTFT median APE "
              f"{ov['ttft']['median_ape']}% (p90 {ov['ttft']['p90_ape']}%), TPOT median APE "
              f"{ov['tpot']['median_ape']}% (p90 {ov['tpot']['p90_ape']}%)")
        return 0
    fitted, release = engine_fit.main(args.csv, engine, simulate=args.simulate)
    values = ", ".join(f"{k}={v}" for k, v in fitted.values.items())
    print(f"{engine.value}: {values} (mean |log error| {fitted.loss} over {fitted.rows} rows; "
          f"release {release.version}, image {release.image})")
    if not args.dry_run:
        print(f"wrote {engine_fit.write(fitted, release)}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from trilemma.optimizer import commands

    fmt = "json" if args.json else "yaml" if args.yaml else "table"
    return commands.optimize(args.spec, fmt=fmt, plot=args.plot, baseline=args.baseline,
                             baseline_key=args.baseline_key, seed=args.seed, out=sys.stdout,
                             context_parallel=not args.no_context_parallel)


def _simulate(args: argparse.Namespace) -> int:
    from trilemma.optimizer import commands

    return commands.simulate(args.spec, args.config, mode=args.mode, requests=args.requests,
                             concurrency=args.concurrency, seed=args.seed, as_json=args.json,
                             out=sys.stdout)


def _render(args: argparse.Namespace) -> int:
    from trilemma.optimizer import render
    from trilemma.optimizer.render import command

    engine = args.engine or command.load_config(args.plan).engine
    router = tuple(shlex.split(args.router_command)) if args.router_command else None
    if args.endpoint_picker is not None and not args.inference_pool:
        raise InputError("--endpoint-picker", args.endpoint_picker,
                         "only with --inference-pool")
    pool = (render.InferencePoolOptions(endpoint_picker=args.endpoint_picker)
            if args.inference_pool else None)
    return command.render_command(args.plan, engine, name=args.name, namespace=args.namespace,
                                  image=args.image, out=sys.stdout, router_command=router,
                                  inference_pool=pool)


def _bench(args: argparse.Namespace) -> int:
    from trilemma.optimizer.perf import benchmark

    report = benchmark.run(candidates=args.candidates, repeat=args.repeat)
    print(report)
    return 0


def main(argv: Sequence[str] | None = None, *, extra: Sequence[Subcommand] = ()) -> int:
    """Run one command; `extra` adds commands of the packages built on the optimizer."""
    parser = _parser(extra)
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "estimate": _estimate, "validate": _validate, "calibrate": _calibrate,
        "calibrate-engine": _calibrate_engine, "optimize": _optimize, "simulate": _simulate,
        "render": _render, "bench": _bench, **{c.name: c.run for c in extra}}
    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"trilemma {args.command}: error: {exc.field}={exc.value!r}: {exc.why}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # The reader (`| head`) closed the pipe: stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
