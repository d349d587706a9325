"""Reading spec files, and turning pydantic's errors into messages a user can act on.

`load_spec(path)` is the CLI's entry: YAML or JSON in, a validated PlanRequest out, or one
SpecError (an InputError) listing every problem as `path.to.key = value: rule`, with the keys
spelled as the user wrote them (camelCase or snake_case).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec.arrivals import ARRIVAL_KINDS
from trilemma.optimizer.spec.base import RULE_ERROR
from trilemma.optimizer.spec.lengths import LENGTH_KINDS
from trilemma.optimizer.spec.plan_request import PlanRequest

# pydantic puts the tag of a discriminated union into an error's location; users never wrote it.
_UNION_TAGS = frozenset(LENGTH_KINDS + ARRIVAL_KINDS)
_MAX_VALUE_CHARS = 80
# The value of a key the user left out, shown as "(missing)".
MISSING: object = type("Missing", (), {"__repr__": lambda self: "(missing)"})()


class SpecError(InputError):
    """A spec that fails validation: `problems` holds one line per broken rule."""

    def __init__(self, field: str, value: object, why: str, problems: Sequence[str]) -> None:
        super().__init__(field, value, why)
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def load_spec(path: str | os.PathLike[str]) -> PlanRequest:
    """Read and validate a spec file (.yaml, .yml or .json; other suffixes are read as YAML).

    Relative paths inside the spec (trace files, config.json models) resolve against the
    file's folder. Raises InputError naming the file when it is missing or not YAML/JSON, and
    SpecError (an InputError) listing every problem when the content breaks a rule.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("spec", str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError("spec", str(path), f"cannot read: {err}") from None
    raw = _parse_text(text, str(path), json_only=p.suffix.lower() == ".json")
    return parse_spec(raw, base_dir=p.resolve().parent)


def parse_spec(raw: Any, *, base_dir: str | os.PathLike[str] | None = None) -> PlanRequest:
    """Validate an already-parsed spec mapping; relative paths resolve against `base_dir`
    (default: the working directory)."""
    if not isinstance(raw, Mapping):
        raise InputError("spec", type(raw).__name__, "the top level must be a mapping of keys")
    try:
        return PlanRequest.model_validate(raw, context={"base_dir": base_dir})
    except pydantic.ValidationError as err:
        raise spec_error_to_input_error(err, raw) from None


def _parse_text(text: str, where: str, *, json_only: bool) -> Any:
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError("spec", where,
                             f"not valid JSON: line {err.lineno} column {err.colno}: {err.msg}"
                             ) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise InputError("spec", where, f"not valid YAML: {at}{problem}") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# --- errors --------------------------------------------------------------------------------


def describe(error: pydantic.ValidationError, raw: Any = None) -> list[str]:
    """One line per problem: `dotted.path = value: rule`.

    The path uses the keys as the user wrote them when `raw` (the parsed input) is given,
    list indices in brackets, and no union tags. Cross-field rules name the exact key.
    """
    return [_line(*_located(e, raw)) for e in error.errors()]


def spec_error_to_input_error(error: pydantic.ValidationError, raw: Any = None) -> SpecError:
    """A SpecError whose field/value are the first problem's and whose `problems` lists all."""
    located = [_located(e, raw) for e in error.errors()]
    path, value, rule = located[0]
    value = None if value is MISSING else value
    lines = [_line(*item) for item in located]
    why = rule if len(lines) == 1 else f"{rule} (and {len(lines) - 1} more problems)"
    return SpecError(path, value, why, lines)


def _located(e: Mapping[str, Any], raw: Any) -> tuple[str, object, str]:
    loc: list[str | int] = list(e["loc"])
    ctx = e.get("ctx") or {}
    value: object = e.get("input")
    rule = str(e["msg"])
    if e["type"] == RULE_ERROR and "field" in ctx:
        loc += [int(p) if p.isdigit() else p for p in str(ctx["field"]).split(".")]
        # A rule about a key that is absent reports it as missing rather than as None.
        value = MISSING if ctx.get("value") is None else ctx["value"]
    if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # Report the discriminator key itself: `...promptTokens.kind = 'weibull': ...`.
        loc.append(str(ctx.get("discriminator", "kind")).strip("'"))
        value = ctx.get("tag", MISSING)
        rule = "unknown kind" if "tag" in ctx else "required"
        if "expected_tags" in ctx:
            rule += f"; one of {ctx['expected_tags']}"
    parts = _user_path(loc, raw)
    if e["type"] == "missing":
        value = MISSING
        rule = "required"
    elif e["type"] == "extra_forbidden":
        rule = _unknown_key_rule(parts, raw)
    return _format_path(parts), value, rule


def _user_path(loc: Sequence[str | int], raw: Any) -> list[str | int]:
    """The location as the user spelled it, walking the raw input alongside."""
    node = raw
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
            ok = isinstance(node, list) and 0 <= part < len(node)
            node = node[part] if ok else None
            continue
        if isinstance(node, Mapping):
            for spelling in (part, _snake(part)):
                if spelling in node:
                    out.append(spelling)
                    node = node[spelling]
                    break
            else:
                if node.get("kind") == part:
                    continue  # the discriminated union's tag
                out.append(part)
                node = None
            continue
        if part in _UNION_TAGS:
            continue
        out.append(part)
        node = None
    return out


def _snake(key: str) -> str:
    # The inverse of the camelCase alias generator for our field names ("p90" stays "p90",
    # unlike pydantic's to_snake, which would give "p_90").
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _format_path(parts: Sequence[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line(path: str, value: object, rule: str) -> str:
    shown = "(missing)" if value is MISSING else repr(value)
    if len(shown) > _MAX_VALUE_CHARS:
        shown = shown[: _MAX_VALUE_CHARS - 3] + "..."
    return f"{path} = {shown}: {rule}"


def _unknown_key_rule(parts: Sequence[str | int], raw: Any) -> str:
    """'unknown key', with the keys allowed there when the model at that path is known."""
    allowed = _allowed_keys(parts[:-1], raw)
    if not allowed:
        return "unknown key"
    return f"unknown key; allowed here: {', '.join(allowed)}"


def _allowed_keys(parts: Sequence[str | int], raw: Any) -> list[str]:
    """The keys of the model at `parts`, found by walking the models and the raw input."""
    model: type[pydantic.BaseModel] | None = PlanRequest
    node = raw
    for part in parts:
        node = _child(node, part)
        if isinstance(part, int):
            continue
        field = _field(model, part) if model is not None else None
        model = _model_of(field.annotation, node) if field is not None else None
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _child(node: Any, part: str | int) -> Any:
    if isinstance(part, int):
        return node[part] if isinstance(node, list) and 0 <= part < len(node) else None
    return node.get(part) if isinstance(node, Mapping) else None


def _field(model: type[pydantic.BaseModel], key: str) -> Any:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return f
    return None


def _model_of(annotation: Any, node: Any) -> type[pydantic.BaseModel] | None:
    """The one model an annotation allows here: Optional and list unwrapped, a tagged union's
    member picked by the input's `kind`."""
    found = [a for a in _flatten(annotation)
             if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
    if len(found) > 1 and isinstance(node, Mapping):
        found = [m for m in found if "kind" in m.model_fields
                 and node.get("kind") in getattr(m.model_fields["kind"].annotation,
                                                 "__args__", ())]
    return found[0] if len(found) == 1 else None


def _flatten(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if args is None or getattr(annotation, "__origin__", None) is dict:
        return [annotation]
    return [leaf for arg in args for leaf in _flatten(arg)]
