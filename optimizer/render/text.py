"""RenderPlan -> text: the engine command line and the manifests as one YAML stream.

Byte-identical for the same input: shlex quoting, sorted mapping keys, a fixed document
order (the order manifests.build returns).
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from trilemma.optimizer.render.ir import RenderedWorker


def command_line(worker: RenderedWorker, *, follower: bool = False) -> str:
    return shlex.join([*worker.command, *worker.argv(follower=follower)])


def yaml_stream(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False,
                              explicit_start=True, width=100)
