"""The strict pydantic base every spec model derives from, and the error every rule raises.

Specs are the optimizer's edge: YAML/JSON files for `trilemma optimize` today, Kubernetes
custom resources later (the same models generate the CRD schemas). So every model forbids
unknown keys, is frozen, speaks camelCase on the wire and snake_case in Python, and keeps its
types JSON-schema friendly: numbers with bounds, enums, lists, string maps, nested models.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# The error type of every cross-field rule: loading.describe() reads `field` and `value` from
# its context to name the exact key (relative to the model that raised) and the bad value.
RULE_ERROR = "spec_rule"


class SpecModel(BaseModel):
    """Base of every spec model: unknown keys rejected, immutable, camelCase aliases."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        # Enums stay enums in Python (a QuantRecipe knows its facts); JSON/YAML carry values.
        use_enum_values=False,
        validate_default=True,
    )


def rule_error(why: str, *, field: str | None = None, value: object = None) -> PydanticCustomError:
    """An error for a broken rule. `field` is the camelCase key, relative to the model whose
    validator raises (dotted for nested keys), when the rule is about one key of several."""
    context: dict[str, object] = {"why": why}
    if field is not None:
        context["field"] = field
        context["value"] = value
    return PydanticCustomError(RULE_ERROR, "{why}", context)


def require_generator(rng: object) -> np.random.Generator:
    """`rng` itself, if it is a numpy Generator: samplers take one explicitly so that a seed
    fixes every draw (a legacy RandomState or the global np.random would break that)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng
