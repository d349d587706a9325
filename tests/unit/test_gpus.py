"""GPU catalog: every figure cited, aliases resolve, native formats follow the architecture."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.catalog.gpus import Arch
from trilemma.optimizer.errors import InputError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AIC_SYSTEMS = SHARED / "aic" / "systems"
EXPECTED_KEYS = (
    "a100_sxm", "a100_pcie", "h100_sxm", "h100_pcie", "h200_sxm", "b200_sxm", "b300_sxm",
    "gb200", "gb300", "l40s", "l4", "rtx_pro_6000_server", "mi300x", "mi325x",
)
# Priced from B200's fitted kernels at their own datasheet rates (perf/kernels.py).
EXTRAPOLATED = {"b300_sxm", "gb200", "gb300"}
CALIBRATED = {"a100_sxm", "h100_sxm", "h200_sxm", "b200_sxm", "l40s"}
ALL = gpus.all_gpus()


def _figures(node: object, path: str = ""):
    """Every {value, source} entry and every bare number below `node`, with its path."""
    if isinstance(node, dict):
        if "value" in node:
            yield path, node
            return
        for key, child in node.items():
            yield from _figures(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def test_the_catalog_lists_the_fourteen_gpus_in_file_order():
    assert tuple(g.key for g in ALL) == EXPECTED_KEYS


@pytest.mark.parametrize("path,entry", list(_figures(gpus.load_raw()["gpus"])))
def test_every_figure_in_gpus_yaml_has_a_value_and_a_source(path, entry):
    assert isinstance(entry, dict), f"{path} is a bare number without a citation"
    assert isinstance(entry["value"], (int, float)) and not isinstance(entry["value"], bool)
    assert isinstance(entry.get("source"), str) and len(entry["source"]) > 10, path


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_every_loaded_figure_carries_its_citation(gpu):
    expected = {"memory_bytes", "memory_bw", "intra_node_bw", "inter_node_bw", "gpus_per_node",
                "scale_up_gpus", "tdp_watts", "price_per_hour"}
    expected |= {f"dense_flops.{p}" for p in gpu.dense_flops}
    assert expected <= set(gpu.sources)


@pytest.mark.parametrize("gpu", [g for g in ALL if g.vendor == "amd"], ids=lambda g: g.key)
def test_amd_figures_say_they_come_from_secondary_sources_mlperf_or_an_estimate(gpu):
    for field, source in gpu.sources.items():
        assert any(tag in source for tag in ("secondary", "MLPerf", "estimate")), field


@pytest.mark.parametrize("gpu", [g for g in ALL if g.vendor == "nvidia"], ids=lambda g: g.key)
def test_nvidia_datasheet_figures_cite_aiconfigurator(gpu):
    for field, source in gpu.sources.items():
        if field == "softmax_exp_ratio":  # a published ratio, not an AIC figure
            assert "developer.nvidia.com" in source
        elif field != "price_per_hour":
            assert "AIConfigurator" in source, field


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_a_price_cites_a_page_or_hardware_csv_or_says_it_is_an_estimate(gpu):
    source = gpu.sources["price_per_hour"]
    assert "http" in source or "hardware.csv" in source or source.startswith("estimate:")
    assert 0.1 < gpu.price_per_hour < 20.0


@pytest.mark.parametrize(
    "text,key",
    [
        ("h100", "h100_sxm"),
        ("H100-SXM", "h100_sxm"),
        ("h100 sxm5", "h100_sxm"),
        ("b200", "b200_sxm"),
        ("B200", "b200_sxm"),
        (" H200 ", "h200_sxm"),
        ("a100", "a100_sxm"),
        ("A100-PCIe", "a100_pcie"),
        ("GB200-NVL72", "gb200"),
        ("B300", "b300_sxm"),
        ("hgx-b300", "b300_sxm"),
        ("GB300-NVL72", "gb300"),
        ("rtx-pro-6000", "rtx_pro_6000_server"),
        ("MI300X", "mi300x"),
        ("l40s", "l40s"),
    ],
)
def test_get_gpu_resolves_keys_and_aliases_case_and_separator_insensitively(text, key):
    assert gpus.get_gpu(text).key == key


@pytest.mark.parametrize("text", ["v100", "h100-nvl", "", "b400"])
def test_an_unknown_gpu_raises_input_error_naming_field_value_and_known_keys(text):
    with pytest.raises(InputError) as err:
        gpus.get_gpu(text)
    assert err.value.field == "gpu"
    assert err.value.value == text
    assert "unknown GPU" in err.value.why
    assert all(key in err.value.why for key in EXPECTED_KEYS)


def test_h100_memory_is_the_80_gib_aiconfigurator_plans_with():
    assert gpus.get_gpu("h100").memory_bytes == 85_899_345_920 == 80 * 2**30


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_fp4_is_native_only_on_blackwell(gpu):
    assert gpu.supports("fp4") == (gpu.arch is Arch.BLACKWELL)


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_fp8_is_native_from_ada_hopper_and_mi300_but_not_on_ampere(gpu):
    assert gpu.supports("fp8") == (gpu.arch is not Arch.AMPERE)
    assert gpu.supports("bf16") and gpu.supports("int8")


def test_a100_has_no_fp8():
    for key in ("a100_sxm", "a100_pcie"):
        assert not gpus.get_gpu(key).supports("fp8")
        assert "fp8" not in gpus.get_gpu(key).dense_flops


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_calibrated_marks_exactly_the_gpus_with_measured_kernel_profiles(gpu):
    assert gpu.calibrated == (gpu.key in CALIBRATED)
    if (SHARED / "aic" / "profiles").is_dir():
        assert (SHARED / "aic" / "profiles" / gpu.key).is_dir() == gpu.calibrated


@pytest.mark.parametrize("gpu", ALL, ids=lambda g: g.key)
def test_figures_are_physically_plausible(gpu):
    assert 16 * 2**30 < gpu.memory_bytes < 300 * 2**30
    assert 1e11 < gpu.memory_bw < 1e13
    # Each step down in precision at least keeps the rate: fp8 >= bf16, fp4 >= fp8.
    rates = [gpu.dense_flops[p] for p in ("bf16", "fp8", "fp4") if p in gpu.dense_flops]
    assert rates == sorted(rates)
    # Not asserted: inter_node_bw <= intra_node_bw. AIC gives the PCIe-4 L40S a 400 Gb/s NIC
    # (50 GB/s) above its 32 GB/s PCIe link; we keep AIC's figures as published.
    assert gpu.inter_node_bw > 0
    assert gpu.scale_up_gpus >= gpu.gpus_per_node >= 1


def test_a_gpu_is_frozen_and_its_rate_table_read_only():
    gpu = gpus.get_gpu("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpu.price_per_hour = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        gpu.dense_flops["fp4"] = 1.0  # type: ignore[index]


def test_get_gpu_returns_the_same_cached_object():
    assert gpus.get_gpu("h100") is gpus.get_gpu("h100_sxm")


@pytest.mark.skipif(not AIC_SYSTEMS.is_dir(), reason="../shared/data/aic not present")
@pytest.mark.parametrize("gpu", [g for g in ALL if g.vendor == "nvidia"], ids=lambda g: g.key)
def test_nvidia_figures_match_the_aiconfigurator_system_file(gpu):
    if not (AIC_SYSTEMS / f"{gpu.key}.yaml").is_file():
        # ../shared holds the calibrated GPUs' files and a few more; B300/GB300 are cited
        # from the system files of the same AIC commit upstream.
        assert gpu.key in EXTRAPOLATED and "095f58a5" in gpu.sources["sm_version"]
        return
    aic = yaml.safe_load((AIC_SYSTEMS / f"{gpu.key}.yaml").read_text())
    g, node = aic["gpu"], aic["node"]
    assert gpu.memory_bytes == g["mem_capacity"]
    assert gpu.memory_bw == g["mem_bw"]
    assert gpu.tdp_watts == g["power"]
    assert gpu.sm_version == g["sm_version"]
    assert gpu.dense_flops["bf16"] == g["bfloat16_tc_flops"]
    for ours, theirs in (("fp8", "fp8_tc_flops"), ("int8", "int8_tc_flops"),
                         ("fp4", "fp4_tc_flops")):
        assert gpu.dense_flops.get(ours) == g.get(theirs)
    assert gpu.intra_node_bw == node["intra_node_bw"]
    assert gpu.inter_node_bw == node["inter_node_bw"]
    assert gpu.gpus_per_node == node["num_gpus_per_node"]
    assert gpu.scale_up_gpus == node.get("num_gpus_per_rack", node["num_gpus_per_node"])
    assert gpu.scale_out_bw == node.get("inter_rack_bw", node["inter_node_bw"])
