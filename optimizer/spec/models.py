"""Model choice: the candidate models and the quality each keeps after quantization.

A candidate is a catalog id (or a local config.json) with an optional published score. Without
one, the bundled table data/model_quality.yaml (MMLU-Pro, every score cited) supplies it. The
search compares `quality(model_id, recipe)` - base score plus the recipe's published accuracy
delta for the model's family (catalog/quantization.py) - with the SLO's quality floor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from trilemma.optimizer.catalog import models as catalog_models
from trilemma.optimizer.catalog import quantization
from trilemma.optimizer.catalog.data_files import read_yaml
from trilemma.optimizer.catalog.quantization import QuantRecipe
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec.base import SpecModel, rule_error

QUALITY_FILE = "model_quality.yaml"
DEFAULT_BENCHMARK = "MMLU-Pro"


class QualityScore(SpecModel):
    """A published benchmark score of a model at its released precision, with its citation."""

    score: float = Field(ge=0, le=100, description="Benchmark score, points 0-100.")
    source: str = Field(
        min_length=1, description="Where the score is published: paper, model card, URL.")
    benchmark: str = Field(
        default=DEFAULT_BENCHMARK, min_length=1,
        description="Benchmark name; candidates compared against a quality floor must share it.")


class ModelChoice(SpecModel):
    """One candidate model."""

    id: str = Field(
        min_length=1,
        description="Bundled model id (e.g. deepseek-ai/DeepSeek-V3) or a config.json path, "
                    "relative to the spec file.")
    quality: QualityScore | None = Field(
        default=None, description="Published score; default: the bundled table's.")

    @field_validator("id")
    @classmethod
    def _known_model(cls, model_id: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        local = Path(base) / model_id if base is not None else None
        if local is not None and not Path(model_id).is_absolute() and local.exists():
            model_id = str(local.resolve())  # a config.json beside the spec file
        try:
            catalog_models.load_model(model_id)
        except InputError as err:
            raise rule_error(err.why) from None
        return model_id

    @property
    def arch(self) -> catalog_models.ModelArch:
        return catalog_models.load_model(self.id)

    def base_quality(self) -> QualityScore:
        """The spec's score, else the bundled table's; InputError if neither exists."""
        return self.quality if self.quality is not None else base_quality(self.id)

    def quality_at(self, recipe: QuantRecipe) -> float:
        """Expected score when served with `recipe`: base score plus its quantization delta."""
        return quality(self.id, recipe, base=self.quality)


def base_quality(model_id: str) -> QualityScore:
    """The bundled table's score of a model (an id or alias load_model accepts).

    Raises InputError(field="quality") saying to give `quality: {score, source}` when the
    model has no published score in the table.
    """
    canonical = catalog_models.load_model(model_id).id
    found = quality_table().get(canonical)
    if found is None:
        why = quality_omission(canonical) or "not a bundled model"
        raise InputError("quality", model_id,
                         f"no bundled {DEFAULT_BENCHMARK} score ({why}); give "
                         "quality: {score, source} in the spec")
    return found


def quality(model_id: str, recipe: QuantRecipe, *, base: QualityScore | None = None) -> float:
    """Benchmark points of `model_id` served with `recipe`.

    `base` (the spec's score) wins over the bundled table. The delta is the catalog's
    published accuracy change for the model's family: 0 for bf16 and for the format a model
    was released in, the recipe's cross-family median where a family has no rows.
    """
    score = base if base is not None else base_quality(model_id)
    family = catalog_models.load_model(model_id).family
    return score.score + quantization.quality_delta(recipe, family).points


def quality_table() -> Mapping[str, QualityScore]:
    """Every bundled score by canonical model id, `same_as` entries resolved."""
    return _table()[0]


def quality_omission(model_id: str) -> str | None:
    """Why a bundled model has no score in the table, or None if it has one or is unknown."""
    return _table()[1].get(model_id)


def load_quality_raw() -> dict[str, Any]:
    """data/model_quality.yaml as shipped (tests check its citations and coverage)."""
    return read_yaml(__package__, "data", QUALITY_FILE)


@functools.cache
def _table() -> tuple[dict[str, QualityScore], dict[str, str]]:
    raw = load_quality_raw()
    entries: dict[str, Any] = raw["models"]
    benchmark = str(raw["benchmark"])
    scores: dict[str, QualityScore] = {}
    for model_id, entry in entries.items():
        # One hop only: a same_as target is a scored entry, never another alias.
        target = entries[entry["same_as"]] if "same_as" in entry else entry
        source = f"{target['source']} ({target['checkpoint']}, {target['mode']})"
        scores[model_id] = QualityScore(score=float(target["score"]), source=source,
                                        benchmark=benchmark)
    omitted = {str(k): str(v) for k, v in raw.get("omitted", {}).items()}
    return scores, omitted
