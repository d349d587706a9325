"""From a custom resource to the optimizer's PlanRequest, and the search run off the loop.

The optimizer is pure and synchronous and takes seconds; the operator's event loop must keep
serving watches meanwhile, so plans run in a bounded thread pool. A digest of the request
(spec, models, pool availability) names the plan, so a restart or a no-op update reuses the
plan stored in the endpoint's ConfigMap instead of searching again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from trilemma.operator.resources import ModelRef, OptimizedEndpointSpec
from trilemma.optimizer import catalog
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import Plan, SearchSettings, canonical_json
from trilemma.optimizer.search import plan as search_plan
from trilemma.optimizer.spec import (
    HardwarePool,
    ModelChoice,
    PlanRequest,
    spec_error_to_input_error,
)

Obj = dict[str, Any]
Planner = Callable[[PlanRequest], Plan]
# Bump when the operator starts reading plans differently: stored plans then count as stale.
PLAN_FORMAT = 1


def default_planner(request: PlanRequest) -> Plan:
    """The real search. One process per plan: the operator runs several plans in threads, and
    the search's forked screening workers are not safe to start from a threaded process."""
    return search_plan(request, settings=SearchSettings(workers=1))


@dataclass(frozen=True)
class Models:
    """The candidates as the optimizer takes them, and what each one's engine loads."""

    choices: list[ModelChoice]
    checkpoints: dict[str, str]  # planning id (catalog id or cached config.json) -> served


# A config.json is a few KiB; a ConfigMap holds at most 1 MiB. Larger text is refused before
# it is parsed (an emulated API server enforces no ConfigMap limit).
MAX_CONFIG_JSON_BYTES = 1 << 20


def model_choice(ref: ModelRef, index: int | None, config_json: str | None,
                 cache_dir: Path) -> tuple[ModelChoice, str]:
    """One candidate; `config_json` is the ConfigMap's text for configMap models.

    An `id` must name a bundled model: the operator never opens a path a spec names (its own
    files, devices, /proc), and the error does not depend on what such a path holds. Blocking
    (it parses JSON): run it off the event loop.
    """
    where = "model" if index is None else f"models.{index}"
    model_id = ref.id
    if config_json is None:
        assert model_id is not None, "validated: id or configMap"
        # The spelling stays (load_model resolves it through the catalog before any path).
        if catalog.bundled_id(model_id) is None:
            raise InputError(f"{where}.id", model_id,
                             "not a bundled model id; the operator reads no files, so for "
                             "another model put its config.json in a ConfigMap and use "
                             "configMap (bundled: " + ", ".join(catalog.bundled_models()[:4])
                             + f", ... {len(catalog.bundled_models())} in all)")
    else:
        if len(config_json.encode()) > MAX_CONFIG_JSON_BYTES:
            raise InputError(f"{where}.configMap", ref.config_map.name if ref.config_map else "",
                             f"the config.json is over {MAX_CONFIG_JSON_BYTES} bytes")
        # The catalog reads configs from files; a content-addressed path keeps the planning
        # input (and so the request digest) stable across restarts.
        digest = hashlib.sha256(config_json.encode()).hexdigest()[:16]
        path = cache_dir / "models" / digest / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(config_json, encoding="utf-8")
        model_id = str(path)
    assert model_id is not None, "validated: id or configMap"
    try:
        choice = ModelChoice.model_validate(
            {"id": model_id, **({"quality": ref.quality} if ref.quality else {})})
    except Exception as err:  # pydantic.ValidationError: unknown id, bad config.json
        raise _as_input_error(err, f"{where}.id", model_id) from None
    return choice, ref.checkpoint if config_json is None else str(ref.served_model)


def _as_input_error(err: Exception, field: str, value: object) -> InputError:
    if isinstance(err, pydantic.ValidationError):
        first = err.errors()[0]
        why = str(first.get("ctx", {}).get("why") or first.get("msg"))
        return InputError(field, value, why)
    return InputError(field, value, str(err))


def _wire(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def plan_request(spec: OptimizedEndpointSpec, models: Models, pool: HardwarePool) -> PlanRequest:
    """The optimizer's request; InputError naming the spec field when it breaks a rule."""
    bounds = spec.bounds
    if spec.engine.name is not None:
        bounds = bounds.model_copy(update={"engines": [spec.engine.name]})
    # Re-validated from plain data: the whole-document rules (bounds inside the pool, quality
    # floor reachable) must run against the pool as it is now.
    data: Obj = {"workload": _wire(spec.workload), "slo": _wire(spec.slo),
                 # The GPUs only: a HardwarePoolSpec's Kubernetes fields are not the search's.
                 "hardware": {"gpus": [_wire(g) for g in pool.gpus]},
                 "objective": spec.objective.value,
                 "bounds": _wire(bounds)}
    if spec.model is not None:
        data["model"] = _wire(models.choices[0])
    else:
        data["models"] = [_wire(c) for c in models.choices]
    try:
        return PlanRequest.model_validate(data)
    except pydantic.ValidationError as err:
        raise spec_error_to_input_error(err, data) from None


def request_digest(request: PlanRequest, models: Models) -> str:
    """Names the planning input: same digest, same plan (the search is deterministic)."""
    payload = {"format": PLAN_FORMAT,
               "request": request.model_dump(by_alias=True, mode="json", exclude_none=True),
               "served": models.checkpoints}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlanRun:
    plan: Plan
    seconds: float


class Optimizer:
    """Runs plans in worker threads, at most `concurrency` at once."""

    def __init__(self, planner: Planner, concurrency: int) -> None:
        self._planner = planner
        self._executor = ThreadPoolExecutor(max_workers=concurrency,
                                            thread_name_prefix="trilemma-plan")
        self._slots = asyncio.Semaphore(concurrency)
        self.in_flight = 0

    async def run(self, request: PlanRequest) -> PlanRun:
        async with self._slots:
            self.in_flight += 1
            try:
                start = time.perf_counter()
                plan = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._planner, request)
                return PlanRun(plan=plan, seconds=time.perf_counter() - start)
            finally:
                self.in_flight -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
