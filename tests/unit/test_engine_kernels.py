"""An engine's own kernel fits replace whole families of the shared ones, and only those."""

from __future__ import annotations

import numpy as np
import pytest

from trilemma.optimizer.perf import engine_kernels, kernels


def test_an_engine_family_replaces_every_shared_key_of_that_family():
    shared = {"moe/bf16": 1, "moe/fp8": 2, "gemm/bf16": 3, "comm/allreduce/8": 4,
              "mla_decode/bf16/fp8": 5}
    own = {"moe/bf16": "s", "mla_decode_core/fp8": "s"}
    merged = engine_kernels.overlay(shared, own)
    # moe/fp8 goes with its family: a measured SGLang MoE is never mixed with a vLLM one.
    assert merged == {"comm/allreduce/8": 4, "gemm/bf16": 3, "mla_decode_core/fp8": "s",
                      "moe/bf16": "s"}


def test_an_engine_without_fits_of_its_own_sees_the_shared_calibration():
    doc = kernels.calibration()
    assert engine_kernels.gpus(doc, "vllm") == doc["gpus"]
    sglang = engine_kernels.gpus(doc, "sglang")
    assert sglang["a100_sxm"] is doc["gpus"]["a100_sxm"]  # no SGLang tables for A100
    assert sglang["b200_sxm"]["engine"] == "sglang"


def test_sglang_prices_its_own_moe_and_attention_but_shares_the_collectives():
    vllm = kernels.kernel_model("b200_sxm", cuda_graphs=True)
    sglang = kernels.kernel_model("b200_sxm", cuda_graphs=True, engine="sglang")
    assert sglang is not vllm
    moe = (np.array([64.0, 4096.0]), 7168, 2048, 8, 256, 1, 8)
    assert not np.allclose(sglang.moe_ms("fp8_block", *moe), vllm.moe_ms("fp8_block", *moe))
    ctx = (1, 8192, 8192, 64, 8, 128, "bf16")
    assert sglang.context_attention_ms(*ctx) != pytest.approx(vllm.context_attention_ms(*ctx))
    assert sglang.allreduce_ms(8, 2**20) == vllm.allreduce_ms(8, 2**20)


def test_sglang_mla_is_its_measured_kernel_plus_its_own_projection_gemms():
    sglang = kernels.kernel_model("b200_sxm", cuda_graphs=True, engine="sglang")
    assert sglang.provenance("mla_decode", "fp8_block/fp8") == "extrapolated"
    t = sglang.mla_decode_ms("fp8_block", 64, 4096, 16, "fp8")
    assert np.isfinite(t) and t > 0


def test_an_extrapolated_gpu_inherits_the_engines_fits_of_its_sibling():
    from trilemma.optimizer.catalog import gpus
    from trilemma.optimizer.perf.steps import kernels_datasheet

    gpu = gpus.get_gpu("b300_sxm")
    rates = kernels_datasheet(gpu)
    vllm = kernels.kernel_model(gpu.key, datasheet=rates, cuda_graphs=True)
    sglang = kernels.kernel_model(gpu.key, datasheet=rates, cuda_graphs=True, engine="sglang")
    moe = (256.0, 7168, 2048, 8, 256, 1, 8)
    assert sglang.moe_ms("fp4", *moe) != pytest.approx(vllm.moe_ms("fp4", *moe))
    assert sglang.provenance("moe", "fp4") == "extrapolated"
