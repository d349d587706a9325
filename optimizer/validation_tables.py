"""Score the closed-loop latency model against published latency-vs-load tables.

Sits beside `validation` (which reads AIConfigurator's silicon rows): this module reads the
`latency_tables.csv` schema (one published measurement per row with its citation: engine,
model, GPU, TP/PP, precision, ISL/OSL, a load given as a concurrency or a request rate, and
the measured TTFT and inter-token latency), predicts TTFT and ITL (= TPOT) with
`perf.latency.closed_loop`, and summarises the absolute percentage errors.

The tables name things their own way ("meta-llama3-8b-instruct", "H100_80GB_HBM3",
"kv-cache FP8"), so every row is mapped onto the catalogs first. A mapping that changes what
is modelled (Llama-3 run as Llama-3.1, NIM's TensorRT-LLM backend run with vLLM's constants)
is recorded on the row as an assumption; a row that cannot be mapped soundly is kept with the
reason, never dropped silently.
"""

from __future__ import annotations

import csv
import enum
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

import numpy as np

from trilemma.optimizer import errorstats
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.errors import InputError, TrilemmaError
from trilemma.optimizer.perf import estimate, latency
from trilemma.optimizer.perf.engine import Engine
from trilemma.optimizer.perf.parallelism import Parallelism

REQUIRED = ("source_url_or_path", "engine", "model", "gpu", "num_gpus", "tp", "pp",
            "precision", "isl", "osl", "load_type", "load_value", "ttft_ms", "itl_ms")

Group = tuple[str, str, str, str]  # (source, engine, model, gpu) as the table spells them


@dataclass(frozen=True, kw_only=True)
class _Alias:
    model: str                  # bundled catalog id
    max_position_embeddings: int | None  # the table model's own context window, when smaller
    note: str | None            # why the substitution is sound; None for the same model


# Table names -> bundled architectures. Only exact architectural twins: the step cost depends
# on layer count, widths, heads and KV heads, which these pairs share.
_LLAMA3_NOTE = ("Llama-3 {size} modelled as Llama-3.1 {size}: same layers, widths and GQA "
                "heads; 3.1 adds only llama3 rope scaling and a 128k context, which leave the "
                "step cost unchanged within Llama-3's 8k context")
_MODEL_ALIASES: Mapping[str, _Alias] = {
    "meta-llama3-8b-instruct": _Alias(
        model="meta-llama/Llama-3.1-8B", max_position_embeddings=8192,
        note=_LLAMA3_NOTE.format(size="8B")),
    "meta-llama3-70b-instruct": _Alias(
        model="meta-llama/Llama-3.1-70B", max_position_embeddings=8192,
        note=_LLAMA3_NOTE.format(size="70B")),
    "llama-3.3-70b-instruct": _Alias(
        model="meta-llama/Llama-3.1-70B", max_position_embeddings=None,
        note="Llama-3.3-70B modelled as Llama-3.1-70B: the same config.json shape; only the "
             "weights were retrained"),
    "llama-3.1-8b": _Alias(model="meta-llama/Llama-3.1-8B", max_position_embeddings=None,
                           note=None),
    "llama-3.1-8b-instruct": _Alias(model="meta-llama/Llama-3.1-8B",
                                    max_position_embeddings=None, note=None),
    "gpt-oss-20b": _Alias(model="openai/gpt-oss-20b", max_position_embeddings=None, note=None),
}

# Names the GPU column uses (nvidia-smi names, vendor shorthands) -> catalog keys, with a note
# where the name leaves the form factor open.
_GPU_ALIASES: Mapping[str, tuple[str, str | None]] = {
    "a100_sxm4_80gb": ("a100_sxm", None),
    "h100_80gb_hbm3": ("h100_sxm", None),  # nvidia-smi's name of the SXM5 part
    "h100_sxm5_80gb": ("h100_sxm", None),
    "h100_80g": ("h100_sxm", "'H100 80G' read as H100 SXM (the PCIe card reports 'H100 PCIe')"),
}

_BF16 = ("fp16", "bf16", "float16", "bfloat16", "half")
_TRTLLM_NOTE = ("NIM's TensorRT-LLM backend modelled with vLLM's step overheads and "
                "scheduler defaults; trilemma does not model TensorRT-LLM itself")
# An open-loop rate this close to the predicted capacity is dominated by queueing that a
# closed loop does not have; the prediction would be meaningless there.
_MAX_QPS_UTILISATION = 0.9
_BISECTION_STEPS = 30


@dataclass(frozen=True, kw_only=True)
class TableRowResult:
    """One table row: what was measured, what the model predicts, or why it was skipped."""

    id: str                              # "row<N>", N counting data rows from 1
    group: Group
    load_type: str
    load_value: float | None
    concurrency: float | None            # modelled concurrency (QPS rows: the matched one)
    measured_ttft_ms: float | None
    measured_itl_ms: float | None
    ttft_stat: str                       # mean / median / ... as the source reports it
    itl_stat: str
    pred_ttft_ms: float | None
    pred_itl_ms: float | None
    assumptions: tuple[str, ...]
    skipped: str | None

    def as_json(self) -> dict[str, object]:
        return {"id": self.id, "concurrency": errorstats.rounded(self.concurrency),
                "pred_ttft_ms": errorstats.rounded(self.pred_ttft_ms),
                "pred_itl_ms": errorstats.rounded(self.pred_itl_ms), "skipped": self.skipped}



def matches_columns(fieldnames: Iterable[str]) -> bool:
    """True when a CSV header is this module's schema (lets `trilemma validate` auto-detect)."""
    return set(REQUIRED) <= set(fieldnames)


def read_table(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError("csv", str(path), f"missing columns: {', '.join(missing)}")
            return list(reader)
    except OSError as exc:
        raise InputError("csv", str(path), f"cannot be read: {exc.strerror}") from None


def _number(text: str | None) -> float | None:
    """A positive finite number, tolerating a leading '~' (approximate lengths)."""
    cleaned = (text or "").strip().lstrip("~").replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def map_model(name: str) -> tuple[_Alias, None] | tuple[None, str]:
    """The bundled architecture for a table's model name, or the reason there is none."""
    key = name.strip().lower()
    short = key.rsplit("/", 1)[-1]
    if re.search(r"llama[-_ ]?2", short):
        return None, (f"model {name!r}: Llama-2 is not bundled (its MHA 7B/13B and 4k context "
                      "differ from every bundled Llama)")
    if short in _MODEL_ALIASES:
        return _MODEL_ALIASES[short], None
    try:
        arch = models.load_model(name.strip())
    except TrilemmaError:
        return None, f"model {name!r} is not bundled and has no known architectural twin"
    return _Alias(model=arch.id, max_position_embeddings=None, note=None), None


def map_gpu(name: str) -> tuple[str, str | None] | tuple[None, str]:
    """(catalog key, note) for a table's GPU name, or (None, reason)."""
    key = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if key in _GPU_ALIASES:
        return _GPU_ALIASES[key]
    try:
        return gpus.get_gpu(name).key, None
    except InputError:
        # "not stated next to table (post benchmarks on H100)": guessing the card from prose
        # would validate against a machine the source never named.
        return None, f"GPU {name!r} is not a catalog GPU (or not stated by the source)"


def map_precision(text: str, arch: models.ModelArch) -> tuple[str, str, str | None] | str:
    """(weight recipe, KV dtype, note) for a table's precision column, or a skip reason."""
    p = text.strip().lower()
    if p in _BF16:
        return "bf16", KvDtype.BF16.value, None
    if p == "fp8":
        return ("fp8", KvDtype.BF16.value,
                "fp8 weights with a bf16 KV cache (the source does not state the KV dtype)")
    kv_only = re.fullmatch(r"kv-cache (bf16|fp16|fp8)", p)
    if kv_only:
        # The column names only the KV cache: the checkpoint ran in its own format.
        kv = KvDtype.FP8.value if kv_only.group(1) == "fp8" else KvDtype.BF16.value
        return estimate.default_recipe(arch).value, kv, None
    if p.startswith("kv-cache"):
        return (f"precision {text!r}: a KV cache that mixes dtypes across layers is not "
                "modelled")
    return f"precision {text!r} has no matching quantization recipe"


def map_engine(name: str) -> tuple[Engine, str | None] | str:
    n = name.strip().lower()
    if n.startswith("vllm"):
        return Engine.VLLM, None
    if n.startswith("sglang"):
        return Engine.SGLANG, None
    if "nim" in n or "tensorrt" in n or "trt" in n:
        return Engine.VLLM, _TRTLLM_NOTE
    return f"engine {name!r} is not modelled"


class LoadType(enum.StrEnum):
    """How a table row states its load: a closed-loop concurrency or an offered request rate."""

    CONCURRENCY = "concurrency"
    QPS = "qps"


_LOAD_TYPES = {t.value: t for t in LoadType}


@dataclass(frozen=True, kw_only=True)
class _Planned:
    index: int
    cfg: estimate.Config
    isl: float
    osl: float
    load_type: LoadType
    load: float
    notes: tuple[str, ...]


def _plan(row: Mapping[str, str]) -> _Planned | str:
    """Map one row onto a resolved configuration, or return the reason it cannot be."""
    alias, why = map_model(row["model"])
    if alias is None:
        return why or "unknown model"
    gpu_key, gpu_note = map_gpu(row["gpu"])
    if gpu_key is None:
        return gpu_note or "unknown GPU"
    eng = map_engine(row["engine"])
    if isinstance(eng, str):
        return eng
    engine, engine_note = eng
    arch = models.load_model(alias.model)
    prec = map_precision(row["precision"], arch)
    if isinstance(prec, str):
        return prec
    quant, kv, prec_note = prec
    isl, osl = _number(row["isl"]), _number(row["osl"])
    if isl is None or osl is None:
        return f"isl={row['isl']!r} / osl={row['osl']!r} are not positive numbers"
    window = alias.max_position_embeddings
    if window and isl + osl > window:
        return (f"isl+osl={isl + osl:.0f} exceeds {row['model']}'s {window}-token "
                "context, so its Llama-3.1 twin is not a faithful stand-in")
    tp, pp, n = _number(row["tp"]) or 1, _number(row["pp"]) or 1, _number(row["num_gpus"])
    n = n or tp * pp
    if n % (tp * pp):
        return f"num_gpus={n:.0f} is not a multiple of tp*pp={tp * pp:.0f}"
    load_type = _LOAD_TYPES.get(row["load_type"].strip().lower())
    load = _number(row["load_value"])
    if load_type is None or load is None:
        return f"load {row['load_type']!r}={row['load_value']!r} is not modelled"
    if _number(row["ttft_ms"]) is None and _number(row["itl_ms"]) is None:
        return "no measured TTFT or ITL"
    try:
        cfg = estimate.resolve(model=alias.model, gpu=gpu_key, tp=int(tp), pp=int(pp),
                               dp=int(n // (tp * pp)), quant=quant, kv_dtype=kv,
                               engine=engine.value)
    except TrilemmaError as exc:
        return str(exc)
    notes = tuple(x for x in (alias.note, gpu_note, engine_note, prec_note) if x)
    if "~" in row["isl"] + row["osl"]:
        notes += ("lengths are approximate in the source; modelled at their nominal value",)
    return _Planned(index=-1, cfg=cfg, isl=isl, osl=osl, load_type=load_type, load=load,
                    notes=notes)


def _run(cfg: estimate.Config, conc: np.ndarray, isl: np.ndarray,
         osl: np.ndarray) -> latency.ClosedLoopResult:
    return latency.closed_loop(estimate.step_model(cfg), tp=cfg.par.tp, pp=cfg.par.pp,
                               dp=cfg.par.dp, ep=cfg.par.ep, concurrency=conc,
                               prompt_tokens=isl, output_tokens=osl)


def _match_qps(cfg: estimate.Config, qps: np.ndarray, isl: np.ndarray,
               osl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concurrency whose closed-loop request rate equals each QPS, and whether it is sound.

    The closed-loop rate rises monotonically with concurrency until every slot is busy, so a
    bisection on log-concurrency between 1 and the slot count finds it, all rows at once.
    """
    probe = _run(cfg, np.ones_like(qps), isl, osl)
    slots = np.maximum(np.minimum(estimate.step_model(cfg).facts.default_max_num_seqs(cfg.gpu),
                                  probe.memory.max_seqs), 1.0) * cfg.par.dp
    capacity = _run(cfg, slots, isl, osl).requests_per_s
    lo, hi = np.zeros_like(qps), np.log(slots)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = _run(cfg, np.exp(mid), isl, osl).requests_per_s < qps
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.exp(0.5 * (lo + hi)), qps <= _MAX_QPS_UTILISATION * capacity


_BatchKey = tuple[str, str, QuantRecipe, KvDtype, Engine, Parallelism, LoadType]


def predict_table_rows(rows: Iterable[Mapping[str, str]]) -> list[TableRowResult]:
    """Predict every row it can; rows sharing a configuration go through one vectorized call."""
    rows = list(rows)
    out: dict[int, TableRowResult] = {}
    batches: dict[_BatchKey, list[_Planned]] = defaultdict(list)

    def result(i: int, planned: _Planned | None, *, conc: float | None = None,
               ttft: float | None = None, itl: float | None = None,
               skipped: str | None = None) -> TableRowResult:
        row = rows[i]
        return TableRowResult(
            id=f"row{i + 1}", group=_group(row), load_type=row.get("load_type", ""),
            load_value=_number(row.get("load_value")), concurrency=conc,
            measured_ttft_ms=_number(row.get("ttft_ms")),
            measured_itl_ms=_number(row.get("itl_ms")),
            ttft_stat=row.get("ttft_stat", ""), itl_stat=row.get("itl_stat", ""),
            pred_ttft_ms=ttft, pred_itl_ms=itl,
            assumptions=planned.notes if planned else (), skipped=skipped)

    for i, row in enumerate(rows):
        try:
            planned = _plan(row)
        except (KeyError, ValueError) as exc:
            planned = f"unreadable row: {exc}"
        if isinstance(planned, str):
            out[i] = result(i, None, skipped=planned)
            continue
        planned = replace(planned, index=i)
        c = planned.cfg
        batches[(c.arch.id, c.gpu.key, c.quant, c.kv, c.engine, c.par, planned.load_type)].append(
            planned)

    for members in batches.values():
        cfg = members[0].cfg
        isl = np.array([m.isl for m in members])
        osl = np.array([m.osl for m in members])
        load = np.array([m.load for m in members])
        sound = np.ones(len(members), dtype=bool)
        if members[0].load_type is LoadType.QPS:
            conc, sound = _match_qps(cfg, load, isl, osl)
        else:
            conc = load
        r = _run(cfg, conc, isl, osl)
        for j, m in enumerate(members):
            if not bool(r.fits[j]):
                out[m.index] = result(m.index, m, skipped="does not fit in GPU memory")
            elif not sound[j]:
                out[m.index] = result(m.index, m, skipped=(
                    f"QPS above {_MAX_QPS_UTILISATION:.0%} of the predicted capacity: "
                    "open-loop queueing, which a closed loop lacks, dominates TTFT there"))
            else:
                out[m.index] = result(m.index, m, conc=float(conc[j]),
                                      ttft=float(r.ttft_ms[j]), itl=float(r.tpot_ms[j]))
                if m.load_type is LoadType.QPS:
                    out[m.index] = _with_note(out[m.index], (
                        "QPS matched by the closed-loop concurrency of equal throughput; "
                        "Poisson burstiness is not modelled, so TTFT is optimistic"))
    return [out[i] for i in range(len(rows))]


def _with_note(r: TableRowResult, note: str) -> TableRowResult:
    return replace(r, assumptions=(*r.assumptions, note))


def _group(row: Mapping[str, str]) -> Group:
    return (row.get("source_url_or_path", ""), row.get("engine", ""), row.get("model", ""),
            row.get("gpu", ""))




class MetricErrors(TypedDict):
    ttft: errorstats.ErrorStats
    itl: errorstats.ErrorStats


class GroupErrors(MetricErrors):
    source: str
    engine: str
    model: str
    gpu: str


class SkippedRow(TypedDict):
    id: str
    reason: str


class Summary(TypedDict):
    """The latency-table validation report, JSON-ready."""

    rows: int
    modelled: int
    skipped: int
    skip_reasons: dict[str, int]
    skipped_rows: list[SkippedRow]
    overall: MetricErrors
    groups: list[GroupErrors]


def summarize(results: Sequence[TableRowResult]) -> Summary:
    """Median and p90 APE of TTFT and ITL, overall and by (source, engine, model, gpu).

    Skipped rows are counted by reason and listed one by one.
    """
    groups: dict[Group, dict[str, list[float]]] = defaultdict(lambda: {"ttft": [], "itl": []})
    overall: dict[str, list[float]] = {"ttft": [], "itl": []}
    reasons: dict[str, int] = defaultdict(int)
    for r in results:
        if r.skipped:
            reasons[r.skipped] += 1
            continue
        for metric, pred, meas in (("ttft", r.pred_ttft_ms, r.measured_ttft_ms),
                                   ("itl", r.pred_itl_ms, r.measured_itl_ms)):
            err = errorstats.ape(pred, meas)
            if err is not None:
                groups[r.group][metric].append(err)
                overall[metric].append(err)
    modelled = sum(1 for r in results if not r.skipped)
    return {
        "rows": len(results),
        "modelled": modelled,
        "skipped": len(results) - modelled,
        "skip_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "skipped_rows": [{"id": r.id, "reason": r.skipped} for r in results if r.skipped],
        "overall": {"ttft": errorstats.stats(overall["ttft"]),
                    "itl": errorstats.stats(overall["itl"])},
        "groups": [
            {"source": g[0], "engine": g[1], "model": g[2], "gpu": g[3],
             "ttft": errorstats.stats(v["ttft"]), "itl": errorstats.stats(v["itl"])}
            for g, v in sorted(groups.items())
        ],
    }
