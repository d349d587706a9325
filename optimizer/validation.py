"""Score the performance model against measured serving runs (`trilemma validate`).

Reads rows in the schema of NVIDIA AIConfigurator's silicon samples (model_path, system,
backend, precision, gemm_quant_mode, isl, osl, batch_size = concurrency per attention-DP rank,
tp/pp/attention-dp/moe-tp/moe-ep sizes, mode, silicon_ttft_ms, silicon_tpot_ms), predicts
TTFT and TPOT for every aggregated row it can model, and summarises the absolute percentage
errors. Rows it cannot model are kept with the reason, never dropped silently.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from trilemma.optimizer import errorstats, validation_layout, validation_sim
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.errors import InputError, TrilemmaError
from trilemma.optimizer.perf import estimate, hybrid_layers, latency
from trilemma.optimizer.perf.engine import Engine, EngineFacts
from trilemma.optimizer.perf.steps import StepModel

REQUIRED = ("model_path", "system", "backend", "precision", "gemm_quant_mode", "isl", "osl",
            "batch_size", "tp_size", "pp_size", "attention_dp_size", "moe_tp_size",
            "moe_ep_size", "mode", "silicon_ttft_ms", "silicon_tpot_ms")
_ENGINES = {"vllm": Engine.VLLM, "sglang": Engine.SGLANG}


@dataclass(frozen=True, kw_only=True)
class RowResult:
    id: str
    group: tuple[str, str, str]          # (system, backend, model)
    measured_ttft_ms: float | None
    measured_tpot_ms: float | None
    pred_ttft_ms: float | None
    pred_tpot_ms: float | None
    skipped: str | None
    # How the row was read where its columns were not taken as written (validation_layout).
    note: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id, "pred_ttft_ms": errorstats.rounded(self.pred_ttft_ms),
            "pred_tpot_ms": errorstats.rounded(self.pred_tpot_ms), "skipped": self.skipped}
        if self.note:
            out["note"] = self.note
        return out



def read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError("csv", str(path), f"missing columns: {', '.join(missing)}")
            return list(reader)
    except OSError as exc:
        raise InputError("csv", str(path), f"cannot be read: {exc.strerror}") from None


def recipe_for(row: Mapping[str, str], arch: models.ModelArch) -> QuantRecipe:
    """Map the table's precision columns to the recipe vLLM actually ran."""
    precision = (row.get("precision") or "").strip().lower()
    mode = (row.get("gemm_quant_mode") or "").strip().lower()
    ckpt = arch.checkpoint_quant or ""
    if not precision and not mode:
        # No precision recorded: the checkpoint ran in its own format.
        return estimate.default_recipe(arch)
    if precision == "fp4" or mode in ("nvfp4", "mxfp4"):
        # gpt-oss ships MXFP4 experts; the table calls every 4-bit float "fp4/nvfp4".
        return QuantRecipe.MXFP4 if ckpt.startswith("mxfp4") else QuantRecipe.NVFP4
    if precision == "int4" or mode.startswith("int4"):
        return QuantRecipe.INT4
    if precision == "fp8" or mode.startswith("fp8"):
        return QuantRecipe.FP8
    if precision in ("int8", "w8a8"):
        return QuantRecipe.INT8
    if precision in ("bf16", "fp16", "float16", "bfloat16"):
        return QuantRecipe.BF16
    raise InputError("precision", row["precision"], "no matching quantization recipe")


def _int(row: Mapping[str, str], key: str, default: int = 1) -> int:
    text = (row.get(key) or "").strip()
    if not text:
        return default
    value = float(text)
    return int(value) if value >= 1 else default


def _float(row: Mapping[str, str], key: str) -> float | None:
    text = (row.get(key) or "").strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass(frozen=True, kw_only=True)
class _Member:
    """A row that maps onto a configuration, waiting for that configuration's batch."""

    index: int
    rid: str
    group: tuple[str, str, str]
    measured_ttft_ms: float | None
    measured_tpot_ms: float | None
    conc: int
    isl: int
    osl: int
    cfg: estimate.Config
    note: str | None
    client: validation_sim.BenchClient  # how the row's benchmark client ran

    def result(self, ttft_ms: float | None, tpot_ms: float | None,
               skipped: str | None) -> RowResult:
        return RowResult(id=self.rid, group=self.group, measured_ttft_ms=self.measured_ttft_ms,
                         measured_tpot_ms=self.measured_tpot_ms, pred_ttft_ms=ttft_ms,
                         pred_tpot_ms=tpot_ms, skipped=skipped, note=self.note)


_BatchKey = tuple[str, str, QuantRecipe, Engine, int, int, int, bool]


def predict_rows(rows: Iterable[Mapping[str, str]],
                 facts: Mapping[Engine, EngineFacts] | None = None,
                 simulate: Collection[Engine] = ()) -> list[RowResult]:
    """Predict each row; rows sharing a configuration are evaluated in one vectorized call.

    `facts` overrides the shipped engine constants (the engine calibration varies them).
    Rows of an engine in `simulate` replay their benchmark client through the serving
    simulator (validation_sim) instead of the closed form's lockstep clients; the closed
    form still decides whether the layout fits in memory.
    """
    results: dict[int, RowResult] = {}
    batches: dict[_BatchKey, list[_Member]] = defaultdict(list)
    rows = list(rows)
    # A layout the id's launch flags (or a flagged copy's) contradict is read from the flags.
    for i, (row, note) in enumerate(validation_layout.corrected_rows(rows)):
        planned = _member(i, row, note)
        if isinstance(planned, RowResult):
            results[i] = planned
            continue
        cfg, par = planned.cfg, planned.cfg.par
        batches[(cfg.arch.id, cfg.gpu.key, cfg.quant, cfg.engine, par.tp, par.pp, par.dp,
                 par.ep)].append(planned)

    for members in batches.values():
        cfg = members[0].cfg
        conc = np.array([m.conc for m in members], dtype=np.float64)
        isl = np.array([m.isl for m in members], dtype=np.float64)
        osl = np.array([m.osl for m in members], dtype=np.float64)
        sm = (StepModel(cfg.arch, cfg.gpu, cfg.quant, cfg.kv, facts[cfg.engine])
              if facts and cfg.engine in facts else estimate.step_model(cfg))
        r = latency.closed_loop(sm, tp=cfg.par.tp, pp=cfg.par.pp,
                                dp=cfg.par.dp, ep=cfg.par.ep, concurrency=conc,
                                prompt_tokens=isl, output_tokens=osl)
        for j, m in enumerate(members):
            if not bool(r.fits[j]):
                reason = "does not fit in GPU memory under the model's memory budget"
                results[m.index] = m.result(None, None, reason)
                continue
            if cfg.engine in simulate:
                results[m.index] = _simulated(m, sm)
                continue
            results[m.index] = m.result(float(r.ttft_ms[j]), float(r.tpot_ms[j]), None)
    return [results[i] for i in range(len(rows))]


def _simulated(m: _Member, sm: StepModel) -> RowResult:
    try:
        sim = validation_sim.simulate_row(sm, m.cfg.par, m.client, concurrency=m.conc,
                                          isl=m.isl, osl=m.osl)
    except InputError as exc:  # a request the KV cache cannot hold: the engine rejects it
        return m.result(None, None, f"simulated: {exc}")
    return m.result(sim.ttft_ms, sim.tpot_ms, None)


def row_result(i: int, row: Mapping[str, str], pred_ttft_ms: float | None,
               pred_tpot_ms: float | None, skipped: str | None) -> RowResult:
    """Row `i` (0-based) with a prediction or the reason for none; any model's, not only ours."""
    return RowResult(id=row.get("id") or f"row{i + 1}",
                     group=(row.get("system", ""), row.get("backend", ""),
                            row.get("model_path", "")),
                     measured_ttft_ms=_float(row, "silicon_ttft_ms"),
                     measured_tpot_ms=_float(row, "silicon_tpot_ms"),
                     pred_ttft_ms=pred_ttft_ms, pred_tpot_ms=pred_tpot_ms, skipped=skipped)


def _member(i: int, row: Mapping[str, str], note: str | None) -> _Member | RowResult:
    """The row resolved onto a configuration, or its skipped result saying why it cannot be."""
    base = row_result(i, row, None, None, None)

    def skip(reason: str) -> RowResult:
        return row_result(i, row, None, None, reason)

    if (row.get("mode") or "").strip() != "agg":
        return skip("disaggregated run: validate models aggregated serving only")
    engine = _ENGINES.get((row.get("backend") or "").strip().lower())
    if engine is None:
        return skip(f"backend {row.get('backend')!r} is not modelled "
                    "(trilemma deploys vLLM and SGLang)")
    try:
        arch = models.load_model(row["model_path"])
        gpu = gpus.get_gpu(row["system"])
        recipe = recipe_for(row, arch)
        tp, pp = _int(row, "tp_size"), _int(row, "pp_size")
        dp = _int(row, "attention_dp_size")
        ep = _int(row, "moe_ep_size") > 1
        kv = hybrid_layers.engine_kv_dtype(engine, arch, gpu, KvDtype.BF16)
        cfg = estimate.resolve(model=row["model_path"], gpu=gpu.key, tp=tp, pp=pp, dp=dp,
                               ep=ep, quant=recipe.value, kv_dtype=kv.value,
                               engine=engine.value)
        # AIConfigurator's `batch_size` is the concurrency of ONE attention-DP rank: the run's
        # closed-loop concurrency is batch_size x attention_dp_size (its provenance column
        # `silicon_concurrency=` says so on every DP row). closed_loop takes the total.
        conc = _int(row, "batch_size") * dp
        isl, osl = _int(row, "isl"), _int(row, "osl")
    except (TrilemmaError, ValueError, KeyError) as exc:
        return skip(str(exc))
    return _Member(index=i, rid=base.id, group=base.group,
                   measured_ttft_ms=base.measured_ttft_ms,
                   measured_tpot_ms=base.measured_tpot_ms, conc=conc, isl=isl, osl=osl, cfg=cfg,
                   note=note, client=validation_sim.client_for(row))


class MetricErrors(TypedDict):
    ttft: errorstats.ErrorStats
    tpot: errorstats.ErrorStats


class GroupErrors(MetricErrors):
    system: str
    backend: str
    model: str


class Summary(TypedDict):
    """The validation report: JSON-ready, as `trilemma validate --json` prints it."""

    rows: int
    modelled: int
    skipped: int
    skip_reasons: dict[str, int]
    launch_flag_layouts: int  # rows modelled by their id's launch flags (validation_layout)
    overall: MetricErrors
    by_backend: dict[str, MetricErrors]
    groups: list[GroupErrors]


def summarize(results: list[RowResult]) -> Summary:
    """Median and p90 APE overall and by (system, backend, model), plus the skipped rows."""
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: {"ttft": [], "tpot": []})
    backends: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"ttft": [], "tpot": []})
    overall: dict[str, list[float]] = {"ttft": [], "tpot": []}
    reasons: dict[str, int] = defaultdict(int)
    for r in results:
        if r.skipped:
            reasons[r.skipped] += 1
            continue
        for metric, pred, meas in (("ttft", r.pred_ttft_ms, r.measured_ttft_ms),
                                   ("tpot", r.pred_tpot_ms, r.measured_tpot_ms)):
            err = errorstats.ape(pred, meas)
            if err is not None:
                groups[r.group][metric].append(err)
                backends[r.group[1]][metric].append(err)
                overall[metric].append(err)
    modelled = sum(1 for r in results if not r.skipped)
    return {
        "rows": len(results),
        "modelled": modelled,
        "skipped": len(results) - modelled,
        "skip_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "launch_flag_layouts": sum(1 for r in results if r.note and not r.skipped),
        "overall": {"ttft": errorstats.stats(overall["ttft"]),
                    "tpot": errorstats.stats(overall["tpot"])},
        "by_backend": {b: {"ttft": errorstats.stats(v["ttft"]),
                           "tpot": errorstats.stats(v["tpot"])}
                       for b, v in sorted(backends.items())},
        "groups": [
            {"system": g[0], "backend": g[1], "model": g[2],
             "ttft": errorstats.stats(v["ttft"]), "tpot": errorstats.stats(v["tpot"])}
            for g, v in sorted(groups.items())
        ],
    }


def summary_lines(summary: Summary) -> list[str]:
    """The report as `trilemma validate` prints it: overall, by backend, by group."""
    ov = summary["overall"]
    lines = [f"{summary['rows']} rows: {summary['modelled']} modelled, "
             f"{summary['skipped']} skipped"
             + (f" ({summary['launch_flag_layouts']} modelled by the SGLang launch flags of "
                "their id, or of a byte-identical copy's, which their columns contradict)"
                if summary["launch_flag_layouts"] else ""),
             f"overall  TTFT median APE {ov['ttft']['median_ape']}%  p90 {ov['ttft']['p90_ape']}%"
             f"   TPOT median APE {ov['tpot']['median_ape']}%  p90 {ov['tpot']['p90_ape']}%"]
    for name, block in summary["by_backend"].items():
        lines.append(f"{name:<8} n={block['ttft']['n']:<4} TTFT median "
                     f"{block['ttft']['median_ape']}% p90 {block['ttft']['p90_ape']}%   "
                     f"TPOT median {block['tpot']['median_ape']}% "
                     f"p90 {block['tpot']['p90_ape']}%")
    lines.append(f"\n{'system':<10}{'backend':<8}{'model':<30}{'n':>5}"
                 f"{'TTFT med':>10}{'p90':>8}{'TPOT med':>10}{'p90':>8}")
    for g in summary["groups"]:
        lines.append(f"{g['system']:<10}{g['backend']:<8}{g['model']:<30}{g['ttft']['n']:>5}"
                     f"{g['ttft']['median_ape']:>9}%{g['ttft']['p90_ape']:>7}%"
                     f"{g['tpot']['median_ape']:>9}%{g['tpot']['p90_ape']:>7}%")
    return lines
