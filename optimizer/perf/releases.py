"""The engine release the performance model was calibrated on, and the image that runs it.

A deployment on another release runs other kernels and another scheduler than the ones the
plan's latencies were fitted to, so the renderer's default image pins the calibrated release
(never `:latest`, which moves under a plan, nor an older tag).

- vLLM: the kernel times come from AIConfigurator's tables, measured on one vLLM release per
  GPU (calibration.json records it, `fitting.py` writes it). The image pins the release most
  calibrated GPUs were measured on, the newer on a tie: one image serves every GPU, and a GPU
  measured on an older release (A100) runs the newer one. vLLM tags its release images
  `v<version>` (vllm/vllm-openai:v0.19.0).
- SGLang has no kernel tables of its own (it reuses vLLM's); its own figures are the engine
  overheads fitted to measured SGLang runs, whose release and image engine.yaml records
  (`calibrated_release`, written by `trilemma calibrate-engine`).
"""

from __future__ import annotations

from collections import Counter

from trilemma.optimizer.perf.engine import Engine, engine_facts
from trilemma.optimizer.perf.engine import version_key as version_key
from trilemma.optimizer.perf.kernels import calibration

VLLM_REPOSITORY = "vllm/vllm-openai"


def kernel_versions() -> dict[str, tuple[str, ...]]:
    """Per calibrated GPU, the vLLM releases its kernel tables were measured on."""
    return {gpu: tuple(entry["engine_versions"])
            for gpu, entry in sorted(calibration()["gpus"].items())}


def calibrated_version(engine: Engine) -> str:
    """The release of `engine` the shipped calibration describes."""
    if engine is Engine.VLLM:
        counts = Counter(v for versions in kernel_versions().values() for v in versions)
        return max(counts, key=lambda v: (counts[v], version_key(v)))
    return engine_facts(engine).calibrated_release[0]


def calibrated_image(engine: Engine) -> str:
    """The container image of the calibrated release: what the renderer deploys by default."""
    if engine is Engine.VLLM:
        return f"{VLLM_REPOSITORY}:v{calibrated_version(engine)}"
    version, image = engine_facts(engine).calibrated_release
    if image is None:
        raise ValueError(f"engine.yaml names no image for {engine.value} {version}: "
                         "rerun `trilemma calibrate-engine` on rows that name theirs")
    return image
