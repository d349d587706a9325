"""The shipped YAML data files: read once, checked to be a mapping at the top.

yaml.safe_load returns Any; this is the one place that turns it into a typed mapping, so the
loaders above it stay typed.
"""

from __future__ import annotations

import importlib.resources
from typing import Any

import yaml


def read_yaml(package: str, *path: str) -> dict[str, Any]:
    """`path` (parts under `package`) parsed as YAML; ValueError unless it is a mapping."""
    text = importlib.resources.files(package).joinpath(*path).read_text("utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{package}: {'/'.join(path)} is not a YAML mapping")
    return data
