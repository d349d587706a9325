"""Speculative decoding: methods, their configuration, drafting cost and acceptance model.

The perf model asks two things of a speculative configuration: how many tokens a decode step
yields (expected_tokens_per_step of the per-token acceptance a and the k draft tokens) and
what drafting costs (draft_cost). The acceptance a depends on the method and on how
predictable the workload's output is (0 = creative writing, 0.5 = chat, 1 = rewriting code or
summarizing); data/speculation.yaml holds a_lo/a_hi per method, fitted by fit_speculation.py to
published acceptance lengths, with the fit rows and their error.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog.data_files import read_yaml
from trilemma.optimizer.errors import InputError

DATA_FILE = "speculation.yaml"
MAX_K = 16  # acceptance**16 is negligible for every fitted method; more drafts only cost time

ArrayLike = float | npt.ArrayLike


class SpecMethod(enum.StrEnum):
    """How draft tokens are proposed. Value == the CLI spelling."""

    NONE = "none"
    NGRAM = "ngram"  # prompt lookup: copy the continuation of a matching n-gram (CPU)
    DRAFT = "draft"  # a separate small model
    EAGLE = "eagle"  # EAGLE-1/2 head: one layer on the target's last hidden state
    EAGLE3 = "eagle3"  # EAGLE-3 head: one layer on fused low/mid/high target features
    MTP = "mtp"  # the model's own multi-token-prediction (nextn) layers


_METHOD_ALIASES = {
    "promptlookup": SpecMethod.NGRAM,
    "draftmodel": SpecMethod.DRAFT,
    "eagle1": SpecMethod.EAGLE,
    "eagle2": SpecMethod.EAGLE,
    "nextn": SpecMethod.MTP,
}


@dataclass(frozen=True, kw_only=True)
class SpecConfig:
    """One speculative-decoding setting: method, draft tokens per step, draft model."""

    method: SpecMethod
    k: int  # draft tokens proposed per step (num_speculative_tokens); 0 for NONE
    draft_model: str | None = None  # catalog id, for DRAFT only

    def __post_init__(self) -> None:
        text = self.text()
        if self.method is SpecMethod.NONE:
            if self.k != 0:
                raise InputError("spec", text, "'none' takes no draft-token count")
        elif not 1 <= self.k <= MAX_K:
            raise InputError("spec", text, f"draft tokens k must be between 1 and {MAX_K}")
        if (self.method is SpecMethod.DRAFT) != bool(self.draft_model):
            why = ("a draft-model method needs the draft model: draft:<model id>:<k>"
                   if self.method is SpecMethod.DRAFT else "only the draft method takes a model")
            raise InputError("spec", text, why)

    def text(self) -> str:
        """The CLI spelling, the inverse of parse_spec."""
        if self.method is SpecMethod.NONE:
            return "none"
        model = f"{self.draft_model}:" if self.draft_model else ""
        return f"{self.method.value}:{model}{self.k}"


def _method(name: str) -> SpecMethod | None:
    key = re.sub(r"[\s_\-]+", "", name.lower())
    for method in SpecMethod:
        if method.value == key:
            return method
    return _METHOD_ALIASES.get(key)


def parse_spec(text: str, field: str = "spec") -> SpecConfig:
    """Parse "eagle3:3", "ngram:4", "none" or "draft:meta-llama/Llama-3.2-1B:4".

    Raises InputError(field) naming what is wrong: unknown method, k outside 1..16, a k given
    for none, a missing k or draft model.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(field, text, "empty; e.g. none, ngram:4, eagle3:3, draft:<model>:4")
    parts = [p.strip() for p in text.strip().split(":")]
    method = _method(parts[0])
    if method is None:
        valid = ", ".join(m.value for m in SpecMethod)
        raise InputError(field, text, f"unknown speculation method {parts[0]!r}; one of {valid}")
    if method is SpecMethod.NONE:
        if len(parts) > 1:
            raise InputError(field, text, "'none' takes no draft-token count")
        return SpecConfig(method=method, k=0)
    n_parts = 3 if method is SpecMethod.DRAFT else 2
    if method is SpecMethod.DRAFT and len(parts) == 2:
        what = "a model" if parts[1].isdigit() else "the draft-token count k"
        raise InputError(field, text, f"the draft method needs {what}: draft:<model id>:<k>")
    if len(parts) < n_parts or (method is not SpecMethod.DRAFT and len(parts) > n_parts):
        shape = "draft:<model id>:<k>" if method is SpecMethod.DRAFT else f"{method.value}:<k>"
        raise InputError(field, text, f"expected {shape}, k the draft tokens per step")
    try:
        k = int(parts[-1])
    except ValueError:
        why = f"draft tokens k must be an integer, got {parts[-1]!r}"
        raise InputError(field, text, why) from None
    if not 1 <= k <= MAX_K:
        raise InputError(field, text, f"draft tokens k must be between 1 and {MAX_K}")
    model = ":".join(parts[1:-1]) or None
    if method is SpecMethod.DRAFT and not model:
        raise InputError(field, text, "the draft method needs a model: draft:<model id>:<k>")
    try:
        return SpecConfig(method=method, k=k, draft_model=model)
    except InputError as e:
        raise InputError(field, text, e.why) from None


# ---- drafting cost ---------------------------------------------------------------------------


class DraftKind(enum.StrEnum):
    NONE = "none"  # nothing on the GPU
    LAYERS = "layers"  # `layers` decoder layers of the target's shape + lm_head, per draft token
    MODEL = "model"  # a whole draft model per draft token; perf/ prices it from its arch


@dataclass(frozen=True, kw_only=True)
class DraftCost:
    """What proposing one draft token costs, in units of the target model's layers."""

    kind: DraftKind
    layers: float  # target-shaped decoder layers per draft token (0 unless kind is LAYERS)
    lm_head_fraction: float = 1.0  # share of the target's lm_head the drafter runs per token
    note: str = ""


# Layer counts are parameter ratios worked out on Llama-3.1 8B and 70B (h = 4096 / 8192, GQA
# 8 KV heads, FFN 3.5h); they agree to 0.01 between the two sizes.
_DRAFT_COSTS: dict[SpecMethod, DraftCost] = {
    SpecMethod.NONE: DraftCost(kind=DraftKind.NONE, layers=0.0),
    SpecMethod.NGRAM: DraftCost(
        kind=DraftKind.NONE, layers=0.0, lm_head_fraction=0.0,
        note="prompt lookup matches n-grams on the CPU; no GPU work per draft token",
    ),
    SpecMethod.DRAFT: DraftCost(
        kind=DraftKind.MODEL, layers=0.0, lm_head_fraction=0.0,
        note="the draft model runs one decode step per draft token; priced from its own arch",
    ),
    SpecMethod.EAGLE: DraftCost(
        kind=DraftKind.LAYERS, layers=1.15,
        note="one decoder layer plus the fc fusing token embedding and hidden state "
        "(2h -> h, 0.15 of a layer), then the target's lm_head, per draft token",
    ),
    SpecMethod.EAGLE3: DraftCost(
        kind=DraftKind.LAYERS, layers=1.33, lm_head_fraction=0.25,
        note="one decoder layer whose q/k/v read 2h (embedding + fused features), plus the "
        "3h -> h feature-fusion GEMM over the target's hidden states: 1.33 layers; its lm_head "
        "covers a reduced draft vocabulary (32k of Llama-3's 128k in the published heads)",
    ),
    SpecMethod.MTP: DraftCost(
        kind=DraftKind.LAYERS, layers=1.15,
        note="one nextn layer (a full target layer, MoE included) plus its eh_proj (2h -> h), "
        "then the shared lm_head, per draft token; with one nextn layer and k > 1 the engine "
        "reuses it k times",
    ),
}


def draft_cost(method: SpecMethod) -> DraftCost:
    """What drafting costs for `method`, relative to the target model."""
    return _DRAFT_COSTS[method]


# ---- acceptance ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AcceptanceFit:
    """a(p) = a_lo + (a_hi - a_lo) * p, fitted to published acceptance lengths."""

    method: SpecMethod
    a_lo: float  # at predictability 0 (creative writing)
    a_hi: float  # at predictability 1 (rewriting, summaries)
    rows: int  # published rows the fit used
    rmse_tokens: float  # RMS error of the fitted tokens per step over those rows
    source: str


def _check_predictability(p: np.ndarray) -> None:
    if not np.all(np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise InputError("output_predictability", p.tolist(), "must be between 0 and 1")


def acceptance_rate(method: SpecMethod, output_predictability: ArrayLike) -> np.ndarray:
    """Per-token acceptance probability a in [0, 1) for `method` on a workload.

    `predictability` in [0, 1]: 0 creative writing, 0.5 chat, 1 code rewriting / summaries.
    NONE proposes nothing: a = 0.
    """
    p = np.asarray(output_predictability, dtype=np.float64)
    _check_predictability(p)
    if method is SpecMethod.NONE:
        return np.zeros_like(p)
    fit = acceptance_fit(method)
    return fit.a_lo + (fit.a_hi - fit.a_lo) * p


def expected_tokens_per_step(a: ArrayLike, k: int) -> np.ndarray:
    """Tokens a verify step yields with k drafts accepted independently with probability a.

    sum_{i=0..k} a**i = (1 - a**(k+1)) / (1 - a): the target's own token plus the accepted
    prefix of the drafts. Summed by Horner's rule, so a = 1 gives exactly k + 1 (no 0/0).
    """
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise InputError("k", k, "draft tokens must be a non-negative integer")
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any((a < 0.0) | (a > 1.0)):
        raise InputError("acceptance", a.tolist(), "must be between 0 and 1")
    total = np.ones_like(a)
    for _ in range(int(k)):
        total = 1.0 + a * total
    return total


def acceptance_from_tokens_per_step(tokens: ArrayLike, k: int) -> np.ndarray:
    """The a whose expected_tokens_per_step(a, k) equals `tokens` (in [1, k + 1]).

    The map is strictly increasing in a, so bisection converges; 60 halvings reach 1e-18.
    """
    tau = np.asarray(tokens, dtype=np.float64)
    if k < 1 or np.any((tau < 1.0) | (tau > k + 1.0)):
        raise InputError("tokens_per_step", tau.tolist(), f"must lie in [1, k + 1] with k={k} >= 1")
    lo, hi = np.zeros_like(tau), np.ones_like(tau)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = expected_tokens_per_step(mid, k) < tau
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def acceptance_fit(method: SpecMethod) -> AcceptanceFit:
    """The shipped fit for `method` (not NONE)."""
    fits = _fits()
    if method not in fits:
        raise InputError("spec", method.value, "no acceptance model: it proposes no drafts")
    return fits[method]


def load_raw() -> dict[str, Any]:
    """The parsed data/speculation.yaml, as shipped."""
    return read_yaml(__package__, "data", DATA_FILE)


@functools.cache
def _fits() -> dict[SpecMethod, AcceptanceFit]:
    out: dict[SpecMethod, AcceptanceFit] = {}
    for name, entry in load_raw()["methods"].items():
        method = SpecMethod(name)
        out[method] = AcceptanceFit(
            method=method,
            a_lo=float(entry["a_lo"]),
            a_hi=float(entry["a_hi"]),
            rows=int(entry["fit"]["rows_used"]),
            rmse_tokens=float(entry["fit"]["rmse_tokens_per_step"]),
            source=str(entry["source"]),
        )
    return out


@functools.cache
def _draft_heads() -> dict[str, dict[str, dict[str, str]]]:
    return read_yaml("trilemma.optimizer.catalog", "data", "draft_heads.yaml")


def draft_heads(method: str) -> dict[str, str]:
    """Target model id -> published head checkpoint, for `method` ("eagle" or "eagle3").

    From data/draft_heads.yaml, one citation per entry. EAGLE-style speculation needs a head
    trained for the exact target, so a target missing here cannot use it.
    """
    return {target: row["model"] for target, row in _draft_heads().get(method, {}).items()}


def draft_head(method: str, target: str) -> str | None:
    return draft_heads(method).get(target)
