"""JSON schema of the spec models, self-contained, as the CRD generator will need it.

Kubernetes wants an OpenAPI v3 *structural* schema: no `$ref`, a `type` on every node, no
`null` types. `spec_json_schema` inlines every `$ref`, drops the `null` branch pydantic adds
for optional fields (an absent key already means None), turns `const` into a one-value `enum`,
and with `openapi_v3=True` rewrites JSON Schema 2020's numeric `exclusiveMinimum` into
OpenAPI 3.0's boolean form.

Still to do in the CRD generator (not here, because it changes meaning, not just spelling):
- Discriminated unions (workload length distributions, arrivals) come out as `oneOf` of full
  object schemas plus a `discriminator`. Structural schemas forbid `type`/`properties` inside
  `oneOf`, so they must be flattened into one object holding every branch's properties, with
  the per-kind required keys moved to `x-kubernetes-validations` (CEL) rules.
- Cross-field rules (p50 <= p90 <= p99, lognormal p90 vs mean, trace vs lengths, pool vs
  bounds) live in validators, not in the schema: the operator must still run the pydantic
  model, or the generator must add CEL rules for the ones wanted at admission.
- `additionalProperties: false` is the default in structural schemas (pruning); the generator
  should drop it, and keep `x-kubernetes-preserve-unknown-fields` off.
- `title` keys are noise in a CRD and may be stripped.
"""

from __future__ import annotations

import copy
from typing import Any

import pydantic

from trilemma.optimizer.spec.plan_request import PlanRequest

_REF_PREFIX = "#/$defs/"


def spec_json_schema(model: type[pydantic.BaseModel] = PlanRequest, *,
                     openapi_v3: bool = False) -> dict[str, Any]:
    """The validation-mode JSON schema of `model`, camelCase keys, with no `$ref`/`$defs`."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    rewritten: dict[str, Any] = _rewrite(_inline(schema, defs, ()), openapi_v3=openapi_v3)
    return rewritten


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
        name = ref[len(_REF_PREFIX):]
        if name in seen:
            raise ValueError(f"recursive model {name} cannot be inlined into a CRD schema")
        target = copy.deepcopy(defs[name])
        # Sibling keys of a $ref (description, default) describe this use; keep them.
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _inline(target, defs, (*seen, name))
    out = {}
    for key, value in node.items():
        if key == "discriminator" and isinstance(value, dict):
            # The mapping points into $defs, which no longer exist; the propertyName stays.
            out[key] = {"propertyName": value["propertyName"]}
        else:
            out[key] = _inline(value, defs, seen)
    return out


def _rewrite(node: Any, *, openapi_v3: bool) -> Any:
    if isinstance(node, list):
        return [_rewrite(item, openapi_v3=openapi_v3) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _rewrite(v, openapi_v3=openapi_v3) for k, v in node.items()}
    branches = node.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) < len(branches):
            node.pop("anyOf")
            if node.get("default", ...) is None:
                node.pop("default")  # absent already means None
            if len(kept) == 1:
                node = {**kept[0], **node}
            else:
                node["anyOf"] = kept
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if openapi_v3:
        for bound in ("Minimum", "Maximum"):
            exclusive = node.get(f"exclusive{bound}")
            if isinstance(exclusive, (int, float)) and not isinstance(exclusive, bool):
                node[bound.lower()] = exclusive
                node[f"exclusive{bound}"] = True
    return node
