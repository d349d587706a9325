"""Catalogs: the facts the performance model reads. Models, GPUs, quantization, speculation.

Everything here is data parsed from files (Hugging Face config.json, cited YAML), never tuned
code. Bottom layer of the optimizer: imports nothing else from trilemma but its errors.
The names below are the supported API; tests/unit/test_packaging.py pins the list.
"""

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.gpus import Gpu, all_gpus, get_gpu
from trilemma.optimizer.catalog.models import ModelArch, bundled_id, bundled_models, load_model
from trilemma.optimizer.catalog.quantization import (
    KvDtype,
    QuantRecipe,
    parse_recipe,
    quality_delta,
)
from trilemma.optimizer.catalog.speculation import (
    SpecConfig,
    SpecMethod,
    acceptance_rate,
    expected_tokens_per_step,
    parse_spec,
)

__all__ = [
    "Engine",
    "Gpu",
    "KvDtype",
    "ModelArch",
    "QuantRecipe",
    "SpecConfig",
    "SpecMethod",
    "acceptance_rate",
    "all_gpus",
    "bundled_id",
    "bundled_models",
    "expected_tokens_per_step",
    "get_gpu",
    "load_model",
    "parse_recipe",
    "parse_spec",
    "quality_delta",
]
