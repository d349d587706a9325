"""The serving engines trilemma can configure: a closed set shared by every layer."""

from __future__ import annotations

import enum


# A StrEnum, like the catalog's other closed sets a plan stores (QuantRecipe, KvDtype,
# SpecMethod): a member formats and compares as its wire spelling, so typed plans print and
# serialise exactly as the plain strings they replaced did. (The docstring is the CRD's
# description of the field.)
class Engine(enum.StrEnum):
    """An inference server whose flags trilemma renders: vLLM first, SGLang second."""

    VLLM = "vllm"
    SGLANG = "sglang"
