"""The chart's Argo CD health checks, run by a real Lua 5.1 interpreter (Debian's lua5.1).

Argo CD evaluates a `resource.customizations.health.<group>_<Kind>` script with gopher-lua
(Lua 5.1), the live object in the global `obj`, and reads `status` and `message` from the table
it returns. `health` does the same with lua5.1: plain Lua has no JSON parser, so the object is
handed over as a Lua table literal written here (JSON null is nil, arrays count from 1, as
Argo CD's own conversion makes them).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.tools import require_tool

ARGOCD_CM = Path(__file__).resolve().parents[2] / "charts/trilemma/argocd/argocd-cm.yaml"
GROUP = "trilemma.dev"
# Lua's escapes for the bytes a short string cannot hold as they are.
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n"}


@dataclass(frozen=True)
class Health:
    status: str
    message: str


def script(kind: str) -> str:
    """The health check of `kind` as the chart's argocd-cm patch ships it."""
    data = yaml.safe_load(ARGOCD_CM.read_text())["data"]
    return str(data[f"resource.customizations.health.{GROUP}_{kind}"])


def _string(text: str) -> str:
    # Byte by byte (Lua strings are bytes): printable ASCII as is, the rest as \ddd.
    out = [_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\{b:03d}")
           for b in text.encode()]
    return '"' + "".join(out) + '"'


def lua_literal(value: Any) -> str:
    """A JSON value as a Lua 5.1 expression."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_string(str(k))}] = {lua_literal(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"not a JSON value: {value!r}")


def health(obj: dict[str, Any]) -> Health:
    """What Argo CD would report for `obj` (a whole object: metadata, spec, status)."""
    lua = require_tool("lua5.1")
    level = "=" * 8  # a long bracket that no script contains
    check = script(obj["kind"])
    assert f"]{level}]" not in check
    program = (f"obj = {lua_literal(obj)}\n"
               f"local check = assert(loadstring([{level}[{check}]{level}]))\n"
               "local hs = check()\n"
               'io.write(hs.status, "\\n", hs.message or "")\n')
    done = subprocess.run([lua, "-"], input=program.encode(), capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    status, _, message = done.stdout.decode().partition("\n")
    return Health(status, message)
