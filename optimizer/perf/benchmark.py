"""How fast the vectorized model scores candidates (`trilemma bench`).

Scores a batch of candidate configurations through the same path the search uses: one
StepModel per (model, GPU, quantization, KV dtype) group, arrays over layouts, engine limits
and workloads inside it. Prints candidates per second; numpy's element-wise kernels run on one
core, so this is a one-core figure.
"""

from __future__ import annotations

import itertools
import time
from typing import TypedDict

import numpy as np

from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf import latency, parallelism
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.perf.steps import StepModel

_GROUPS = (
    ("meta-llama/Llama-3.1-70B", "h100_sxm", QuantRecipe.FP8, KvDtype.FP8),
    ("meta-llama/Llama-3.1-70B", "h200_sxm", QuantRecipe.BF16, KvDtype.BF16),
    ("meta-llama/Llama-3.1-8B", "l40s", QuantRecipe.FP8, KvDtype.BF16),
    ("Qwen/Qwen3-30B-A3B", "b200_sxm", QuantRecipe.NVFP4, KvDtype.FP8),
    ("deepseek-ai/DeepSeek-V3", "h200_sxm", QuantRecipe.FP8, KvDtype.BF16),
)


class _Grid(TypedDict):
    """closed_loop's keyword arguments for a batch of candidates."""

    tp: np.ndarray
    pp: np.ndarray
    dp: np.ndarray
    ep: np.ndarray
    concurrency: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    max_num_seqs: np.ndarray
    max_batched_tokens: np.ndarray


def _grid(arch: models.ModelArch, n: int, rng: np.random.Generator) -> _Grid:
    """`n` candidates: feasible layouts x engine limits x workloads, sampled reproducibly."""
    layouts = [(tp, pp, dp, ep) for tp, pp, dp, ep in itertools.product(
        (1, 2, 4, 8), (1, 2), (1, 2, 4), (False, True))]
    lay = np.array(layouts, dtype=np.int64)
    ok = parallelism.feasible(arch, lay[:, 0], lay[:, 1], lay[:, 2], lay[:, 3].astype(bool))
    lay = lay[ok]
    pick = rng.integers(0, len(lay), n)
    return {
        "tp": lay[pick, 0], "pp": lay[pick, 1], "dp": lay[pick, 2],
        "ep": lay[pick, 3].astype(bool),
        "concurrency": rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256], n),
        "prompt_tokens": rng.choice([256, 1024, 2500, 5000, 8192, 32768], n),
        "output_tokens": rng.choice([64, 256, 500, 1024, 1500], n),
        "max_num_seqs": rng.choice([64, 128, 256, 512, 1024], n),
        "max_batched_tokens": rng.choice([2048, 4096, 8192, 16384], n),
    }


def run(*, candidates: int = 100_000, repeat: int = 3, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    facts = engine_facts()
    per_group = candidates // len(_GROUPS)
    work = []
    for model_id, gpu_key, recipe, kv in _GROUPS:
        arch = models.load_model(model_id)
        sm = StepModel(arch, gpus.get_gpu(gpu_key), recipe, kv, facts)
        work.append((sm, _grid(arch, per_group, rng)))
    total = per_group * len(work)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for sm, g in work:
            latency.closed_loop(sm, **g)
        best = min(best, time.perf_counter() - start)
    return (f"scored {total} candidates in {len(work)} groups: best of {repeat} = "
            f"{best:.3f} s -> {total / best:,.0f} candidates/s (one core)")
