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

from trilemma.optimizer import errorstats, validation_layout, validation_recipes, validation_sim
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.errors import InputError, TrilemmaError
from trilemma.optimizer.perf import estimate, hybrid_layers, latency
from trilemma.optimizer.perf.engine import Engine, EngineFacts, engine_facts
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
    # The launch flags of the row's benchmark script it was modelled with (validation_recipes).
    recipe: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id, "pred_ttft_ms": errorstats.rounded(self.pred_ttft_ms),
            "pred_tpot_ms": errorstats.rounded(self.pred_tpot_ms), "skipped": self.skipped}
        if self.note:
            out["note"] = self.note
        if self.recipe:
            out["recipe"] = self.recipe
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


def kv_dtype_for(row: Mapping[str, str], engine: Engine, arch: models.ModelArch,
                 recipe: QuantRecipe) -> KvDtype:
    """The KV-cache dtype a row's deployment ran; the schema has no column for it.

    vLLM rows at fp8 or fp4 precision ran an fp8 KV cache: their measured queueing sets in
    only where an fp8 cache runs out (B200 MiniMax-M2.5 fp8 TP2 8192/1024 keeps ~105
    sequences resident at C=128, ~58 GB of fp8 KV against ~56 GB free; a bf16 cache holds
    half that, and C=64 would already queue for seconds, measured 0.8 s). vLLM itself runs
    ModelOpt FP8/NVFP4 checkpoints with the fp8 cache their `kv_cache_quant_algo` names
    (vllm-project/vllm#29980). A checkpoint that keeps its attention in bf16 (gpt-oss's
    MXFP4, whose sink attention has no fp8-KV scales) keeps a bf16 cache, as do bf16 and int4
    rows. SGLang rows keep bf16 here unless their benchmark recipe names another
    (validation_recipes) or the engine defaults to fp8 (hybrid_layers.engine_kv_dtype).
    """
    precision = (row.get("precision") or "").strip().lower()
    keeps_attention = (arch.checkpoint_quant == recipe.value
                       and "attention" in arch.unquantized_parts)
    if engine is Engine.VLLM and precision in ("fp8", "fp4") and not keeps_attention:
        return KvDtype.FP8
    return KvDtype.BF16


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
    isl: float                      # mean lengths the benchmark client sent
    osl: float
    cfg: estimate.Config
    note: str | None
    release: str  # the engine release the row names ("" when it names none)
    recipe: validation_recipes.LaunchRecipe | None
    client: validation_sim.BenchClient  # how the row's benchmark client ran
    nominal: tuple[int, int]  # the row's isl, osl (isl/osl above: the client's mean draw)

    def result(self, ttft_ms: float | None, tpot_ms: float | None,
               skipped: str | None) -> RowResult:
        return RowResult(id=self.rid, group=self.group, measured_ttft_ms=self.measured_ttft_ms,
                         measured_tpot_ms=self.measured_tpot_ms, pred_ttft_ms=ttft_ms,
                         pred_tpot_ms=tpot_ms, skipped=skipped, note=self.note,
                         recipe=self.recipe.note() if self.recipe else None)


_BatchKey = tuple[object, ...]


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
    corrected = validation_layout.corrected_rows(rows)
    fixed = [row for row, _ in corrected]
    # The engine flags of the benchmark script each row's provenance names, where it names one.
    recipes = validation_recipes.recipes_for(
        fixed, [launch_gpus(r) for r in fixed], [launch_concurrency(r) for r in fixed])
    for i, ((row, note), launch) in enumerate(zip(corrected, recipes, strict=True)):
        planned = _member(i, row, note, launch)
        if isinstance(planned, RowResult):
            results[i] = planned
            continue
        cfg, par = planned.cfg, planned.cfg.par
        overlap = _facts(cfg.engine, facts).for_release(planned.release).cpu_overlap
        batches[(cfg.arch.id, cfg.gpu.key, cfg.quant, cfg.kv, cfg.engine, par.tp, par.pp, par.dp,
                 par.ep, overlap, launch.key() if launch else None)].append(planned)

    for members in batches.values():
        cfg, launch = members[0].cfg, members[0].recipe
        conc = np.array([m.conc for m in members], dtype=np.float64)
        isl = np.array([m.isl for m in members], dtype=np.float64)
        osl = np.array([m.osl for m in members], dtype=np.float64)
        # The release the rows ran decides whether its step overhead overlaps the GPU.
        run = _facts(cfg.engine, facts).for_release(members[0].release)
        # A benchmark script's static memory fraction replaces the engine's, as a deployment's.
        sm = StepModel(cfg.arch, cfg.gpu, cfg.quant, cfg.kv, launch.facts(run) if launch else run)
        r = latency.closed_loop(sm, tp=cfg.par.tp, pp=cfg.par.pp,
                                dp=cfg.par.dp, ep=cfg.par.ep, concurrency=conc,
                                prompt_tokens=isl, output_tokens=osl,
                                max_batched_tokens=cfg.max_num_batched_tokens,
                                max_num_seqs=cfg.max_num_seqs, spec=cfg.spec,
                                draft=estimate.draft_step_model(cfg))
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


def _facts(engine: Engine, facts: Mapping[Engine, EngineFacts] | None) -> EngineFacts:
    return facts[engine] if facts and engine in facts else engine_facts(engine)


def _simulated(m: _Member, sm: StepModel) -> RowResult:
    try:
        sim = validation_sim.simulate_row(sm, m.cfg.par, m.client, concurrency=m.conc,
                                          isl=m.nominal[0], osl=m.nominal[1])
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


def _size(row: Mapping[str, str], key: str) -> int:
    try:
        return _int(row, key)
    except ValueError:
        return 1


def launch_gpus(row: Mapping[str, str]) -> int:
    """The run's GPU count (SGLang's --tp: attention TP x DP; x PP), as its script saw it."""
    return _size(row, "tp_size") * _size(row, "pp_size") * _size(row, "attention_dp_size")


def launch_concurrency(row: Mapping[str, str]) -> int:
    """The run's closed-loop concurrency: `batch_size` is one attention-DP rank's share."""
    return _size(row, "batch_size") * _size(row, "attention_dp_size")


def _member(i: int, row: Mapping[str, str], note: str | None,
            launch: validation_recipes.LaunchRecipe | None) -> _Member | RowResult:
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
        # The benchmark's launch flags where its script is known, else the engine defaults.
        # A script's explicit --kv-cache-dtype is what ran; without one, the engine's default.
        kv = (launch.kv if launch and launch.kv else hybrid_layers.engine_kv_dtype(
            engine, arch, gpu, kv_dtype_for(row, engine, arch, recipe)))
        budget, seqs = ((launch.chunked_prefill_size, launch.max_running_requests) if launch
                        else (None, None))
        cfg = estimate.resolve(model=row["model_path"], gpu=gpu.key, tp=tp, pp=pp, dp=dp,
                               ep=ep, quant=recipe.value, kv_dtype=kv.value,
                               engine=engine.value,
                               spec=launch.speculative if launch else "none",
                               max_num_batched_tokens=budget, max_num_seqs=seqs)
        # AIConfigurator's `batch_size` is the concurrency of ONE attention-DP rank: the run's
        # closed-loop concurrency is batch_size x attention_dp_size (its provenance column
        # `silicon_concurrency=` says so on every DP row). closed_loop takes the total.
        conc = _int(row, "batch_size") * dp
        isl, osl = _int(row, "isl"), _int(row, "osl")
        # The client's length draw sets the mean lengths the engine served (bench_clients).
        client = validation_sim.client_for(row)
    except (TrilemmaError, ValueError, KeyError) as exc:
        return skip(str(exc))
    return _Member(index=i, rid=base.id, group=base.group,
                   measured_ttft_ms=base.measured_ttft_ms,
                   measured_tpot_ms=base.measured_tpot_ms, conc=conc, isl=client.mean_length(isl),
                   osl=client.mean_length(osl), cfg=cfg, note=note, recipe=launch,
                   release=(row.get("backend_version") or "").strip(), client=client,
                   nominal=(isl, osl))


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
    launch_recipes: int       # rows modelled with their benchmark script's engine flags
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
        "launch_recipes": sum(1 for r in results if r.recipe and not r.skipped),
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
                if summary["launch_flag_layouts"] else "")
             + (f"; {summary['launch_recipes']} modelled with their benchmark recipe's "
                "launch flags (KV dtype, chunk, memory fraction, running cap)"
                if summary["launch_recipes"] else ""),
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
