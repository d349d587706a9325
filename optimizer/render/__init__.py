"""Render: a plan -> exact engine arguments and Kubernetes manifests (pure functions).

Top of the optimizer's data flow after search: layout.layout resolves a ServingConfig into a
RenderPlan (ir.py), recording where each value came from; the engine command line and the
manifests are pure functions of that IR. The names below are the supported API;
tests/unit/test_render_api.py pins the list.
"""

from __future__ import annotations

from typing import Any

from trilemma.optimizer.render import inference_pool as gateway
from trilemma.optimizer.render import overrides, text, workloads
from trilemma.optimizer.render.choices import RenderOptions
from trilemma.optimizer.render.inference_pool import InferencePoolOptions
from trilemma.optimizer.render.ir import Arg, RenderedWorker, RenderPlan, Role, Source
from trilemma.optimizer.render.layout import DEFAULT_IMAGES, layout, parse_engine
from trilemma.optimizer.render.workloads import CACHE_MOUNT
from trilemma.optimizer.search.configs import Mode, ServingConfig


def bootstrap_port(engine: str) -> int:
    """The extra port prefill servers expose to the router (SGLang's bootstrap server)."""
    from trilemma.optimizer.render import sglang_flags

    return sglang_flags.BOOTSTRAP_PORT if parse_engine(engine).value == "sglang" else 0


def engine_args(config: ServingConfig, engine: str, *,
                options: RenderOptions | None = None) -> list[str]:
    """argv after the command of the (decode or aggregated) worker's leader process."""
    rendered = layout(config, engine, name="render", options=options)
    aggregated = config.mode is Mode.AGGREGATED
    return rendered.worker(Role.SERVER if aggregated else Role.DECODE).argv()


def decided_flags(config: ServingConfig, engine: str | None = None, *,
                  options: RenderOptions | None = None) -> frozenset[str]:
    """Every engine flag the plan decides (emitted or left at the default on purpose)."""
    return overrides.decided_flags(layout(config, engine or config.engine, name="render",
                                          options=options))


def overridden_flag(engine: str, token: str, decided: frozenset[str]) -> str | None:
    """The decided flag an extra argv token would set, read the way the engine parses it
    (aliases, `_` for `-`, `=`, prefixes, `--no-`, dotted keys), or None; "--config" for a
    config-file option, which can set any flag."""
    return overrides.overridden_flag(parse_engine(engine), token, decided)


def manifests(config: ServingConfig, *, name: str, engine: str | None = None,
              namespace: str = "default", image: str | None = None,
              options: RenderOptions | None = None, hf_token_secret: str | None = None,
              model_cache_pvc: str | None = None,
              inference_pool: InferencePoolOptions | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects deploying `config`, in apply order (workloads, Services, a
    PodDisruptionBudget per workload); with `inference_pool`, an InferencePool over the
    serving pods (and its endpoint picker) after them."""
    eng = engine or config.engine
    rendered = layout(config, eng, name=name, namespace=namespace, image=image, options=options,
                    hf_token_secret=hf_token_secret, model_cache_pvc=model_cache_pvc)
    objects = workloads.build(rendered, bootstrap_port=bootstrap_port(eng),
                              e2e_p99_ms=(options or RenderOptions()).e2e_p99_ms)
    if inference_pool is not None:
        objects += gateway.objects(rendered, inference_pool)
    return objects


def render_yaml(config: ServingConfig, *, name: str, engine: str | None = None,
                namespace: str = "default", image: str | None = None,
                options: RenderOptions | None = None, hf_token_secret: str | None = None,
                model_cache_pvc: str | None = None,
                inference_pool: InferencePoolOptions | None = None) -> str:
    """manifests(...) as one YAML stream, byte-identical for the same input."""
    return text.yaml_stream(manifests(
        config, name=name, engine=engine, namespace=namespace, image=image, options=options,
        hf_token_secret=hf_token_secret, model_cache_pvc=model_cache_pvc,
        inference_pool=inference_pool))


def render_text(config: ServingConfig, engine: str | None = None, *,
                options: RenderOptions | None = None) -> str:
    """The shell-quoted command line of every process kind, one per line."""
    rendered = layout(config, engine or config.engine, name="render", options=options)
    lines = []
    for worker in rendered.workers:
        lines.append(text.command_line(worker))
        if worker.nodes > 1:
            lines.append(text.command_line(worker, follower=True))
    return "\n".join(lines) + "\n"


__all__ = [
    "CACHE_MOUNT",
    "DEFAULT_IMAGES",
    "Arg",
    "InferencePoolOptions",
    "RenderOptions",
    "RenderPlan",
    "RenderedWorker",
    "Role",
    "Source",
    "bootstrap_port",
    "decided_flags",
    "engine_args",
    "gateway",
    "layout",
    "manifests",
    "overridden_flag",
    "render_text",
    "render_yaml",
]
