"""The `trilemma render` handler: a plan file -> engine command lines and manifests.

Reads either a plan (a dict whose "recommended" entry holds {"config": ...}) or a bare
ServingConfig dict; bad input is an InputError naming the field. The CLI wires it up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from trilemma.optimizer import render
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search.configs import ServingConfig


def _read(plan_path: Path) -> Any:
    try:
        return json.loads(Path(plan_path).read_text())
    except OSError as err:
        raise InputError("plan", str(plan_path), f"cannot read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InputError("plan", str(plan_path), f"not JSON: {err.msg} (line {err.lineno})") \
            from None


def load_e2e_p99_ms(plan_path: Path) -> float | None:
    """The recommendation's predicted p99 end-to-end latency, None when the file has none
    (a bare ServingConfig): sizes the pods' termination grace period (render/drain.py)."""
    data = _read(plan_path)
    rec = data.get("recommended") if isinstance(data, dict) else None
    prediction = rec.get("prediction") if isinstance(rec, dict) else None
    value = prediction.get("e2e_p99_ms") if isinstance(prediction, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def load_config(plan_path: Path) -> ServingConfig:
    data = _read(plan_path)
    if isinstance(data, dict) and "recommended" in data:
        rec = data["recommended"]
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
            raise InputError("recommended.config", rec, "expected an object with a config")
        data = rec["config"]
    if not isinstance(data, dict):
        raise InputError("config", type(data).__name__, "expected a ServingConfig object")
    try:
        return ServingConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError("config", sorted(data), f"not a ServingConfig: {err}") from None


def render_command(plan_path: Path, engine: str, *, name: str, namespace: str,
                   image: str | None, out: TextIO,
                   router_command: tuple[str, ...] | None = None,
                   inference_pool: render.InferencePoolOptions | None = None) -> int:
    """Print the engine command lines as YAML comments, then the manifests. Returns 0."""
    config = load_config(plan_path)
    options = render.RenderOptions(router_command=router_command,
                                   e2e_p99_ms=load_e2e_p99_ms(plan_path))
    for line in render.render_text(config, engine, options=options).splitlines():
        out.write(f"# {line}\n")
    out.write(render.render_yaml(config, name=name, engine=engine, namespace=namespace,
                                 image=image, options=options,
                                 inference_pool=inference_pool))
    return 0
