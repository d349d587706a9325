"""SLO derived bounds, and hardware-pool defaults taken from the GPU catalog."""

from __future__ import annotations

import pydantic
import pytest

from trilemma.optimizer import spec
from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.errors import InputError


@pytest.mark.parametrize(("tpot", "rate", "expected"), [
    (None, None, None),
    ({"p50": 30}, None, 30),
    (None, 20, 50),  # 20 tokens/s -> 50 ms between tokens
    ({"p50": 30}, 20, 30),
    ({"p50": 80}, 20, 50),
    ({"p99": 40}, None, 40),  # a p99 bound also bounds the median
    ({"p90": 60, "p99": 90}, 25, 40),
])
def test_the_effective_median_tpot_is_the_tightest_implied_bound(tpot, rate, expected):
    slo = spec.Slo.model_validate({"tpotMs": tpot, "minTokensPerSecondPerUser": rate})
    assert slo.effective_tpot_p50_ms == expected


def test_an_empty_slo_is_unconstrained():
    assert spec.Slo().is_unconstrained
    assert not spec.Slo(max_cost_per_hour=10).is_unconstrained


def test_latency_percentiles_may_be_equal_but_not_inverted():
    assert spec.LatencyTarget(p50=100, p90=100).items() == (("p50", 100), ("p90", 100))
    with pytest.raises(pydantic.ValidationError, match=r"p50 .* must not exceed p99"):
        spec.LatencyTarget(p50=100, p99=50)


@pytest.mark.parametrize("key", ["h100_sxm", "mi300x", "l4"])
def test_price_and_node_size_default_to_the_catalog(key):
    group = spec.GpuGroup(gpu=key, count=4)
    gpu = gpus.get_gpu(key)
    assert group.effective_price_per_gpu_hour == gpu.price_per_hour
    assert group.effective_gpus_per_node == gpu.gpus_per_node


def test_a_given_price_and_node_size_win_over_the_catalog():
    group = spec.GpuGroup(gpu="h100_sxm", count=4, price_per_gpu_hour=2.1, gpus_per_node=4)
    assert group.effective_price_per_gpu_hour == 2.1
    assert group.effective_gpus_per_node == 4


@pytest.mark.parametrize(("key", "resource"), [
    ("h100_sxm", "nvidia.com/gpu"), ("b200", "nvidia.com/gpu"), ("mi325x", "amd.com/gpu")])
def test_the_extended_resource_name_defaults_by_vendor(key, resource):
    assert spec.GpuGroup(gpu=key, count=1).effective_resource_name == resource
    custom = spec.GpuGroup(gpu=key, count=1, resource_name="example.com/accel")
    assert custom.effective_resource_name == "example.com/accel"


@pytest.mark.parametrize("alias", ["H100", "h100-sxm", "h100_sxm5"])
def test_gpu_aliases_become_catalog_keys(alias):
    assert spec.GpuGroup(gpu=alias, count=1).gpu == "h100_sxm"


def test_a_pool_finds_a_group_by_alias_and_names_its_keys_when_absent():
    pool = spec.HardwarePool(gpus=[spec.GpuGroup(gpu="h100_sxm", count=8),
                                   spec.GpuGroup(gpu="l40s", count=4)])
    assert pool.group("H100").count == 8
    with pytest.raises(InputError, match="not in the hardware pool; pool: h100_sxm, l40s"):
        pool.group("b200")


def test_a_no_execute_toleration_may_carry_seconds():
    t = spec.Toleration(key="node.kubernetes.io/unreachable", operator="Exists",
                        effect="NoExecute", toleration_seconds=300)
    assert t.toleration_seconds == 300
    assert t.model_dump(by_alias=True, exclude_none=True) == {
        "key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
        "tolerationSeconds": 300}


@pytest.mark.parametrize(("selector", "ok"), [
    ({"kubernetes.io/arch": "amd64"}, True),
    ({"gpu": ""}, True),
    ({"Bad_Prefix/x": "y"}, False),
    ({"gpu": "has space"}, False),
    ({"x" * 64: "y"}, False),
])
def test_node_selector_labels_follow_kubernetes_syntax(selector, ok):
    if ok:
        assert spec.GpuGroup(gpu="l4", count=1, node_selector=selector).node_selector == selector
    else:
        with pytest.raises(pydantic.ValidationError, match="not a valid label"):
            spec.GpuGroup(gpu="l4", count=1, node_selector=selector)


@pytest.mark.parametrize("gpu", gpus.all_gpus(), ids=lambda g: g.key)
def test_every_catalog_gpu_has_a_default_resource_name(gpu):
    assert "/" in spec.GpuGroup(gpu=gpu.key, count=1).effective_resource_name
