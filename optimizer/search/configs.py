"""What a plan deploys: serving configurations, their predictions, and the plan itself.

The search produces these; the renderer turns them into engine arguments and manifests; the
operator stores them in status. Plain frozen data with a canonical JSON form, so that the same
plan always serialises, hashes and renders byte-identically (GitOps).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe, parse_recipe
from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import decoding

# Field metadata: a field added after plans were stored, omitted from `_plain` while it holds
# its default, so that older configurations keep their canonical JSON and hash.
OMIT_AT_DEFAULT = "omit_at_default"


class Mode(enum.Enum):
    AGGREGATED = "aggregated"        # every replica prefills and decodes
    DISAGGREGATED = "disaggregated"  # prefill workers hand KV to decode workers


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """One engine instance: what `vllm serve` / `sglang.launch_server` is started with."""

    gpu: str                          # catalog key, e.g. "h100_sxm"
    tp: int = 1
    pp: int = 1
    dp: int = 1                       # attention data parallel ranks (MoE models)
    ep: bool = False                  # expert parallel MoE layers
    quant: QuantRecipe = QuantRecipe.BF16
    kv_dtype: KvDtype = KvDtype.BF16
    spec_method: SpecMethod = SpecMethod.NONE
    spec_k: int = 0                   # draft tokens per step
    draft_model: str | None = None    # for spec_method == "draft"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # context limit to deploy with; None: the model's own
    # Decode context parallel ranks: the KV cache sharded token-wise over cp of the tp ranks
    # (no extra GPUs; perf/context_parallel.py). Left out of the JSON form at 1, so that the
    # plans, hashes and Deployment names of every configuration without it stay as they were.
    cp: int = field(default=1, metadata={OMIT_AT_DEFAULT: True})

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def summary(self) -> str:
        """Short human form, e.g. "fp8 TP2 eagle3x3"."""
        parts = [self.quant.value, f"TP{self.tp}"]
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        if self.dp > 1:
            parts.append(f"DP{self.dp}")
        if self.ep:
            parts.append("EP")
        if self.cp > 1:
            parts.append(f"DCP{self.cp}")
        if self.kv_dtype is not KvDtype.BF16:
            parts.append(f"kv-{self.kv_dtype}")
        if self.spec_method is not SpecMethod.NONE:
            parts.append(f"{self.spec_method}x{self.spec_k}")
        return " ".join(parts)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> WorkerConfig:
        """The inverse of to_dict's worker part: the closed sets back to their enums. A quant
        reads like user text (aliases such as "awq", any case), as the renderer always took it."""
        def quant(d: Any, at: str) -> QuantRecipe:
            try:
                return parse_recipe(d)
            except (InputError, ValueError, AttributeError) as err:
                raise decoding.MalformedPlan(at, d, str(err)) from None

        return decoding.record(cls, data, where, quant=quant)


@dataclass(frozen=True, kw_only=True)
class Part:
    """Replicas of an aggregated worker on another GPU type, beside the configuration's own.

    `weight` is what one of its replicas carries within the SLO relative to one replica of
    the configuration's `worker`: traffic splits over the types in proportion to replicas x
    weight, i.e. to each type's capacity at the SLO (mixing.py says why that split)."""

    worker: WorkerConfig
    replicas: int = 1
    weight: float = 1.0

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Part:
        return decoding.record(cls, data, where,
                               worker=lambda d, at: WorkerConfig.from_dict(d, at))


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """A whole deployment of one model: replicas of a worker, or prefill + decode pools;
    an aggregated one may add replicas on other GPU types (`mixed`)."""

    model: str                        # catalog id or config.json path
    engine: Engine = Engine.VLLM
    mode: Mode = Mode.AGGREGATED
    worker: WorkerConfig              # aggregated replica, or the decode worker
    replicas: int = 1                 # of `worker`
    prefill: WorkerConfig | None = None
    prefill_replicas: int = 0
    # Aggregated replicas on other GPU types (a mixed plan), one Part per type. Left out of
    # the JSON form when empty, so every single-type configuration keeps its hash.
    mixed: tuple[Part, ...] = field(default=(), metadata={OMIT_AT_DEFAULT: True})

    def __post_init__(self) -> None:
        if self.mixed and self.mode is not Mode.AGGREGATED:
            raise ValueError("a mixed configuration is aggregated")

    @property
    def gpus(self) -> int:
        extra = self.prefill.gpus * self.prefill_replicas if self.prefill else 0
        return self.worker.gpus * self.replicas + extra + sum(
            p.worker.gpus * p.replicas for p in self.mixed)

    def gpus_by_type(self) -> dict[str, int]:
        """GPUs the configuration holds, by catalog key (what a pool's accounting counts)."""
        out: dict[str, int] = {}
        workers = [(p.worker, p.replicas) for p in self.parts()]
        if self.prefill is not None:
            workers.append((self.prefill, self.prefill_replicas))
        for w, n in workers:
            out[w.gpu] = out.get(w.gpu, 0) + w.gpus * n
        return out

    def parts(self) -> tuple[Part, ...]:
        """Every type's replicas, the configuration's own worker first (weight 1)."""
        return (Part(worker=self.worker, replicas=self.replicas), *self.mixed)

    def shares(self) -> tuple[float, ...]:
        """The traffic share of each of `parts()`: replicas x weight, normalised."""
        loads = [p.replicas * p.weight for p in self.parts()]
        total = sum(loads)
        return tuple(x / total if total > 0 else 0.0 for x in loads)

    def summary(self) -> str:
        if self.mode is Mode.DISAGGREGATED and self.prefill is not None:
            where = (self.worker.gpu if self.prefill.gpu == self.worker.gpu
                     else f"{self.prefill.gpu} -> {self.worker.gpu}")
            return (f"{self.prefill_replicas}x prefill[{self.prefill.summary()}] + "
                    f"{self.replicas}x decode[{self.worker.summary()}] on {where}")
        return " + ".join(f"{p.replicas}x [{p.worker.summary()}] on {p.worker.gpu}"
                          for p in self.parts())

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(self)
        return plain

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> ServingConfig:
        """The inverse of `to_dict`; decoding.MalformedPlan naming the field that breaks."""
        def worker(d: Any, at: str) -> WorkerConfig:
            return WorkerConfig.from_dict(d, at)

        def prefill(d: Any, at: str) -> WorkerConfig | None:
            return None if d is None else worker(d, at)

        def mixed(d: Any, at: str) -> tuple[Part, ...]:
            return tuple(decoding.items(d, at, Part.from_dict))

        try:
            return decoding.record(cls, data, where, worker=worker, prefill=prefill,
                                   mixed=mixed)
        except ValueError as err:
            if isinstance(err, decoding.MalformedPlan):
                raise
            raise decoding.MalformedPlan(f"{where}.mixed" if where else "mixed",
                                         None, str(err)) from None

    def config_hash(self) -> str:
        """First 8 hex digits of the SHA-256 of the canonical JSON: names a configuration."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()[:8]

    def layout_hash(self) -> str:
        """config_hash of everything but the replica counts: names Deployments, so that a
        replica-only change scales the running Deployment instead of rolling out a new one."""
        one = dataclasses.replace(self, replicas=1,
                                  prefill_replicas=min(self.prefill_replicas, 1),
                                  mixed=tuple(dataclasses.replace(p, replicas=1)
                                              for p in self.mixed))
        return one.config_hash()


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What a configuration is predicted to do under the plan's workload."""

    ttft_p50_ms: float
    ttft_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    e2e_p99_ms: float
    capacity_rps: float               # requests/s the whole deployment sustains within the SLO
    cost_per_hour: float              # $ for all its GPUs
    cost_per_mtok: float              # $ per million output tokens at the design rate
    quality: float | None             # benchmark score after the quantization delta
    simulated: bool = False           # confirmed by the discrete-event simulator
    provenance: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(self)
        return plain

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Prediction:
        return decoding.record(cls, data, where)


@dataclass(frozen=True, kw_only=True)
class Choice:
    config: ServingConfig
    prediction: Prediction

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "prediction": self.prediction.to_dict(),
                "summary": self.config.summary(), "hash": self.config.config_hash()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Choice:
        """The inverse of `to_dict`. Its `hash` must be the decoded configuration's: one that
        differs was written by another format (or edited), and would name other children."""
        choice = decoding.record(cls, data, where, derived=("summary", "hash"),
                                 config=ServingConfig.from_dict, prediction=Prediction.from_dict)
        stored = decoding.obj(data, where).get("hash")
        if stored is not None and stored != choice.config.config_hash():
            raise decoding.MalformedPlan(f"{where}.hash" if where else "hash", stored,
                                         f"not the configuration's hash "
                                         f"({choice.config.config_hash()})")
        return choice


def _plain(obj: Any) -> Any:
    """Dataclasses and enums -> JSON-ready dicts, field order kept."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)
                if not (f.metadata.get(OMIT_AT_DEFAULT) and getattr(obj, f.name) == f.default)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def canonical_json(data: Any) -> str:
    """Sorted keys, no whitespace variance: the same input always gives the same bytes."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

