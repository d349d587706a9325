"""Mixed plans: one model's replicas over several GPU types (search/mixing.py), through the
search, the simulator, the renderer and the operator's accounting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from trilemma.operator import pool, replicas, status
from trilemma.optimizer import render
from trilemma.optimizer.search import (
    Choice,
    Part,
    Plan,
    SearchSettings,
    ServingConfig,
    WorkerConfig,
    mixing,
    plan,
)
from trilemma.optimizer.spec import HardwarePool, parse_spec

SPEC = Path(__file__).parent / "fixtures" / "search" / "mixed_pool.yaml"
FAST = SearchSettings(workers=1, explain_sensitivity=False)
SELECTORS = {"h100_sxm": {"gpu.example/type": "h100"}, "l40s": {"gpu.example/type": "l40s"}}


def _raw(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load(SPEC.read_text())
    raw.update(changes)
    for g in raw["hardware"]["gpus"]:
        g["nodeSelector"] = SELECTORS[g["gpu"]]
        g["tolerations"] = [{"key": f"{g['gpu']}-only", "operator": "Exists",
                             "effect": "NoSchedule"}]
    return raw


@pytest.fixture(scope="module")
def mixed() -> tuple[Any, Plan]:
    request = parse_spec(_raw())
    return request, plan(request, settings=FAST)


def _single(gpu: str, tp: int = 1, replicas: int = 1) -> ServingConfig:
    return ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(gpu=gpu, tp=tp),
                         replicas=replicas)


def test_single_type_configurations_keep_their_json_and_hash() -> None:
    config = _single("h100_sxm", tp=2, replicas=3)
    assert "mixed" not in config.to_dict()
    # Pinned: the hashes this configuration had before mixed plans existed (main at 6e30a46).
    assert (config.config_hash(), config.layout_hash()) == ("b47ab5b9", "97eda4dd")
    assert ServingConfig.from_dict(config.to_dict()) == config
    assert config.gpus_by_type() == {"h100_sxm": 6}
    assert config.summary() == "3x [bf16 TP2] on h100_sxm"


def test_a_mixed_configuration_round_trips_and_names_its_layout_without_counts() -> None:
    config = ServingConfig(model="m", worker=WorkerConfig(gpu="h100_sxm"), replicas=2,
                           mixed=(Part(worker=WorkerConfig(gpu="l40s"), replicas=4,
                                       weight=0.25),))
    back = ServingConfig.from_dict(config.to_dict())
    assert back == config and back.config_hash() == config.config_hash()
    assert config.gpus_by_type() == {"h100_sxm": 2, "l40s": 4}
    assert config.shares() == pytest.approx((2 / 3, 1 / 3))
    more = replicas.scaled(config, 4)
    assert more.layout_hash() == config.layout_hash() != more.config_hash()


def test_rate_no_single_type_carries_yields_a_mixed_plan_split_by_capacity(mixed) -> None:
    request, p = mixed
    rec = p.recommended
    config = rec.config
    assert config.mixed and {x.worker.gpu for x in config.parts()} == {"h100_sxm", "l40s"}
    assert p.counts.mixed >= 1 and p.counts.feasible == 0  # no single type carries 90 req/s
    for gpu, n in config.gpus_by_type().items():
        assert n <= request.hardware.group(gpu).count
    assert rec.prediction.capacity_rps >= 90.0 and rec.prediction.simulated
    # Each type's share is its replicas x per-replica capacity at the SLO over the total.
    lays = {lay.gpu: lay for lays in mixing.best_layouts(
        planning_screens(request)).values() for lay in lays}
    caps = [x.replicas * lays[x.worker.gpu].capacity for x in config.parts()]
    assert config.shares() == pytest.approx([c / sum(caps) for c in caps], rel=1e-5)
    assert "split" in rec.prediction.provenance
    cost = sum(x.replicas * x.worker.gpus * request.hardware.group(x.worker.gpu)
               .effective_price_per_gpu_hour for x in config.parts())
    assert rec.prediction.cost_per_hour == pytest.approx(cost)
    # The plan stores and reads back byte-identically, and the same spec plans the same.
    assert Plan.from_dict(p.to_dict()).to_dict() == p.to_dict()
    assert plan(parse_spec(_raw()), settings=FAST).to_dict() == p.to_dict()


def planning_screens(request: Any) -> list[Any]:
    from trilemma.optimizer.search import planning

    return planning.search(request, FAST, lambda _p, _f: None, {}).screens


def test_mixing_off_or_a_single_type_pool_gives_no_mixed_plan() -> None:
    from trilemma.optimizer.search import InfeasibleSLO

    request = parse_spec(_raw())
    with pytest.raises(InfeasibleSLO):
        plan(request, settings=SearchSettings(workers=1, explain_sensitivity=False,
                                              mixed=False))
    raw = _raw()
    raw["workload"]["arrivals"]["requestsPerSecond"] = 20
    small = plan(parse_spec(raw), settings=FAST)
    assert not small.recommended.config.mixed


def test_the_mixture_is_simulated_per_type_on_its_share_of_arrivals() -> None:
    config = ServingConfig(model="m", worker=WorkerConfig(gpu="h100_sxm"), replicas=1,
                           mixed=(Part(worker=WorkerConfig(gpu="l40s"), replicas=3,
                                       weight=1 / 3),))
    idx = mixing.split(config, 1000)
    assert [len(i) for i in idx] == [500, 500]
    assert sorted(int(x) for i in idx for x in i) == list(range(1000))


def test_render_gives_one_workload_per_gpu_type_on_its_nodes(mixed) -> None:
    request, p = mixed
    config = p.recommended.config
    groups = {g.gpu: g for g in request.hardware.gpus}
    opts = render.RenderOptions(pool_group=groups[config.worker.gpu],
                                pool_groups=tuple(groups[x.worker.gpu] for x in config.mixed))
    objs = render.manifests(config, name="x" * 45, options=opts)
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert len(deployments) == len(config.parts()) == 2
    names = [o["metadata"]["name"] for o in objs if o["kind"] != "Service"]
    assert len(set(names)) == len(names) - len(deployments)  # a PDB per workload, same name
    assert all(len(n) <= 63 for n in names)
    for d, part in zip(deployments, config.parts(), strict=True):
        pod = d["spec"]["template"]["spec"]
        assert d["spec"]["replicas"] == part.replicas
        assert pod["nodeSelector"] == SELECTORS[part.worker.gpu]
        assert pod["tolerations"][0]["key"] == f"{part.worker.gpu}-only"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(
            part.worker.gpus)
    service, = (o for o in objs if o["kind"] == "Service")
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in deployments]
    assert len(set(selectors)) == len(selectors)
    assert render.render_yaml(config, name="chat", options=opts) == render.render_yaml(
        config, name="chat", options=opts)
    # The load-aware route a capacity split needs: the InferencePool selects every type's pods.
    routed = render.manifests(config, name="chat", options=opts,
                              inference_pool=render.InferencePoolOptions())
    pool_obj, = (o for o in routed if o["kind"] == "InferencePool")
    wanted = pool_obj["spec"]["selector"]["matchLabels"]
    for d in (o for o in routed if o["kind"] == "Deployment" and "engine" in {
            c["name"] for c in o["spec"]["template"]["spec"]["containers"]}):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in wanted.items())


def test_operator_accounts_each_gpu_type_and_scales_them_together(mixed) -> None:
    request, p = mixed
    choice: Choice = p.recommended
    gpus = status.config_gpus(choice.config)
    assert set(gpus) == {"h100_sxm", "l40s"}
    active = status.active_configuration(choice, config_hash="h", served_model="m",
                                         engine_args=[], applied=True)
    from trilemma.operator.resources import to_wire

    wire = to_wire(active)
    assert wire["gpusByType"] == gpus and wire["gpus"] == sum(gpus.values())
    assert wire["short"].endswith(" +1 type") and " + " in wire["summary"]
    assert status.config_gpus_from_active(wire) == gpus
    ledger = pool.Ledger()
    ledger.record("gpus", "ns/chat", status.config_gpus_from_active(wire))
    held = ledger.others("gpus", "ns/other")
    assert held["ns/chat"] == gpus
    avail = pool.available(HardwarePool(gpus=list(request.hardware.gpus)), held)
    left = {g.gpu: g.count for g in (avail.pool.gpus if avail.pool else [])}
    for gpu, n in gpus.items():
        assert left.get(gpu, 0) == request.hardware.group(gpu).count - n
    assert not pool.fits(gpus, avail) or sum(left.values()) >= sum(gpus.values())
    config = choice.config
    double = replicas.scaled(config, config.replicas * 2)
    assert [x.replicas for x in double.parts()] == [x.replicas * 2 for x in config.parts()]
    assert replicas.scaled(config, 0).gpus == 0


def test_a_single_type_status_is_unchanged() -> None:
    choice = Choice(config=_single("l40s", replicas=2), prediction=_prediction())
    from trilemma.operator.resources import to_wire

    wire = to_wire(status.active_configuration(choice, config_hash="h", served_model="m",
                                               engine_args=[], applied=True))
    assert "gpusByType" not in wire and status.config_gpus_from_active(wire) == {"l40s": 2}


def _prediction() -> Any:
    from trilemma.optimizer.search import Prediction

    return Prediction(ttft_p50_ms=1, ttft_p90_ms=2, tpot_p50_ms=1, tpot_p90_ms=2,
                      e2e_p99_ms=3, capacity_rps=1, cost_per_hour=1, cost_per_mtok=1,
                      quality=None)


def test_optimize_prints_the_mixed_plan_and_its_split(mixed) -> None:
    import io

    from trilemma.optimizer import commands

    _, p = mixed
    out = io.StringIO()
    commands.print_plan(p, out)
    text = out.getvalue()
    assert "mixed over GPU types" in text
    assert f"* {p.recommended.config.summary()}" in text and " + " in text
    assert "traffic split by capacity at the SLO: h100_sxm" in text


# ---- crossed: prefill on one GPU type, decode on another (search/crossing.py) -------------

CROSS = {"model": {"id": "meta-llama/Llama-3.1-8B"},
         "workload": {"promptTokens": {"kind": "fixed", "value": 4096},
                      "outputTokens": {"kind": "fixed", "value": 256},
                      "arrivals": {"kind": "poisson", "requestsPerSecond": 20}},
         "slo": {"ttftMs": {"p90": 1500}, "tpotMs": {"p90": 40}},
         "hardware": {"gpus": [
             {"gpu": "h100_sxm", "count": 16, "nodeSelector": {"pool": "h100"}},
             {"gpu": "l40s", "count": 16, "nodeSelector": {"pool": "l40s"}}]},
         "objective": "min_cost",
         "bounds": {"quantizations": ["fp8"], "kvDtypes": ["bf16"], "speculation": ["none"],
                    "maxTensorParallel": 4, "maxPipelineParallel": 1,
                    "allowDisaggregation": True}}


@pytest.fixture(scope="module")
def crossed() -> tuple[Any, list[Choice]]:
    from trilemma.optimizer.search import planning

    request = parse_spec(copy.deepcopy(CROSS))
    found = planning.search(request, FAST, lambda _p, _f: None, {}).mixes
    return request, [c for c in found if c.config.prefill is not None]


def test_crossed_plans_put_prefill_and_decode_on_different_types_within_each_pool(
        crossed) -> None:
    request, plans = crossed
    pairs = {(c.config.prefill.gpu, c.config.worker.gpu) for c in plans
             if c.config.prefill is not None}
    assert pairs == {("h100_sxm", "l40s"), ("l40s", "h100_sxm")}
    for c in plans:
        by_type = c.config.gpus_by_type()
        assert set(by_type) == {"h100_sxm", "l40s"}
        assert all(n <= request.hardware.group(g).count for g, n in by_type.items())
        assert c.prediction.capacity_rps >= 20.0
        # The KV crosses at the slower NIC of the two node types.
        assert "KV over the network between" in c.prediction.provenance["transfer"]
        assert c.config.summary().endswith(f"on {c.config.prefill.gpu} -> "
                                           f"{c.config.worker.gpu}")


def test_a_crossed_plan_is_simulated_with_each_sides_gpu(crossed) -> None:
    from trilemma.optimizer.search import confirming

    request, plans = crossed
    cheapest = min(plans, key=lambda c: c.prediction.cost_per_hour)
    done = confirming.confirm(request, [cheapest], SearchSettings(simulate_requests=300),
                              seed=0)
    assert done.simulated == 1


def test_render_places_crossed_prefill_and_decode_on_their_own_nodes(crossed) -> None:
    request, plans = crossed
    config = min(plans, key=lambda c: c.prediction.cost_per_hour).config
    assert config.prefill is not None
    groups = {g.gpu: g for g in request.hardware.gpus}
    opts = render.RenderOptions(pool_group=groups[config.worker.gpu],
                                pool_groups=(groups[config.prefill.gpu],),
                                router_command=("router",))
    objs = render.manifests(config, name="chat", options=opts)
    placed = {o["metadata"]["labels"]["app.kubernetes.io/component"]:
              o["spec"]["template"]["spec"].get("nodeSelector", {}).get("pool")
              for o in objs if o["kind"] == "Deployment"}
    assert placed["prefill"] == groups[config.prefill.gpu].node_selector["pool"]
    assert placed["decode"] == groups[config.worker.gpu].node_selector["pool"]
    assert placed["router"] is None  # the router holds no GPU
    assert any("NixlConnector" in a for o in objs if o["kind"] == "Deployment"
               for c in o["spec"]["template"]["spec"]["containers"] for a in c["args"])
    assert status.config_gpus(config) == config.gpus_by_type()


def test_a_running_mixed_or_crossed_plan_is_re_predicted_per_gpu_type(mixed, crossed) -> None:
    from trilemma.optimizer.search import predict

    request, p = mixed
    again = predict(p.recommended.config, request, requests=300)
    assert again.choice.prediction.cost_per_hour == pytest.approx(
        p.recommended.prediction.cost_per_hour)
    assert again.choice.prediction.capacity_rps == pytest.approx(
        p.recommended.prediction.capacity_rps)
    assert again.slo_miss is None
    request, plans = crossed
    c = min(plans, key=lambda x: x.prediction.cost_per_hour)
    again = predict(c.config, request, requests=300)
    assert again.choice.prediction.cost_per_hour == pytest.approx(c.prediction.cost_per_hour)
    assert again.choice.prediction.capacity_rps == pytest.approx(c.prediction.capacity_rps)
