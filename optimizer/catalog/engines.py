"""The serving engines trilemma can configure: a closed set shared by every layer."""

from __future__ import annotations

import enum


class Engine(enum.Enum):
    """An inference server whose flags trilemma renders: vLLM first, SGLang second."""

    VLLM = "vllm"
    SGLANG = "sglang"
