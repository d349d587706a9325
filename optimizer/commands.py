"""Handlers of `trilemma optimize` and `trilemma simulate`: spec files in, reports out.

Thin glue between the CLI and the search/serving layers: load and check files, call the
library, format tables and pictures. The library itself never prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from trilemma.optimizer import spec
from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import confirming, curves, planning, space
from trilemma.optimizer.search.alternatives import By
from trilemma.optimizer.search.configs import Choice, ServingConfig
from trilemma.optimizer.serving.requests import LoadMode


def load_config(path: Path, key: str | None = None) -> ServingConfig:
    """A ServingConfig from JSON/YAML: a bare config, {"config": ...}, a plan's
    {"recommended": {"config": ...}}, or `key` selecting one entry of a mapping of those."""
    try:
        data: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError("config", str(path), f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError("config", str(path), f"not YAML or JSON: {exc}") from None
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise InputError("config", f"{path}:{key}", "no such entry in the file")
        data = data[key]
    if isinstance(data, dict) and isinstance(data.get("recommended"), dict):
        data = data["recommended"]
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise InputError("config", str(path), "expected a serving configuration mapping")
    try:
        return ServingConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError("config", str(path), f"not a serving configuration: {exc}") from None


def _progress(stream: TextIO) -> planning.Progress:
    width = 30

    def report(phase: str, fraction: float) -> None:
        filled = round(width * max(0.0, min(1.0, fraction)))
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {phase:<12}")
        if phase == "done":
            stream.write("\n")
        stream.flush()

    return report


def _row(c: Choice, mark: str) -> str:
    p = c.prediction
    quality = "-" if p.quality is None else f"{p.quality:.1f}"
    return (f"{mark}{c.config.summary():<58} {c.config.gpus:>5} {p.cost_per_hour:>9.2f} "
            f"{p.cost_per_mtok:>8.3f} {p.ttft_p90_ms:>9.0f} {p.tpot_p90_ms:>8.1f} "
            f"{p.capacity_rps:>8.2f} {quality:>6} {'sim' if p.simulated else 'model':>5}")


def print_plan(p: planning.Plan, out: TextIO) -> None:
    c = p.counts
    mixed = f" on one GPU type, {c.mixed:,} mixed over GPU types" if c.mixed else ""
    out.write(f"searched {c.enumerated:,} candidate configurations: {c.screened:,} screened, "
              f"{c.feasible:,} meet the SLO{mixed}, {c.simulated} simulated\n\n")
    out.write(f"  {'configuration':<58} {'GPUs':>5} {'$/hour':>9} {'$/Mtok':>8} "
              f"{'TTFT p90':>9} {'TPOT p90':>8} {'req/s':>8} {'qual':>6} {'src':>5}\n")
    rec = p.recommended.config.config_hash()
    for choice in p.front:
        out.write(_row(choice, "* " if choice.config.config_hash() == rec else "  ") + "\n")
    if rec not in {ch.config.config_hash() for ch in p.front}:
        out.write(_row(p.recommended, "* ") + "\n")
    _print_alternatives(p, out)
    out.write(f"\nrecommended ({p.objective.value}): {p.recommended.config.summary()}\n")
    split = p.recommended.prediction.provenance.get("split")
    if split:
        out.write(f"  traffic split {split}\n")
    kernels = p.recommended.prediction.provenance.get("kernels")
    if kernels:
        out.write(f"  kernels: {kernels} (no measured kernel tables for this GPU)\n")
    for line in _explanation_lines(p.explanation.to_dict()):
        out.write(f"  {line}\n")


def _print_alternatives(p: planning.Plan, out: TextIO) -> None:
    """The best meeting the SLO on each GPU type and engine, against the recommendation; GPU
    types of the pool with none are named (the front alone would hide both)."""
    if not p.alternatives:
        return
    out.write("\nbest meeting the SLO on each GPU type / engine, against the recommendation:\n")
    rec = p.recommended.config.config_hash()
    for a in p.alternatives:
        if a.choice.config.config_hash() == rec:
            out.write(f"  {a.by.value} {a.value}: the recommendation (*)\n")
            continue
        out.write(f"  {a.by.value} {a.value}: {a.cost_ratio:.2f}x the cost, "
                  f"{a.latency_ratio:.2f}x the latency, "
                  f"{'dominated by the front' if a.dominated else 'on the front'}\n")
        out.write(_row(a.choice, "  ") + "\n")
    shown = {a.value for a in p.alternatives if a.by is By.GPU}
    none = [g for g in p.request.pool if g not in shown]
    if shown and none:
        out.write(f"  gpu {', '.join(none)}: nothing meets the SLO within the pool and budget\n")


def _explanation_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in doc.items():
        if isinstance(value, list):
            lines.append(f"{key.replace('_', ' ')}:")
            lines += [f"  - {_short(v)}" for v in value]
        else:
            lines.append(f"{key.replace('_', ' ')}: {_short(value)}")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items() if v not in (None, ""))
    return str(value)


def optimize(spec_path: Path, *, fmt: str, plot: Path | None, baseline: Path | None,
             baseline_key: str | None, seed: int, out: TextIO,
             context_parallel: bool = True) -> int:
    request = spec.load_spec(spec_path)
    base = load_config(baseline, baseline_key) if baseline else None
    settings = None if context_parallel else space.SearchSettings(cp=(1,))
    try:
        result = planning.plan(request, seed=seed, settings=settings,
                               progress=_progress(sys.stderr) if fmt == "table" else None)
    except InputError:
        if fmt == "table":
            sys.stderr.write("\n")  # end the progress bar before the error line
        raise
    if fmt == "json":
        out.write(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    elif fmt == "yaml":
        out.write(yaml.safe_dump(result.to_dict(), sort_keys=True))
    else:
        print_plan(result, out)
    if base is not None and fmt == "table":
        _compare(request, result, base, out)
    if plot is not None:
        _plots(request, result, base, plot)
        if fmt == "table":
            out.write(f"\nwrote {plot} and {_pareto_path(plot)}\n")
    return 0


def _compare(request: spec.PlanRequest, result: planning.Plan, base: ServingConfig,
             out: TextIO) -> None:
    """Requests/s at the SLO and $ per million output tokens at that load, both deployments."""
    slo = request.slo
    targets = {"ttft_p90_ms": getattr(slo.ttft_ms, "p90", None),
               "tpot_p90_ms": getattr(slo.tpot_ms, "p90", None)}
    osl = request.workload.output_distribution().mean_tokens()
    out.write("\nagainst the baseline (p90 SLO, model curves):\n")
    for label, config in (("recommended", result.recommended.config), ("baseline", base)):
        rate = curves.capacity_at_slo(curves.latency_curve(request, config), **targets)
        per_hour = config.gpus * _price(request, config.worker.gpu)
        mtok = per_hour / (rate * osl * 3600 / 1e6) if rate > 0 else float("inf")
        out.write(f"  {label:<12} {config.summary():<50} {rate:8.2f} req/s at the SLO, "
                  f"${per_hour:.2f}/h, ${mtok:.3f} per M output tokens at that rate\n")


def _price(request: spec.PlanRequest, gpu: str) -> float:
    """The pool's $/GPU-hour for `gpu`, else the catalog's list price (a baseline may sit
    on GPUs outside the pool)."""
    for group in request.hardware.gpus:
        if group.gpu == gpu:
            return group.effective_price_per_gpu_hour
    return gpus.get_gpu(gpu).price_per_hour


def _pareto_path(plot: Path) -> Path:
    return plot.with_name(f"{plot.stem}-pareto{plot.suffix or '.png'}")


def _plots(request: spec.PlanRequest, result: planning.Plan, base: ServingConfig | None,
           plot: Path) -> None:
    from trilemma.optimizer import plotting

    rec = result.recommended.config.config_hash()
    top = [result.recommended, *[c for c in result.front if c.config.config_hash() != rec][:3]]
    lines = []
    for choice in top:
        curve = curves.latency_curve(request, choice.config)
        lines.append(plotting.Curve(label=choice.config.summary(),
                                    rates_rps=curve.rates_rps.tolist(),
                                    ttft_p90_ms=curve.ttft_p90_ms.tolist(),
                                    tpot_p90_ms=curve.tpot_p90_ms.tolist(), baseline=False))
    points = [plotting.ParetoPoint(cost_per_hour=c.prediction.cost_per_hour,
                                   latency_ms=c.prediction.ttft_p90_ms, label=c.config.summary(),
                                   on_front=True,
                                   recommended=c.config.config_hash()
                                   == result.recommended.config.config_hash(), baseline=False)
              for c in result.front]
    # Beside the front, the best on each GPU type and engine: faded where the front dominates.
    seen = {c.config.config_hash() for c in result.front}
    for a in result.alternatives:
        if a.choice.config.config_hash() in seen:
            continue
        seen.add(a.choice.config.config_hash())
        points.append(plotting.ParetoPoint(
            cost_per_hour=a.choice.prediction.cost_per_hour,
            latency_ms=a.choice.prediction.ttft_p90_ms,
            label=f"best on {a.value}: {a.choice.config.summary()}", on_front=False,
            recommended=False, baseline=False, alternative=True, dominated=a.dominated))
    if base is not None:
        curve = curves.latency_curve(request, base)
        lines.append(plotting.Curve(label=f"baseline: {base.summary()}",
                                    rates_rps=curve.rates_rps.tolist(),
                                    ttft_p90_ms=curve.ttft_p90_ms.tolist(),
                                    tpot_p90_ms=curve.tpot_p90_ms.tolist(), baseline=True))
        # On the cost axis the baseline is scaled out to carry the design rate, like every
        # searched deployment; its latency is read off its curve at its per-replica share.
        rate = request.workload.design_rate()
        capacity = curves.capacity_at_slo(
            curve, ttft_p90_ms=getattr(request.slo.ttft_ms, "p90", None),
            tpot_p90_ms=getattr(request.slo.tpot_ms, "p90", None)) or curve.rates_rps[-1]
        copies = max(1, math.ceil(rate / capacity))
        price = _price(request, base.worker.gpu)
        points.append(plotting.ParetoPoint(
            cost_per_hour=copies * base.gpus * price,
            latency_ms=float(np.interp(rate / copies, curve.rates_rps, curve.ttft_p90_ms)),
            label=f"{copies} copies of {base.summary()}", on_front=False, recommended=False,
            baseline=True))
    slo = request.slo
    title = f"{result.request.models}"
    plotting.rate_latency_plot(lines, plot, title=f"rate vs p90 latency {title}",
                               ttft_slo_ms=getattr(slo.ttft_ms, "p90", None),
                               tpot_slo_ms=getattr(slo.tpot_ms, "p90", None))
    plotting.pareto_plot(points, _pareto_path(plot), title=f"cost vs TTFT p90 {title}")


def simulate(spec_path: Path, config_path: Path, *, mode: str, requests: int,
             concurrency: int, seed: int, as_json: bool, out: TextIO) -> int:
    request = spec.load_spec(spec_path)
    config = load_config(config_path)
    if requests < 1:
        raise InputError("requests", requests, "must be at least 1")
    sample = confirming.workload(request, requests, seed)
    if mode == "closed":
        if concurrency < 1:
            raise InputError("concurrency", concurrency, "a closed loop needs >= 1 client")
        sample = dataclasses.replace(sample, mode=LoadMode.CLOSED, concurrency=concurrency,
                                     arrival_ms=np.zeros(len(sample)))
    elif mode == "offline":
        sample = dataclasses.replace(sample, mode=LoadMode.OFFLINE,
                                     arrival_ms=np.zeros(len(sample)))
    result = confirming.simulate(config, sample, request.workload.output_predictability, seed)
    s = result.summary()
    percentiles = ("mean", "p50", "p90", "p99")
    stats = {name: {k: round(getattr(getattr(s, name), k), 3) for k in percentiles}
             for name in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms")}
    doc: dict[str, object] = {
        "config": config.summary(), "mode": mode, "requests": requests,
        "requests_per_s": round(s.requests_per_s, 4),
        "output_tokens_per_s": round(s.output_tokens_per_s, 2),
        "preempted_share": round(s.preempted_share, 4),
        "prefix_hit_share": round(s.prefix_hit_share, 4), **stats}
    if as_json:
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return 0
    how = {"open": "open loop at the spec's arrivals", "closed": f"closed loop, {concurrency} "
           "clients", "offline": "offline, all queued at once"}[mode]
    out.write(f"{config.summary()} under {spec_path.name}: {requests} requests, {how}\n")
    out.write(f"  throughput   {s.requests_per_s:.3f} req/s, {s.output_tokens_per_s:.1f} "
              "output tok/s\n")
    for name, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end-to-end"),
                        ("queue_ms", "queueing")):
        st = stats[name]
        out.write(f"  {label:<12} mean {st['mean']:.1f}  p50 {st['p50']:.1f}  "
                  f"p90 {st['p90']:.1f}  p99 {st['p99']:.1f} ms\n")
    out.write(f"  preempted {s.preempted_share:.1%}, prefix-cache hits {s.prefix_hit_share:.1%}\n")
    return 0

