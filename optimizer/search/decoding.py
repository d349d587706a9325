"""Decoding a plan's JSON form back into its frozen dataclasses.

A plan leaves the search as objects and is stored as canonical JSON (the operator's plan
ConfigMap, a CLI's output file); whoever reads it back decodes it here once, at that boundary,
and then holds objects. Stored data may be stale (an older format) or edited by hand, so every
field is checked against its declared type and a failure names the path that broke:
`MalformedPlan`, never a KeyError three calls later.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, TypeVar

from trilemma.optimizer.errors import TrilemmaError

if TYPE_CHECKING:  # typeshed's protocol of "a dataclass instance": what fields() accepts
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")
Decoder = Callable[[Any, str], Any]


class MalformedPlan(TrilemmaError, ValueError):
    """Plan data that does not decode: `field` is the path (e.g. "front.2.config.worker.tp").

    A ValueError, not an InputError: stored data is the program's own output gone stale or
    edited, and callers that take it from a user (a CLI's plan file) say which input it was.
    """

    def __init__(self, where: str, value: object, why: str) -> None:
        self.field = where or "plan"
        self.value = value
        self.why = why
        super().__init__(f"{self.field}={value!r}: {why}")


def obj(data: Any, where: str) -> Mapping[str, Any]:
    """`data` as a JSON object, or MalformedPlan."""
    if not isinstance(data, Mapping):
        raise MalformedPlan(where, _short(data), f"expected an object, got {type(data).__name__}")
    return data


def record(cls: type[D], data: Any, where: str, *, derived: tuple[str, ...] = (),
           **decoders: Decoder) -> D:
    """An instance of the dataclass `cls` from its `_plain` form.

    Every field is decoded by `decoders[name]` when given, else checked against its type
    (scalars, enums by value, optionals, str-keyed dicts of scalars). Keys in `derived` are
    written by `to_dict` but recomputed from the fields (a summary, a hash): skipped here.
    Unknown keys and missing required ones are errors: they mean another format.
    """
    d = obj(data, where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known - set(derived))
    if unknown:
        raise MalformedPlan(_at(where, unknown[0]), _short(d[unknown[0]]), "unknown field")
    values: dict[str, Any] = {}
    for f in fields(cls):
        at = _at(where, f.name)
        if f.name not in d:
            if f.default is MISSING and f.default_factory is MISSING:
                raise MalformedPlan(at, None, "missing")
            continue
        decode = decoders.get(f.name)
        values[f.name] = (decode(d[f.name], at) if decode is not None
                          else value(d[f.name], hints[f.name], at))
    return cls(**values)


def value(data: Any, tp: Any, where: str) -> Any:
    """`data` checked (and converted, for enums and tuples) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return value(data, inner[0], where)
    elif origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        return {value(k, key_tp, where): value(v, val_tp, _at(where, str(k)))
                for k, v in obj(data, where).items()}
    elif origin in (tuple, list) and isinstance(data, list):
        item = typing.get_args(tp)[0]
        out = [value(v, item, _at(where, str(i))) for i, v in enumerate(data)]
        return tuple(out) if origin is tuple else out
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise MalformedPlan(where, _short(data), f"not a {tp.__name__}") from None
    elif tp is float and isinstance(data, int | float) and not isinstance(data, bool):
        return float(data)
    elif _scalar(data, tp):
        return data
    raise MalformedPlan(where, _short(data), f"expected {_name(tp)}")


def items(data: Any, where: str, decode: Callable[[Any, str], T]) -> list[T]:
    """A JSON array decoded item by item."""
    if not isinstance(data, list):
        raise MalformedPlan(where, _short(data), f"expected an array, got {type(data).__name__}")
    return [decode(v, _at(where, str(i))) for i, v in enumerate(data)]


def _scalar(data: Any, tp: Any) -> bool:
    """Whether `data` already is a `tp` (a JSON true is not an int here)."""
    if tp is Any:
        return True
    if tp is int:
        return isinstance(data, int) and not isinstance(data, bool)
    return tp in (str, bool) and isinstance(data, tp)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _short(data: Any) -> object:
    """The offending value, cut short: a whole sub-document in an error helps nobody."""
    text = repr(data)
    return data if len(text) <= 80 else text[:77] + "..."
