"""Head-to-head with NVIDIA AIConfigurator (`trilemma validate FILE --compare aiconfigurator`).

Runs AIConfigurator's own single-point estimator (`aiconfigurator.cli.api.cli_estimate`,
aggregated mode, its SILICON database) on the same silicon-sample rows `validation` scores,
and compares the two models on the rows both can predict, per (system, engine).

AIConfigurator is an optional extra (`pip install 'trilemma[compare]'`); only `predict_aic`
imports it, so the rest of trilemma, and the row mapping here, never need it.

How rows map onto AIConfigurator: the silicon-sample schema is AIConfigurator's own, so the
columns pass through by name (isl, osl, batch_size, tp/pp/attention-dp/moe-tp/moe-ep sizes,
gemm and MoE quant modes); `batch_size` keeps AIConfigurator's meaning. Two adjustments:
- Backend versions: AIConfigurator 0.12.0 answers only its queryable database versions
  ('current', 'previous', 'next') and rejects a raw build such as vLLM '0.19.0'. Every row is
  queried against its system's 'current' database, which the output names.
- Models it does not bundle would be fetched from Hugging Face: a row names its bundled twin
  when there is one (below), else it is skipped, so a run never depends on the network.
A 4-bit float row of an MXFP4 checkpoint (gpt-oss) leaves the quant modes to the checkpoint,
as `validation.recipe_for` does: the table calls every 4-bit float 'nvfp4'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TypedDict

from trilemma.optimizer import errorstats, validation, validation_layout, validation_recipes
from trilemma.optimizer.catalog import models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.errors import TrilemmaError

# The rows' model names -> the name of the same architecture in AIConfigurator's bundled
# model_configs/, for models it bundles under another name.
AIC_MODEL_NAMES: Mapping[str, str] = {
    # The Hugging Face repositories were renamed; AIConfigurator keeps the old names. An
    # Instruct model has its base model's config.json.
    "meta-llama/Llama-3.1-70B": "meta-llama/Meta-Llama-3.1-70B",
    "meta-llama/Llama-3.1-8B": "meta-llama/Meta-Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Meta-Llama-3.1-8B",
    # The same config.json (trilemma's zai-org/GLM-5 is built on it too); the row's explicit
    # gemm/MoE quant modes override the checkpoint's NVFP4.
    "zhipuai/GLM-5": "nvidia/GLM-5-NVFP4",
}
DATABASE_SLOT = "current"


@dataclass(frozen=True, kw_only=True)
class AicQuery:
    """One row as AIConfigurator's `cli_estimate` arguments (less the database version)."""

    model_path: str
    system: str
    backend: str
    isl: int
    osl: int
    batch_size: int
    tp_size: int
    pp_size: int
    attention_dp_size: int
    moe_tp_size: int | None
    moe_ep_size: int | None
    gemm_quant_mode: str | None
    moe_quant_mode: str | None
    # The KV dtype the row's benchmark script launched with (validation_recipes); None: the
    # estimator infers it, as it does for a row with no known script.
    kvcache_quant_mode: str | None = None

    def estimate_kwargs(self, version: str) -> dict[str, object]:
        kv = {"kvcache_quant_mode": self.kvcache_quant_mode} if self.kvcache_quant_mode else {}
        return {**kv, "model_path": self.model_path, "system_name": self.system, "mode": "agg",
                "backend_name": self.backend, "backend_version": version,
                "isl": self.isl, "osl": self.osl, "batch_size": self.batch_size,
                "tp_size": self.tp_size, "pp_size": self.pp_size,
                "attention_dp_size": self.attention_dp_size, "moe_tp_size": self.moe_tp_size,
                "moe_ep_size": self.moe_ep_size, "gemm_quant_mode": self.gemm_quant_mode,
                "moe_quant_mode": self.moe_quant_mode}


def _opt_int(row: Mapping[str, str], key: str) -> int | None:
    text = (row.get(key) or "").strip()
    return int(float(text)) if text else None


def _quant_modes(row: Mapping[str, str]) -> tuple[str | None, str | None]:
    gemm = (row.get("gemm_quant_mode") or "").strip() or None
    moe = (row.get("moe_quant_mode") or "").strip() or None
    try:
        arch = models.load_model(row["model_path"])
        mxfp4 = validation.recipe_for(row, arch) is QuantRecipe.MXFP4
    except TrilemmaError:
        mxfp4 = False  # not in trilemma's catalog: nothing to say about its checkpoint
    return (None, None) if mxfp4 else (gemm, moe)


def aic_query(row: Mapping[str, str], bundled: Callable[[str], bool]) -> AicQuery | str:
    """The row as an AIConfigurator query, or the reason it is not asked.

    `bundled(name)` says whether AIConfigurator ships that model's config.json.
    """
    if (row.get("mode") or "").strip() != "agg":
        return "disaggregated run: compared on aggregated serving only"
    model = (row.get("model_path") or "").strip()
    name = model if bundled(model) else AIC_MODEL_NAMES.get(model)
    if name is None or not bundled(name):
        return (f"model {model!r} is not bundled with AIConfigurator "
                "(it would download it from Hugging Face)")
    try:
        gemm, moe = _quant_modes(row)
        isl, osl, bs = _opt_int(row, "isl"), _opt_int(row, "osl"), _opt_int(row, "batch_size")
        if not (isl and osl and bs):
            return "isl, osl or batch_size missing"
        return AicQuery(model_path=name, system=row["system"].strip(),
                        backend=row["backend"].strip().lower(), isl=isl, osl=osl,
                        batch_size=bs, tp_size=_opt_int(row, "tp_size") or 1,
                        pp_size=_opt_int(row, "pp_size") or 1,
                        attention_dp_size=_opt_int(row, "attention_dp_size") or 1,
                        moe_tp_size=_opt_int(row, "moe_tp_size"),
                        moe_ep_size=_opt_int(row, "moe_ep_size"),
                        gemm_quant_mode=gemm, moe_quant_mode=moe)
    except (KeyError, ValueError, TrilemmaError) as exc:
        return f"unreadable row: {exc}"


def skip_reason(exc: Exception) -> str:
    """AIConfigurator's error as a short reason that groups alike rows (no paths, no keys)."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    text = re.sub(r"\s+(at|from|in) /\S+", "", text)
    text = re.sub(r"\{[^}]*\}", "{...}", text)
    text = re.sub(r"\s*\([^)]*\)", "", text)
    return f"AIConfigurator: {type(exc).__name__}: {text[:160]}"


@dataclass(frozen=True, kw_only=True)
class AicRun:
    results: list[validation.RowResult]
    versions: dict[tuple[str, str], str]   # (system, backend) -> the database version used


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    """AIConfigurator logs every fallback table it loads; keep its errors only."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _aic_bundled() -> Callable[[str], bool]:
    root = resources.files("aiconfigurator_core") / "model_configs"
    return lambda name: (root / f"{name.replace('/', '--')}_config.json").is_file()


def _recipe_kv(rows: Sequence[Mapping[str, str]]) -> list[str | None]:
    """The KV dtype of each row's benchmark recipe in AIConfigurator's names, as trilemma
    models it. Its other flags have no counterpart in `cli_estimate`: the batch is given (no
    admission cap), and free_gpu_memory_fraction is TensorRT-LLM's share of the memory left
    after weights, not SGLang's static fraction of all of it."""
    names = {KvDtype.FP8: "fp8", KvDtype.BF16: "bfloat16"}
    gpus = [validation.launch_gpus(r) for r in rows]
    concs = [validation.launch_concurrency(r) for r in rows]
    return [names[r.kv] if r and r.kv else None
            for r in validation_recipes.recipes_for(rows, gpus, concs)]


def predict_aic(rows: Iterable[Mapping[str, str]]) -> AicRun:
    """AIConfigurator's TTFT and TPOT for every row it can estimate (needs the extra)."""
    from aiconfigurator.cli.api import cli_estimate
    from aiconfigurator.sdk.perf_database import get_version_slots

    bundled = _aic_bundled()
    versions: dict[tuple[str, str], str] = {}
    out: list[validation.RowResult] = []
    with _quiet(["aiconfigurator", "aiconfigurator_core"]):
        # The same layout trilemma models: a row's launch flags over contradicting columns.
        corrected = [row for row, _ in validation_layout.corrected_rows(list(rows))]
        for i, (row, kv) in enumerate(zip(corrected, _recipe_kv(corrected), strict=True)):
            query = aic_query(row, bundled)
            if not isinstance(query, str) and kv:
                query = dataclasses.replace(query, kvcache_quant_mode=kv)
            if isinstance(query, str):
                out.append(validation.row_result(i, row, None, None, query))
                continue
            key = (query.system, query.backend)
            if key not in versions:
                slots = get_version_slots(query.system, query.backend) or {}
                versions[key] = slots.get(DATABASE_SLOT, "")
            if not versions[key]:
                out.append(validation.row_result(i, row, None, None, (
                    f"AIConfigurator has no {DATABASE_SLOT!r} database for "
                    f"{query.backend} on {query.system}")))
                continue
            try:
                est = cli_estimate(**query.estimate_kwargs(versions[key]))
            except Exception as exc:  # a third-party estimator: any failure skips the row
                out.append(validation.row_result(i, row, None, None, skip_reason(exc)))
                continue
            out.append(validation.row_result(i, row, float(est.ttft), float(est.tpot), None))
    return AicRun(results=out, versions={k: v for k, v in versions.items() if v})


class Metric(TypedDict):
    trilemma: errorstats.ErrorStats
    aiconfigurator: errorstats.ErrorStats


class PairComparison(TypedDict):
    """One (system, engine): who predicted how many rows, and the errors on the shared ones."""

    system: str
    backend: str
    rows: int
    trilemma_predicted: int
    aic_predicted: int
    both_predicted: int
    aic_database: str | None
    ttft: Metric
    tpot: Metric


def compare(ours: Sequence[validation.RowResult], theirs: Sequence[validation.RowResult],
            versions: Mapping[tuple[str, str], str]) -> list[PairComparison]:
    """Per (system, backend): APE of both models on the rows both predicted, plus counts.

    `ours` and `theirs` are the same rows in the same order.
    """
    if len(ours) != len(theirs):
        raise ValueError("the two result lists must cover the same rows")
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    errs: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
        lambda: {"ttft_t": [], "ttft_a": [], "tpot_t": [], "tpot_a": []})
    for t, a in zip(ours, theirs, strict=True):
        pair = (t.group[0], t.group[1])
        c = counts[pair]
        c[0] += 1
        c[1] += t.skipped is None
        c[2] += a.skipped is None
        if t.skipped is not None or a.skipped is not None:
            continue
        c[3] += 1
        for metric, meas, pt, pa in (("ttft", t.measured_ttft_ms, t.pred_ttft_ms, a.pred_ttft_ms),
                                     ("tpot", t.measured_tpot_ms, t.pred_tpot_ms, a.pred_tpot_ms)):
            et, ea = errorstats.ape(pt, meas), errorstats.ape(pa, meas)
            if et is not None and ea is not None:
                errs[pair][f"{metric}_t"].append(et)
                errs[pair][f"{metric}_a"].append(ea)
    out: list[PairComparison] = []
    for pair, (n, nt, na, nb) in sorted(counts.items()):
        e = errs[pair]
        out.append({"system": pair[0], "backend": pair[1], "rows": n, "trilemma_predicted": nt,
                    "aic_predicted": na, "both_predicted": nb,
                    "aic_database": versions.get(pair),
                    "ttft": {"trilemma": errorstats.stats(e["ttft_t"]),
                             "aiconfigurator": errorstats.stats(e["ttft_a"])},
                    "tpot": {"trilemma": errorstats.stats(e["tpot_t"]),
                             "aiconfigurator": errorstats.stats(e["tpot_a"])}})
    return out


def _median(stats: errorstats.ErrorStats) -> str:
    value = stats["median_ape"]
    return "-" if value is None else f"{value:.1f}%"


def comparison_lines(pairs: Sequence[PairComparison]) -> list[str]:
    """The head-to-head table as `trilemma validate --compare` prints it."""
    lines = [f"{'system':<10}{'backend':<8}{'rows':>6}{'trilemma':>10}{'AIC':>6}{'both':>6}"
             f"{'TTFT tri':>10}{'TTFT AIC':>10}{'TPOT tri':>10}{'TPOT AIC':>10}  AIC database"]
    for p in pairs:
        db = f"{DATABASE_SLOT} = {p['aic_database']}" if p["aic_database"] else "-"
        lines.append(f"{p['system']:<10}{p['backend']:<8}{p['rows']:>6}"
                     f"{p['trilemma_predicted']:>10}{p['aic_predicted']:>6}"
                     f"{p['both_predicted']:>6}{_median(p['ttft']['trilemma']):>10}"
                     f"{_median(p['ttft']['aiconfigurator']):>10}"
                     f"{_median(p['tpot']['trilemma']):>10}"
                     f"{_median(p['tpot']['aiconfigurator']):>10}  {db}")
    return lines
