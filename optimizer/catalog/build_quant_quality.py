"""Rebuild data/quant_quality.yaml from the published evaluations in quant_quality.csv.

Development tool, not imported at run time: quantization.py reads the YAML it writes. Every
CSV row either becomes a cited delta (accuracy points, quantized minus bf16) for a (recipe,
model family) pair or is listed under `excluded_rows` with the reason. Per family the delta is
the mean of its rows; each recipe also gets a fallback, the median over families, for families
nobody has published on.

    python -m trilemma.optimizer.catalog.build_quant_quality [path/to/quant_quality.csv]
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CSV = REPO_ROOT.parent / "shared" / "data" / "validation" / "quant_quality.csv"
OUTPUT = Path(__file__).resolve().parent / "data" / "quant_quality.yaml"

# The Open LLM Leaderboard v1 tasks: rows for one of these are components of an "OpenLLM v1
# average" row of the same model and scheme, which is used instead (one figure per evaluation).
OPENLLM_V1_TASKS = {"ARC-Challenge", "HellaSwag", "MMLU", "TruthfulQA", "Winogrande", "GSM8K"}

# Family spellings the model catalog may hand us -> the table's key. Keys are written as
# quantization.normalize_family leaves them (no separator before a digit).
FAMILY_ALIASES = {
    "llama3.1": "llama3",
    "llama3.2": "llama3",
    "llama3.3": "llama3",
    "qwen2.5": "qwen2",
    "qwen3_moe": "qwen3",
    "deepseek_r1": "deepseek_v3",
    "kimi_k25": "kimi_k2",
    "kimi_k2.5": "kimi_k2",
    "minimax_m2.5": "minimax_m2",
    "gpt_oss20b": "gpt_oss",
    "gpt_oss120b": "gpt_oss",
}

# Families whose checkpoints are released in a quantized format: their published scores are
# already the quantized model's, so the delta of serving them that way is 0 by definition.
_AIC_CONFIG = "NVIDIA AIConfigurator model_configs/{} (Apache-2.0)"
NATIVE = {
    "fp8": {
        "deepseek_v3": "released in fp8 (block 128x128): "
        + _AIC_CONFIG.format("deepseek-ai--DeepSeek-V3_config.json quantization_config"),
        "minimax_m2": "released in fp8 (block 128x128): "
        + _AIC_CONFIG.format("MiniMaxAI--MiniMax-M2.5_config.json quantization_config"),
    },
    "int4": {
        "kimi_k2": "released in int4 W4A16 (group 32, routed experts; Kimi K2.5 / K2-Thinking): "
        + _AIC_CONFIG.format("moonshotai--Kimi-K2.5_config.json quantization_config"),
    },
    "mxfp4": {
        "gpt_oss": "released in MXFP4 (routed experts): "
        + _AIC_CONFIG.format("openai--gpt-oss-120b_config.json quantization_config"),
    },
}

RECIPES = ("fp8", "int8", "int4", "nvfp4", "mxfp4")
# Recipes with no published rows borrow a measured 4-bit recipe's fallback, said so.
PROXY = {"nvfp4": "int4", "mxfp4": "int4"}
DECIMALS = 3


@dataclass(frozen=True)
class Row:
    source: str
    model: str
    scheme: str
    baseline_precision: str
    benchmark: str
    baseline: float | None
    quant: float | None
    published: str
    quant_text: str  # the raw quant_score cell: some rows state a bound there ("within 1.3%")

    @classmethod
    def from_csv(cls, raw: Mapping[str, str]) -> Row:
        return cls(
            source=raw["source_url_or_path"].strip(),
            model=raw["model"].strip(),
            scheme=raw["quant_scheme"].strip(),
            baseline_precision=raw["baseline_precision"].strip(),
            benchmark=raw["benchmark"].strip(),
            baseline=_number(raw["baseline_score"]),
            quant=_number(raw["quant_score"]),
            published=raw["published_delta_or_recovery"].strip(),
            quant_text=raw["quant_score"].strip(),
        )


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return None


def recipe_of(scheme: str) -> str | None:
    """The catalog recipe a CSV scheme measures, or None for schemes the catalog lacks."""
    s = scheme.upper()
    if "W4A8" in s or "W8A16" in s or s.startswith("BF16"):
        return None
    if "INT4" in s or "AWQ" in s or "GPTQ" in s:
        return "int4"
    if "INT8" in s:
        return "int8"
    if "FP8" in s:
        return "fp8"
    return None


def family_of(model: str) -> str:
    m = model.lower()
    for pattern, family in (
        (r"llama-4", "llama4"),
        (r"llama-?3", "llama3"),
        (r"llama-v2|llama-2", "llama2"),
        (r"falcon", "falcon"),
        (r"mpt", "mpt"),
        (r"qwen3", "qwen3"),
        (r"qwen2", "qwen2"),
        (r"mixtral", "mixtral"),
    ):
        if re.search(pattern, m):
            return family
    return re.sub(r"[^a-z0-9]+", "_", m).strip("_")


def _median_baseline(rows: Iterable[Row], benchmark: str) -> float:
    # One baseline per model: the same model's bf16 score repeats across its scheme rows.
    per_model = {r.model: r.baseline for r in rows if r.benchmark == benchmark and r.baseline}
    return statistics.median(per_model.values())


def _delta(row: Row, rows: list[Row]) -> tuple[float | None, str]:
    """(points, how derived) for one row, or (None, why excluded)."""
    pub = row.published.lower()
    if "lower better" in row.benchmark.lower():
        return None, "perplexity is not an accuracy in points"
    if row.baseline_precision == "Meta reported":
        # Baseline = the same model served in bf16 on the same engine (vLLM), not Meta's
        # reported number, so eval-stack differences cancel.
        refs = [
            r.quant
            for r in rows
            if r.model == row.model and r.benchmark == row.benchmark
            and r.scheme.upper().startswith("BF16") and r.quant is not None
        ]
        if not refs or row.quant is None:
            return None, "no same-engine bf16 reference"
        base = statistics.mean(refs)
        return row.quant - base, f"quant {row.quant} - mean of vLLM bf16 runs {base:g}"
    if row.baseline is not None and row.quant is not None:
        return row.quant - row.baseline, f"quant {row.quant:g} - baseline {row.baseline:g}"
    m = re.search(r"recovery\s+([\d.]+)%", pub)
    if m and row.quant is not None:
        base = row.quant / (float(m.group(1)) / 100.0)
        how = f"quant {row.quant:g} / recovery {m.group(1)}% -> baseline {base:.2f}"
        return row.quant - base, how
    m = re.search(r"loss\s+([\d.]+)%", pub)
    if m:
        # A relative loss without scores: convert with the median bf16 baseline the CSV has
        # for that benchmark, stated so the approximation is visible.
        bench = row.benchmark
        base = _median_baseline(rows, bench)
        points = -float(m.group(1)) / 100.0 * base
        how = f"relative loss {m.group(1)}% x median {bench} bf16 baseline {base:g} in the CSV"
        return points, how
    if "within" in pub or "within" in row.quant_text.lower():
        return None, "published as a bound only ('within x%'), no point estimate"
    return None, "no scores and no delta"


def _is_openllm_component(row: Row, rows: list[Row]) -> bool:
    return row.benchmark in OPENLLM_V1_TASKS and any(
        r.model == row.model and r.scheme == row.scheme and r.benchmark == "OpenLLM v1 average"
        for r in rows
    )


def build(csv_path: Path) -> dict[str, Any]:
    """The YAML document, as a dict, from the CSV at `csv_path`."""
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = [Row.from_csv(r) for r in csv.DictReader(f)]
    used, excluded = _sort_rows(rows)
    return {
        "schema": 1,
        "unit": "accuracy points, quantized minus bf16 (negative = worse)",
        "built_from": "../shared/data/validation/quant_quality.csv (published evaluations, one "
        "citation per row) by optimizer/catalog/build_quant_quality.py",
        "caveats": [
            "TensorRT-LLM blog rows use an fp16 baseline, taken as bf16.",
            "Rows mix benchmarks (OpenLLM v1 average, MMLU, MMLU-Pro, GSM8K, ChartQA) and engines; "
            "a family mean is a coarse expected cost, not a guarantee for one task.",
            "Rows published as relative loss only are converted with a median baseline, said so "
            "in their derivation.",
        ],
        "family_aliases": FAMILY_ALIASES,
        "recipes": _recipes(used),
        "excluded_rows": excluded,
    }


def _sort_rows(rows: list[Row]) -> tuple[dict[str, dict[str, list[dict[str, Any]]]],
                                         list[dict[str, Any]]]:
    """Each row's delta under its recipe and model family, or the row excluded with why."""
    used: dict[str, dict[str, list[dict[str, Any]]]] = {r: {} for r in RECIPES}
    excluded: list[dict[str, Any]] = []
    for row in rows:
        recipe = recipe_of(row.scheme)
        ident = {"model": row.model, "scheme": row.scheme, "benchmark": row.benchmark}
        if recipe is None:
            why = (
                "bf16 reference run (baseline of the fp8 row of the same model)"
                if row.scheme.upper().startswith("BF16")
                else "scheme is not a recipe in this catalog"
            )
            excluded.append({**ident, "why": why, "source": row.source})
            continue
        if _is_openllm_component(row, rows):
            excluded.append(
                {**ident, "why": "component of the OpenLLM v1 average row already used",
                 "source": row.source}
            )
            continue
        points, how = _delta(row, rows)
        if points is None:
            excluded.append({**ident, "why": how, "source": row.source})
            continue
        used[recipe].setdefault(family_of(row.model), []).append(
            {**ident, "delta": round(points, DECIMALS), "derivation": how, "source": row.source}
        )
    return used, excluded


def _recipes(used: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per recipe: family means, a cross-family fallback (or a proxy's), native figures."""
    recipes: dict[str, Any] = {}
    for recipe in RECIPES:
        families = {
            fam: {
                "points": round(statistics.mean(r["delta"] for r in fam_rows), DECIMALS),
                "rows": fam_rows,
            }
            for fam, fam_rows in sorted(used[recipe].items())
        }
        entry: dict[str, Any] = {}
        if families:
            means = [f["points"] for f in families.values()]
            entry["fallback"] = {
                "points": round(statistics.median(means), DECIMALS),
                "rows": sum(len(f["rows"]) for f in families.values()),
                "source": "cross-family median of the family means for "
                + f"{recipe} ({', '.join(families)})",
            }
        if recipe in NATIVE:
            entry["native"] = dict(NATIVE[recipe])
        entry["families"] = families
        recipes[recipe] = entry
    for recipe, proxy in PROXY.items():
        if "fallback" not in recipes[recipe]:
            fb = recipes[proxy]["fallback"]
            recipes[recipe] = {
                "fallback": {
                    "points": fb["points"],
                    "rows": 0,
                    "source": f"no published {recipe} rows in quant_quality.csv; proxy: the "
                    f"{proxy} (4-bit weight) fallback, {fb['source']}",
                },
                **recipes[recipe],
            }
    return recipes


HEADER = (
    "# GENERATED by optimizer/catalog/build_quant_quality.py from\n"
    "# ../shared/data/validation/quant_quality.csv; do not edit by hand, rerun the builder.\n"
    "# Accuracy cost of each quantization recipe per model family, every delta cited.\n"
)


def render(doc: Mapping[str, Any]) -> str:
    return HEADER + yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True, width=100)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    csv_path = Path(args[0]) if args else DEFAULT_CSV
    OUTPUT.write_text(render(build(csv_path)), encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
