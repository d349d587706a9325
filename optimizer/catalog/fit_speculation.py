"""Fit the acceptance model of data/speculation.yaml to published acceptance lengths.

Development tool, not imported at run time: speculation.py reads the YAML it writes.

Model: a per-token acceptance a(p) = a_lo + (a_hi - a_lo) * p, p the workload's predictability
(0 creative writing, 0.5 chat, 1 rewriting / summaries), and tokens per verify step
tau = sum_{i=0..k} a**i. Each usable row of speculative.csv gives (dataset -> p, k, tau);
inverting tau at the row's k gives its a, and a least-squares line through (p, a) gives
a_lo, a_hi. The dataset -> p mapping is fixed a priori from what the task asks the model to
write (PREDICTABILITY, with reasons), never tuned to the acceptances.

    python -m trilemma.optimizer.catalog.fit_speculation [path/to/speculative.csv]
"""

from __future__ import annotations

import csv
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trilemma.optimizer.catalog import speculation

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CSV = REPO_ROOT.parent / "shared" / "data" / "validation" / "speculative.csv"
OUTPUT = Path(__file__).resolve().parent / "data" / "speculation.yaml"
DECIMALS = 4

SPEC_BENCH_TASKS = {
    "Spec-Bench: Multi-turn Conversation": (0.5, "MT-bench chat: the scale's 0.5 by definition"),
    "Spec-Bench: Translation": (
        0.4, "WMT14 de-en: output pinned by the source's meaning, but few tokens shared with it"),
    "Spec-Bench: Summarization": (
        0.85, "CNN/DailyMail: summaries copy spans of the article; partly abstractive, so < 1"),
    "Spec-Bench: Question Answering": (
        0.45, "Natural Questions without context: short free answers from memory, chat-like"),
    "Spec-Bench: Mathematical Reasoning": (
        0.65, "GSM8K: formulaic step-by-step arithmetic that repeats the question's numbers"),
    "Spec-Bench: Retrieval-aug. Generation": (
        0.8, "Natural Questions with retrieved passages: answers can copy the context"),
}
SPEED_BENCH_DOMAINS = {
    "SPEED-Bench Coding": (0.65, "writing code from a spec: regular, but new text (not a rewrite)"),
    "SPEED-Bench Math": (0.65, "worked solutions, formulaic like GSM8K"),
    "SPEED-Bench RAG": (0.8, "answers grounded in, and copying from, the given context"),
    "SPEED-Bench Multilingual": (0.4, "translation-like: few tokens shared with the prompt"),
    "SPEED-Bench Reasoning": (0.55, "long chains of thought: free prose, a little more regular"),
    "SPEED-Bench STEM": (0.55, "technical explanations: free prose with stock phrasing"),
    "SPEED-Bench Summarization": (0.85, "as Spec-Bench summarization"),
    "SPEED-Bench Humanities": (0.45, "open essays and explanations, chat-like"),
    "SPEED-Bench QA": (0.45, "open questions answered from memory, chat-like"),
    "SPEED-Bench Writing": (0.15, "creative writing is the scale's 0; some prompts constrain it"),
    "SPEED-Bench Roleplay": (0.1, "open-ended character dialogue, near creative writing"),
}


def _mean_p(table: Mapping[str, tuple[float, str]]) -> float:
    return round(statistics.mean(p for p, _ in table.values()), 4)


PREDICTABILITY: dict[str, tuple[float, str]] = {
    **SPEC_BENCH_TASKS,
    "Spec-Bench: Overall": (_mean_p(SPEC_BENCH_TASKS), "mean of the six Spec-Bench tasks"),
    **SPEED_BENCH_DOMAINS,
    "SPEED-Bench": (_mean_p(SPEED_BENCH_DOMAINS), "mean of the eleven SPEED-Bench domains"),
    "SPEED-Bench (11-domain average)": (_mean_p(SPEED_BENCH_DOMAINS), "as SPEED-Bench"),
    "MT-Bench": (0.5, "multi-turn chat: the scale's 0.5 by definition"),
    "HumanEval": (0.65, "code completion from a docstring: regular, but new text"),
    "synthetic ISL 65536 / OSL 4096": (
        0.5, "assumed: the post does not describe the synthetic prompts' content"),
}

# Spec-Bench methods that map onto a catalog method, with the k their acceptance length was
# measured at (Spec-Bench evaluation/inference_*.py at commit 09244ff3 and the EAGLE repo).
SPEC_BENCH_METHODS = {
    "EAGLE": ("eagle", 5, "EAGLE-1 draft tree mc_sim_7b_63: 25 nodes, depth 5 (EAGLE "
              "eagle/model/choices.py)"),
    "PLD": ("ngram", 10, "prompt lookup with draft_num_candidate_tokens=10, "
            "draft_matching_window_size=3 (Spec-Bench evaluation/inference_pld.py)"),
    "SpS": ("draft", 5, "HF assisted generation, num_assistant_tokens=5 to start, heuristic "
            "schedule (Spec-Bench evaluation/inference_sps.py, drafter vicuna-68m)"),
}
# Speculation posts that report acceptance lengths directly: csv method -> (method, k).
DIRECT_METHODS = {
    "EAGLE-3 K=3": ("eagle3", 3),
    "EAGLE-3 K=7": ("eagle3", 7),
    "EAGLE-3 (3 spec tokens)": ("eagle3", 3),
}
MTP_WINDOW = re.compile(r"MTP (\d+)-token window")
MTP_TAU = re.compile(r"avg acceptance length ([\d.]+)")
TAU_METRICS = {"acceptance length", "mean accepted tokens per decoding step"}
REDUNDANT = {"SPEED-Bench (11-domain average)"}  # its eleven domain rows are used instead

# A method whose rows sit at one predictability cannot fix a slope; it borrows the spread
# a_hi - a_lo of the most similar method (MTP: a learned one-layer head on target features).
SPREAD_DONOR = {"mtp": "eagle3"}

CAVEATS = {
    "eagle": [
        "Spec-Bench runs EAGLE with a draft tree (25 nodes, depth 5); a chain of k drafts, as "
        "vLLM runs it, accepts fewer tokens than a tree of the same depth, so this a is "
        "optimistic for vLLM.",
        "Per-task tokens per step are derived: the published overall acceptance length times "
        "the task's speedup over the mean task speedup (same model, GPU and method, so the "
        "per-step cost cancels to first order).",
    ],
    "ngram": [
        "Prompt lookup proposes drafts only when a 3-gram matches; the geometric model folds "
        "matched and unmatched steps into one a, which is fair for k up to 10.",
        "Per-task tokens per step derived from speedup ratios, as for eagle.",
    ],
    "draft": [
        "Spec-Bench pairs Vicuna 7B/13B/33B with a 68M-parameter drafter; a 0.5-1B drafter of "
        "the same family accepts more, so this is a low end.",
        "Per-task tokens per step derived from speedup ratios, as for eagle.",
    ],
    "eagle3": [
        "Chains as vLLM runs them: gpt-oss-20b on B200 (k = 3 and 7) and MiniMax-M3 on AMD "
        "(k = 3). Acceptance falls with draft position: at k = 7 gpt-oss yields fewer tokens "
        "than the k = 3 fit predicts, so large k is optimistic.",
    ],
    "mtp": [
        "Two rows, one workload (DeepSeek V3 on H200, SGLang, k = 3 and 4): the level is "
        "fitted, the spread a_hi - a_lo is eagle3's.",
        "DeepSeek V3 has one nextn layer, reused for every draft position; acceptance falls "
        "with position faster than for a head trained for it.",
    ],
}


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _row(method: str, k: int, tau: float, dataset: str, raw: Mapping[str, str],
         derivation: str) -> dict[str, Any]:
    p = PREDICTABILITY[dataset][0]
    return {
        "method": method,
        "target": raw["target_model"],
        "gpu": raw["gpu"],
        "dataset": dataset,
        "p": p,
        "k": k,
        "tokens_per_step": round(tau, DECIMALS),
        "derivation": derivation,
        "source": raw["source_url_or_path"],
    }


def collect(rows: list[dict[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(fit rows, excluded groups) from the CSV rows."""
    fit: list[dict[str, Any]] = []
    used: set[int] = set()
    # Spec-Bench: per (method, target, GPU), the overall acceptance length spread over tasks.
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, raw in enumerate(rows):
        if raw["method"] in SPEC_BENCH_METHODS and raw["dataset"].startswith("Spec-Bench"):
            groups[(raw["method"], raw["target_model"], raw["gpu"])].append(i)
    for (name, _target, _gpu), idx in groups.items():
        method, k, why_k = SPEC_BENCH_METHODS[name]
        overall = [i for i in idx if rows[i]["metric"] in TAU_METRICS]
        tasks = [i for i in idx if rows[i]["dataset"] in SPEC_BENCH_TASKS
                 and rows[i]["metric"].startswith("speedup")]
        if len(overall) != 1 or len(tasks) != len(SPEC_BENCH_TASKS):
            continue
        tau_all = float(rows[overall[0]]["value"])
        speedups = {i: float(rows[i]["value"]) for i in tasks}
        norm = statistics.mean(speedups.values())
        for i, s in speedups.items():
            how = (f"overall {tau_all:g} x task speedup {s:g} / mean task speedup {norm:.4f}; "
                   f"k={k}: {why_k}")
            fit.append(_row(method, k, tau_all * s / norm, rows[i]["dataset"], rows[i], how))
        used.update(idx)  # the overall speedup row is implied by the task rows
    for i, raw in enumerate(rows):
        if i in used:
            continue
        if raw["method"] in DIRECT_METHODS and raw["metric"] == "acceptance length":
            if raw["dataset"] in REDUNDANT:
                continue
            method, k = DIRECT_METHODS[raw["method"]]
            fit.append(_row(method, k, float(raw["value"]), raw["dataset"], raw,
                            f"published acceptance length at k={k}"))
            used.add(i)
            continue
        window, tau = MTP_WINDOW.match(raw["method"]), MTP_TAU.search(raw["notes"])
        if window and tau:
            k = int(window.group(1))
            fit.append(_row("mtp", k, float(tau.group(1)), raw["dataset"], raw,
                            f"average acceptance length in the post, {k}-token draft window "
                            "(the post's example counts n = drafted tokens)"))
            used.add(i)
    excluded: dict[tuple[str, str], dict[str, Any]] = {}
    for i, raw in enumerate(rows):
        if i in used:
            continue
        key = (raw["method"], raw["metric"])
        entry = excluded.setdefault(key, {"method": raw["method"], "metric": raw["metric"],
                                          "rows": 0, "why": _why_excluded(raw)})
        entry["rows"] += 1
    return fit, list(excluded.values())


def _why_excluded(raw: Mapping[str, str]) -> str:
    name, metric = raw["method"], raw["metric"]
    if raw["dataset"] in REDUNDANT:
        return "average of the per-domain rows already used"
    if name == "EAGLE2":
        return ("EAGLE-2 grows a dynamic 60-token tree; vLLM drafts a chain, so its acceptance "
                "length would overstate vLLM's")
    if name in {"Medusa", "Hydra", "REST", "Lookahead"} or name.startswith("P-EAGLE"):
        return "method not in the catalog"
    if metric not in TAU_METRICS and "acceptance length" not in raw["notes"]:
        return ("a speedup or throughput, not an acceptance length: it mixes acceptance with "
                "engine, batch and drafting cost")
    return "no usable acceptance length"


A_MAX = 0.99  # a per-token acceptance of 1 would mean a drafter that is never wrong


def _sse(p: np.ndarray, a: np.ndarray, lo: float, hi: float) -> float:
    return float(np.sum((lo + (hi - lo) * p - a) ** 2))


def fit_line(p: np.ndarray, a: np.ndarray, spread: float | None) -> tuple[float, float, str]:
    """(a_lo, a_hi, how): least squares of a on p with 0 <= a_lo <= a_hi <= A_MAX.

    The model is linear in (a_lo, a_hi), so this is a two-variable convex QP: its optimum is
    the best feasible minimizer among the unconstrained one, those on each constraint face
    and the vertices. With a borrowed spread only the level is fitted.
    """
    if spread is not None:
        lo = float(np.clip(np.mean(a - spread * p), 0.0, A_MAX - spread))
        return lo, lo + spread, "level by least squares, spread a_hi - a_lo borrowed"
    q = 1.0 - p
    candidates: dict[str, tuple[float, float]] = {
        "flat at the mean (no spread in p)": (float(np.mean(a)), float(np.mean(a))),
        "a_lo at its bound 0": (0.0, float(np.sum(p * a) / np.sum(p * p))),
        f"a_hi at its bound {A_MAX}": (float(np.sum(q * (a - A_MAX * p)) / np.sum(q * q)), A_MAX),
        "vertex (0, 0)": (0.0, 0.0),
        f"vertex (0, {A_MAX})": (0.0, A_MAX),
        f"vertex ({A_MAX}, {A_MAX})": (A_MAX, A_MAX),
    }
    if np.ptp(p) > 0:
        slope, intercept = np.polyfit(p, a, 1)
        candidates = {"least squares": (float(intercept), float(intercept + slope)),
                      **candidates}
    feasible = {how: (lo, hi) for how, (lo, hi) in candidates.items()
                if -1e-12 <= lo <= hi + 1e-12 and hi <= A_MAX + 1e-12}
    how = min(feasible, key=lambda h: _sse(p, a, *feasible[h]))
    lo, hi = feasible[how]
    if how != "least squares":
        how = f"least squares bounded to 0 <= a_lo <= a_hi <= {A_MAX}: {how}"
    return max(lo, 0.0), hi, how


def build(csv_path: Path) -> dict[str, Any]:
    """The YAML document, as a dict, from the CSV at `csv_path`."""
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fit_rows, excluded = collect(rows)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in fit_rows:
        by_method[r["method"]].append(r)
    methods: dict[str, Any] = {}
    order = sorted(by_method, key=lambda m: m in SPREAD_DONOR)  # donors first
    for name in order:
        rs = by_method[name]
        p = np.array([r["p"] for r in rs])
        k = np.array([r["k"] for r in rs])
        tau = np.array([r["tokens_per_step"] for r in rs])
        a = np.array([float(speculation.acceptance_from_tokens_per_step(t, int(kk)))
                      for t, kk in zip(tau, k, strict=True)])
        donor = SPREAD_DONOR.get(name)
        spread = None
        if donor is not None:
            spread = methods[donor]["a_hi"] - methods[donor]["a_lo"]
        a_lo, a_hi, how = fit_line(p, a, spread)
        a_lo, a_hi = round(a_lo, DECIMALS), round(a_hi, DECIMALS)
        a_fit = a_lo + (a_hi - a_lo) * p
        tau_fit = np.array([float(speculation.expected_tokens_per_step(x, int(kk)))
                            for x, kk in zip(a_fit, k, strict=True)])
        rel = (tau_fit - tau) / tau
        for r, ai, ti in zip(rs, a, tau_fit, strict=True):
            r["a"] = round(float(ai), DECIMALS)
            r["fitted_tokens_per_step"] = round(float(ti), DECIMALS)
            del r["method"]
        sources = sorted({r["source"] for r in rs})
        methods[name] = {
            "a_lo": a_lo,
            "a_hi": a_hi,
            "source": f"fit to {len(rs)} rows of speculative.csv: " + "; ".join(sources),
            "fit": {
                "how": how + (f" from {donor}" if donor else ""),
                "rows_used": len(rs),
                "rmse_acceptance": round(float(np.sqrt(np.mean((a_fit - a) ** 2))), DECIMALS),
                "rmse_tokens_per_step": round(float(np.sqrt(np.mean((tau_fit - tau) ** 2))),
                                              DECIMALS),
                "mean_abs_rel_error_tokens": round(float(np.mean(np.abs(rel))), DECIMALS),
                "max_abs_rel_error_tokens": round(float(np.max(np.abs(rel))), DECIMALS),
            },
            "caveats": CAVEATS.get(name, []),
            "rows": rs,
        }
    ordered = {m.value: methods[m.value] for m in speculation.SpecMethod if m.value in methods}
    return {
        "schema": 1,
        "model": "a(p) = a_lo + (a_hi - a_lo) * p for predictability p in [0, 1]; tokens per "
        "verify step = sum_{i=0..k} a**i",
        "built_from": "../shared/data/validation/speculative.csv by "
        "optimizer/catalog/fit_speculation.py",
        "predictability": {d: {"p": p, "why": why} for d, (p, why) in PREDICTABILITY.items()},
        "methods": ordered,
        "excluded": excluded,
    }


HEADER = (
    "# GENERATED by optimizer/catalog/fit_speculation.py from\n"
    "# ../shared/data/validation/speculative.csv; do not edit by hand, rerun the fit.\n"
    "# Per-token acceptance of each speculative-decoding method against workload predictability,\n"
    "# with every row the fit used, its citation and the fit error.\n"
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
