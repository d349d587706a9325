"""Serving-engine facts (vLLM, SGLang): defaults, memory reserves and per-step overheads.

Loaded from data/engine.yaml, where every figure carries its source; the figures marked
`fitted` are refit by `trilemma calibrate-engine` against measured end-to-end runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import numpy as np
import yaml

# Engine is re-exported: callers name an engine where they read its facts.
from trilemma.optimizer.catalog.engines import Engine as Engine
from trilemma.optimizer.catalog.gpus import Gpu

GIB = 1024**3
# A released version ("0.14.0", "0.5.8.post1"); nightlies and unnamed builds are not.
RELEASE_PATTERN = re.compile(r"^\d+(\.\d+)+((\.post|rc)\d+)*$")


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a release name: its numbers in order ("0.5.8.post1" -> (0, 5, 8, 1))."""
    return tuple(int(n) for n in re.findall(r"\d+", version))


@dataclass(frozen=True, kw_only=True)
class EngineFacts:
    """One engine's constants; units in the names."""

    engine: Engine
    gpu_memory_utilization: float
    block_size: int
    batched_tokens_large: int
    batched_tokens_small: int
    seqs_large: int
    seqs_small: int
    large_gpu_min_memory_gib: float          # where max_num_seqs turns large
    batched_tokens_min_memory_gib: float     # where the token budget turns large
    # (upper bound in MiB, exclusive; inf for the last, token budget): an engine whose default
    # budget steps through several memory tiers (SGLang); empty: the large/small rule above.
    batched_tokens_tiers: tuple[tuple[float, int], ...] = ()
    runtime_memory_bytes: float
    nccl_memory_bytes: Mapping[int, float]
    kernel_launch_us: float
    elementwise_kernels_per_layer: int
    step_overhead_ms: float
    request_overhead_ms: float
    # The part of a request's overhead that grows with its prompt (tokenization & co).
    request_overhead_per_prompt_token_us: float
    benchmark_requests_per_concurrency: float
    # True: prefill batches run alone, ahead of the decodes (SGLang); False: prefill chunks
    # ride in the decode steps under the token budget (vLLM's chunked prefill).
    prefill_first: bool
    # (version, image) of the release the fitted overheads were measured on; image None
    # where the rows name none.
    calibrated_release: tuple[str, str | None]
    # Hybrid (linear-attention) models: the engine's up-front split of the memory left after
    # weights between recurrent states and KV (state : KV); None where both share one pool.
    state_memory_ratio: float | None = None
    # Model architectures whose expert-parallel MoE the engine runs over DeepEP's all-to-all
    # under attention DP (SGLang --moe-a2a-backend deepep; perf/deepep.py); empty: never.
    deepep_architectures: tuple[str, ...] = ()
    # The first release that overlaps the step's CPU work with the GPU's previous step
    # (vLLM's async scheduling, default from 0.14.0); None where the model does not apply it.
    cpu_overlap_since: str | None = None
    # Whether these facts describe such a release: the calibrated one unless `for_release`.
    cpu_overlap: bool = False

    def for_release(self, version: str | None) -> EngineFacts:
        """These facts for a run on `version` (None, or a build with no release number such
        as a nightly: the calibrated release)."""
        if not version or not RELEASE_PATTERN.match(version) or self.cpu_overlap_since is None:
            return self
        overlap = version_key(version) >= version_key(self.cpu_overlap_since)
        return self if overlap == self.cpu_overlap else replace(self, cpu_overlap=overlap)

    def exposed_step_overhead_ms(self, gpu_ms: np.ndarray) -> np.ndarray:
        """The engine's per-step CPU time (scheduling, input preparation, output
        processing) that the step's wall time carries on top of `gpu_ms`, its GPU work.

        Synchronous scheduling runs it between GPU steps: all of it shows. Async scheduling
        (vLLM >= 0.14, vllm/v1/core/sched/async_scheduler.py) prepares step N+1 while step
        N runs, so a step lasts max(GPU, CPU): only the CPU time beyond the GPU's shows.
        """
        if self.cpu_overlap:
            return np.maximum(self.step_overhead_ms - gpu_ms, 0.0)
        return np.full(np.shape(gpu_ms), self.step_overhead_ms)

    @staticmethod
    def _is_large(gpu: Gpu, min_memory_gib: float) -> bool:
        # vLLM keys its larger defaults on >= 70 GiB of memory, except on A100 (PR #17885).
        return gpu.memory_bytes >= min_memory_gib * GIB and "a100" not in gpu.key

    def default_max_num_batched_tokens(self, gpu: Gpu) -> int:
        mib = gpu.memory_bytes / 2**20
        for bound, size in self.batched_tokens_tiers:
            if mib < bound:
                return size
        return (self.batched_tokens_large
                if self._is_large(gpu, self.batched_tokens_min_memory_gib)
                else self.batched_tokens_small)

    def default_max_num_seqs(self, gpu: Gpu) -> int:
        return (self.seqs_large if self._is_large(gpu, self.large_gpu_min_memory_gib)
                else self.seqs_small)

    def nccl_bytes(self, group_size: np.ndarray) -> np.ndarray:
        """NCCL buffer bytes per GPU for communicators of `group_size` GPUs (1: none)."""
        group = np.asarray(group_size)
        sizes = sorted(self.nccl_memory_bytes, reverse=True)
        # Sizes beyond the table take its largest entry; each smaller table entry then
        # overwrites the groups it covers.
        out = np.full(group.shape, self.nccl_memory_bytes[sizes[0]], dtype=np.float64)
        for size in sizes:
            out = np.where(group <= size, self.nccl_memory_bytes[size], out)
        return np.where(group <= 1, 0.0, out)


def _value(entry: float | Mapping[str, float]) -> float:
    # A fact is a bare number or {value: ..., source: ...}.
    return entry["value"] if isinstance(entry, Mapping) else entry


@cache
def engine_facts(engine: Engine = Engine.VLLM) -> EngineFacts:
    """The shipped facts for `engine`; SGLang reuses vLLM's where it has none of its own."""
    text = resources.files("trilemma.optimizer.perf").joinpath("data/engine.yaml").read_text()
    doc = yaml.safe_load(text)
    raw = {**doc["vllm"], **doc.get(engine.value, {})}
    tokens, vllm_tokens = raw["max_num_batched_tokens"], doc["vllm"]["max_num_batched_tokens"]
    nccl = {int(k): float(v) for k, v in raw["nccl_memory_bytes"].items() if k != "source"}
    calibrated = str(raw["calibrated_release"]["version"])
    since = _value(raw["cpu_overlap_since"])
    return EngineFacts(
        engine=engine,
        gpu_memory_utilization=float(_value(raw["gpu_memory_utilization"])),
        block_size=int(_value(raw["block_size"])),
        # An engine with memory tiers (SGLang) still carries vLLM's pair, never consulted.
        batched_tokens_large=int({**vllm_tokens, **tokens}["large_gpu"]),
        batched_tokens_small=int({**vllm_tokens, **tokens}["small_gpu"]),
        batched_tokens_tiers=tuple(
            (math.inf if bound is None else float(bound), int(size))
            for bound, size in tokens.get("tiers_by_gpu_memory_mib", ())),
        seqs_large=int(raw["max_num_seqs"]["large_gpu"]),
        seqs_small=int(raw["max_num_seqs"]["small_gpu"]),
        # max_num_seqs keys on vLLM's memory threshold unless the engine gives its own.
        large_gpu_min_memory_gib=float(raw["max_num_seqs"].get(
            "large_gpu_min_memory_gib",
            doc["vllm"]["max_num_batched_tokens"]["large_gpu_min_memory_gib"])),
        batched_tokens_min_memory_gib=float(
            {**vllm_tokens, **tokens}["large_gpu_min_memory_gib"]),
        runtime_memory_bytes=float(_value(raw["runtime_memory_bytes"])),
        nccl_memory_bytes=nccl,
        kernel_launch_us=float(_value(raw["kernel_launch_us"])),
        elementwise_kernels_per_layer=int(_value(raw["elementwise_kernels_per_layer"])),
        step_overhead_ms=float(_value(raw["step_overhead_ms"])),
        request_overhead_ms=float(_value(raw["request_overhead_ms"])),
        request_overhead_per_prompt_token_us=float(
            _value(raw["request_overhead_per_prompt_token_us"])),
        benchmark_requests_per_concurrency=float(
            _value(raw["benchmark_requests_per_concurrency"])),
        prefill_first=bool(_value(raw["prefill_first"])),
        calibrated_release=(calibrated, raw["calibrated_release"]["image"]),
        cpu_overlap_since=None if since is None else str(since),
        cpu_overlap=since is not None and version_key(calibrated) >= version_key(str(since)),
        state_memory_ratio=(None if raw.get("state_memory_ratio") is None
                            else float(_value(raw["state_memory_ratio"]))),
        deepep_architectures=tuple(
            str(a) for a in raw.get("deepep_architectures", {}).get("value", ())),
    )
