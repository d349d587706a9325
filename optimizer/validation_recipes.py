"""Model a measured row as its benchmark launched the engine (data/benchmark_recipes.yaml).

A validation row records the layout, lengths and load of a run, not the engine's flags. The
benchmark that measured it may have launched the engine far from its defaults: InferenceX's
B200 SGLang scripts store the KV cache in fp8, give the static pool 0.80-0.95 of memory, cap
the running batch at 32-256 and chunk prefills at 8k-128k tokens. Modelled with the
defaults, a DeepSeek fp8 TP4 8k-prompt run holds one sequence in KV where the script's fp8
cache and 0.95 memory fraction hold the whole load.

Where a row's provenance (engine, GPU, model, precision, image, measured time) maps to exactly
one launch script, its flags become the deployment's settings: the KV dtype of the Config,
the token budget and running-sequence cap the closed loop takes, and the engine facts' memory
fraction, as the optimizer sets them for a deployment it plans. Anything less certain keeps
the defaults. The benchmark client's length sampling is the client's (validation_sim.BenchClient).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import yaml

from trilemma.optimizer.catalog.quantization import KvDtype
from trilemma.optimizer.perf.engine import EngineFacts
from trilemma.optimizer.validation_layout import run_key

_MEASURED = re.compile(r"measured=(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d+))?Z")
_IMAGE = re.compile(r"(?:image=)?((?:lmsysorg/sglang|vllm/vllm-openai)[:@][^\s;]+)")


@dataclass(frozen=True, kw_only=True)
class LaunchRecipe:
    """The engine flags one row's benchmark script launched with, and where they are written."""

    name: str
    source: str                      # repo/path@commit
    kv: KvDtype | None               # None: no --kv-cache-dtype, the engine's default
    chunked_prefill_size: int | None
    mem_fraction_static: float | None
    max_running_requests: int | None
    cuda_graph_max_bs: int | None
    block_size: int | None             # vLLM --block-size (KV page, tokens)
    # Speculative decoding in trilemma's spec syntax ("mtp:3"), "none" where the script runs
    # none: SGLang's --speculative-algorithm EAGLE on a model's own MTP layers is "mtp".
    speculative: str

    def facts(self, base: EngineFacts) -> EngineFacts:
        """The engine's facts with the script's memory fraction and KV page size."""
        out = base
        if self.mem_fraction_static is not None:
            out = dataclasses.replace(out, gpu_memory_utilization=self.mem_fraction_static)
        if self.block_size is not None:
            out = dataclasses.replace(out, block_size=self.block_size)
        return out

    def key(self) -> tuple[object, ...]:
        """What separates two recipes' predictions (rows sharing it share a batch)."""
        return (self.kv, self.chunked_prefill_size, self.mem_fraction_static,
                self.max_running_requests, self.block_size, self.speculative)

    def note(self) -> str:
        """The flags in SGLang's spelling (vLLM's: --max-num-batched-tokens,
        --gpu-memory-utilization, --max-num-seqs, --max-cudagraph-capture-size)."""
        parts = [f"--kv-cache-dtype {'fp8_e4m3' if self.kv is KvDtype.FP8 else 'auto'}"]
        for flag, value in (("--chunked-prefill-size", self.chunked_prefill_size),
                            ("--mem-fraction-static", self.mem_fraction_static),
                            ("--max-running-requests", self.max_running_requests),
                            ("--cuda-graph-max-bs", self.cuda_graph_max_bs),
                            ("--block-size", self.block_size)):
            if value is not None:
                parts.append(f"{flag} {value:g}")
        if self.speculative != "none":
            parts.append(f"speculative {self.speculative}")
        return f"launch flags of {self.name} ({self.source}): {' '.join(parts)}"


@dataclass(frozen=True, kw_only=True)
class _Entry:
    name: str
    engine: str
    system: str
    models: frozenset[str]
    precision: str
    images: frozenset[str]
    start: datetime
    until: datetime
    source: str
    branches: tuple[Mapping[str, Any], ...]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@cache
def _recipes() -> tuple[str, tuple[_Entry, ...]]:
    text = resources.files("trilemma.optimizer").joinpath(
        "data/benchmark_recipes.yaml").read_text()
    doc = yaml.safe_load(text)
    repo = doc["repository"]
    entries = tuple(
        _Entry(name=e["name"], engine=e["engine"], system=e["system"],
               models=frozenset(e["models"]), precision=e["precision"],
               images=frozenset(e["images"]), start=_time(e["from"]), until=_time(e["until"]),
               source=f"{repo}/{e['script']}@{e['commit'][:12]}",
               branches=tuple(e["flags"]))
        for e in doc["recipes"])
    return repo, entries


def _measured(source: str) -> tuple[datetime, datetime] | None:
    """The span the row's measured time allows: one instant, or a whole day for a date."""
    m = _MEASURED.search(source)
    if m is None:
        return None
    at = _time(f"{m.group(1)}T{m.group(2)}Z")
    if m.group(2) == "00:00:00" and not (m.group(3) or "").strip("0"):
        return at, at + timedelta(days=1)  # a date only: any time that day
    return at, at


def _value(raw: object, conc: int, isl: int) -> int | None:
    """A flag's value: a number, or what the script computes it from ("conc": the run's
    concurrency; "2*isl": twice the nominal prompt length)."""
    if raw is None:
        return None
    if raw == "conc":
        return conc
    if raw == "2*isl":
        return 2 * isl
    return int(str(raw))


def _resolve(entry: _Entry, gpus: int, conc: int, isl: int
             ) -> LaunchRecipe | None:
    for branch in entry.branches:
        when = branch.get("when") or {}
        if "tp" in when and int(when["tp"]) != gpus:
            continue
        mem = branch.get("mem_fraction_static")
        return LaunchRecipe(
            name=entry.name, source=entry.source,
            kv=None if branch["kv_cache_dtype"] == "auto" else KvDtype(branch["kv_cache_dtype"]),
            chunked_prefill_size=_value(branch.get("chunked_prefill_size"), conc, isl),
            mem_fraction_static=None if mem is None else float(mem),
            max_running_requests=_value(branch.get("max_running_requests"), conc, isl),
            cuda_graph_max_bs=_value(branch.get("cuda_graph_max_bs"), conc, isl),
            block_size=_value(branch.get("block_size"), conc, isl),
            speculative=str(branch.get("speculative", "none")))
    return None  # the script has no branch for this layout: it did not launch this row


def recipe(row: Mapping[str, str], *, gpus: int, conc: int) -> LaunchRecipe | None:
    """The launch recipe the row's provenance maps to unambiguously, or None.

    `gpus` is the run's GPU count (SGLang's --tp), `conc` its closed-loop concurrency."""
    source = row.get("silicon_data_source") or ""
    span = _measured(source)
    if span is None:
        return None
    image_match = _IMAGE.search(source)
    image = image_match.group(1) if image_match else None
    _, entries = _recipes()
    try:
        isl = int(float(row.get("isl") or 0))
    except ValueError:
        return None
    found: dict[tuple[object, ...], LaunchRecipe] = {}
    for e in entries:
        if (e.engine != (row.get("backend") or "").strip().lower()
                or e.system != (row.get("system") or "").strip()
                or (row.get("model_path") or "").strip() not in e.models
                or e.precision != (row.get("precision") or "").strip().lower()
                or (image is not None and image not in e.images)):
            continue
        start, end = span
        if start == end and not (e.start <= start < e.until):
            continue
        if start != end and not (e.start < end and start < e.until):
            continue
        got = _resolve(e, gpus, conc, isl)
        if got is None:
            return None  # a script that could have run the row has no branch for it
        # Two windows of one script with the same flags are the same launch: one recipe.
        found.setdefault((*got.key(), got.cuda_graph_max_bs), got)
    if len(found) != 1:
        return None
    return next(iter(found.values()))


def recipes_for(rows: Sequence[Mapping[str, str]], gpus: Sequence[int], concs: Sequence[int]
                ) -> list[LaunchRecipe | None]:
    """`recipe` for every row; a row without one whose measurement is byte-identical to a
    mapped row's (the same run, copied under another source) takes that row's recipe."""
    out = [recipe(r, gpus=g, conc=c) for r, g, c in zip(rows, gpus, concs, strict=True)]
    mapped: dict[tuple[str, ...], dict[tuple[object, ...], LaunchRecipe]] = {}
    for row, found in zip(rows, out, strict=True):
        if found is not None:
            mapped.setdefault(run_key(row), {}).setdefault(
                (*found.key(), found.cuda_graph_max_bs), found)
    for i, row in enumerate(rows):
        same = mapped.get(run_key(row)) if out[i] is None else None
        if same is not None and len(same) == 1:
            out[i] = next(iter(same.values()))
    return out
