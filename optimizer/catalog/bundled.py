"""The bundled model catalog in data/models/: ids, aliases, variants and provenance
(index.json), and load_model, which resolves a bundled id or a local config.json path.

models.py forwards load_model, bundled_id and bundled_models here; hf_config.py parses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any

from trilemma.optimizer.catalog import models
from trilemma.optimizer.catalog.hf_config import QUANT_COMPANION, build, loads, parse_hf_config
from trilemma.optimizer.catalog.hf_quant import ALWAYS_UNQUANTIZED
from trilemma.optimizer.errors import UnknownModelError

_DATA = resources.files(__package__ or "trilemma.optimizer.catalog").joinpath("data", "models")
_QUANT_SUFFIX = "." + QUANT_COMPANION


@functools.cache
def _index() -> dict[str, Any]:
    return loads(_DATA.joinpath("index.json").read_text("utf-8"), "index", "index.json")


@functools.cache
def _bundled_files() -> dict[str, str]:
    """Bundled id -> file name; `org--name.json` holds the config.json of "org/name"."""
    names = [t.name for t in _DATA.iterdir() if t.name.endswith(".json") and "--" in t.name]
    return {n.removesuffix(".json").replace("--", "/"): n
            for n in sorted(names) if not n.endswith(_QUANT_SUFFIX)}


def bundled_models() -> tuple[str, ...]:
    """Every id load_model knows without a path: bundled configs and their variants."""
    return tuple(sorted([*_bundled_files(), *_index()["variants"]], key=str.lower))


@functools.cache
def _spellings() -> dict[str, str]:
    """Lower-cased spelling -> id: ids and aliases, `--` for `/`, and unambiguous bare names."""
    pairs = [(i, i) for i in bundled_models()] + list(_index()["aliases"].items())
    table: dict[str, str] = {}
    bare: dict[str, set[str]] = {}
    for spelling, target in pairs:
        table[spelling.lower()] = table[spelling.lower().replace("/", "--")] = target
        bare.setdefault(spelling.rpartition("/")[2].lower(), set()).add(target)
    for name, targets in bare.items():
        if len(targets) == 1:
            table.setdefault(name, *targets)
    return table


def bundled_id(spelling: str) -> str | None:
    """The bundled id a spelling names (any case, an alias, `--` for `/`), or None; never
    looks at the filesystem."""
    return _spellings().get(spelling.strip().lower())


def load_model(id_or_path: str | os.PathLike[str]) -> models.ModelArch:
    """See models.load_model. A bundled id wins over a same-named relative path ("./x" does not)."""
    text = os.fspath(id_or_path).strip()
    model_id = bundled_id(text)
    if model_id is not None:
        return _load_bundled(model_id)
    path = Path(text).expanduser()
    if text and (path.exists() or text.endswith(".json")):
        return parse_hf_config(path)
    close = difflib.get_close_matches(text.lower(), list(_spellings()), n=5, cutoff=0.6)
    close = list(dict.fromkeys(_spellings()[c] for c in close))[:3]  # ids, not spellings
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    known = bundled_models()
    raise UnknownModelError(
        "model", text,
        "not a bundled model id and no such file. For any other model pass the path to its "
        "Hugging Face config.json, or to the folder holding it (load_model('/models/x/config."
        f"json'); nothing is downloaded).{hint} Bundled: {', '.join(known[:6])} ... "
        f"({len(known)} in all, see bundled_models())",
    )


@functools.cache
def _load_bundled(model_id: str) -> models.ModelArch:
    """Parsed once per process: the search calls load_model for every candidate."""
    index = _index()
    variant = index["variants"].get(model_id)
    if variant is not None:
        base = _load_bundled(variant["base"])
        recipe = variant["checkpoint_quant"]
        return dataclasses.replace(
            base, id=model_id, checkpoint_quant=recipe, checkpoint_kv_quant=None,
            unquantized_parts=ALWAYS_UNQUANTIZED if recipe else frozenset(),
            source=f"{base.source}; variant: {variant['why']}",
        )
    name = _bundled_files()[model_id]
    raw = loads(_DATA.joinpath(name).read_text("utf-8"), "config", name)
    companion = _DATA.joinpath(name.removesuffix(".json") + _QUANT_SUFFIX)
    quant = None
    if companion.is_file():
        quant = loads(companion.read_text("utf-8"), "hf_quant_config", companion.name)
    return build(raw, model_id, quant, f"bundled {name}: {index['sources'][name]}")
