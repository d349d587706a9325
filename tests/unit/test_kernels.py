"""Kernel cost runtime: physical monotonicity, vectorization, provenance and the datasheet path."""

from __future__ import annotations

import time

import numpy as np
import pytest

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import kernel_forms, kernels

CALIBRATED = ("a100_sxm", "b200_sxm", "h100_sxm", "h200_sxm", "l40s")
MI300X = kernels.DatasheetRates(dense_flops={"bf16": 1.307e15, "fp8": 2.615e15, "int8": 2.615e15},
                                memory_bw=5.3e12, intra_node_bw=448e9, inter_node_bw=50e9)
A100_PCIE = kernels.DatasheetRates(dense_flops={"bf16": 312e12, "int8": 624e12},
                                   memory_bw=1.935e12, intra_node_bw=32e9, inter_node_bw=25e9)


def model(gpu: str) -> kernels.KernelModel:
    if gpu == "mi300x":
        return kernels.kernel_model(gpu, datasheet=MI300X)
    if gpu == "a100_pcie":
        return kernels.kernel_model(gpu, datasheet=A100_PCIE)
    return kernels.kernel_model(gpu)


ALL_GPUS = (*CALIBRATED, "mi300x", "a100_pcie")
M = np.array([1, 2, 8, 32, 128, 512, 2048, 8192, 32768], dtype=float)


def test_the_calibrated_gpus_are_the_five_aiconfigurator_measured():
    assert kernels.calibrated_gpus() == CALIBRATED
    for gpu in CALIBRATED:
        assert model(gpu).calibrated and model(gpu).gpu == gpu


def test_kernel_models_are_cached_per_gpu():
    assert kernels.kernel_model("h100_sxm") is kernels.kernel_model("h100_sxm")
    assert model("mi300x") is model("mi300x")


# --- Monotonic, physical behaviour ---------------------------------------------------------------

@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("kernel", kernels.GEMM_KERNELS)
@pytest.mark.parametrize("n,k", [(4096, 4096), (1280, 8192), (28672, 8192), (256, 7168)])
def test_more_tokens_never_make_a_gemm_faster(gpu, kernel, n, k):
    t = model(gpu).gemm_ms(kernel, M, n, k)
    assert np.all(np.isfinite(t)) and np.all(t > 0)
    assert np.all(np.diff(t) >= -1e-12 * t[1:])


@pytest.mark.parametrize("gpu", ALL_GPUS)
def test_bigger_weights_never_make_a_gemm_faster(gpu):
    km = model(gpu)
    for kernel in kernels.GEMM_KERNELS:
        assert np.all(np.diff(km.gemm_ms(kernel, 64, [1024, 4096, 16384], 4096)) > 0)
        assert np.all(np.diff(km.gemm_ms(kernel, 64, 4096, [1024, 4096, 16384])) > 0)


@pytest.mark.parametrize("gpu", ["h100_sxm", "h200_sxm", "b200_sxm"])
@pytest.mark.parametrize("m", [2048, 8192, 32768])
def test_fp8_gemms_beat_bf16_at_large_sizes(gpu, m):
    km = model(gpu)
    assert km.gemm_ms("fp8", m, 8192, 8192) < km.gemm_ms("bf16", m, 8192, 8192)
    # Block-scaled fp8 pays a ~0.1-0.2 ms host-side floor (DeepGEMM), as measured: it only
    # wins once the GEMM is long enough to hide it.
    big = 4 * m
    assert km.gemm_ms("fp8_block", big, 8192, 8192) < km.gemm_ms("bf16", big, 8192, 8192)


@pytest.mark.parametrize("gpu", ALL_GPUS)
def test_four_bit_weights_speed_up_small_batch_gemms(gpu):
    km = model(gpu)
    assert km.gemm_ms("w4a16", 1, 8192, 8192) < km.gemm_ms("bf16", 1, 8192, 8192)


@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
@pytest.mark.parametrize("window", [0, 4096])
def test_longer_context_never_makes_decode_attention_faster(gpu, kv, window):
    kv_len = np.array([16, 256, 1024, 4096, 16384, 65536, 131072], dtype=float)
    t = model(gpu).decode_attention_ms(32, kv_len, 32, 8, 128, kv, window)
    assert np.all(np.diff(t) >= 0)
    if window:  # past the window the read stops growing
        assert t[-1] == pytest.approx(t[-3], rel=1e-9)


@pytest.mark.parametrize("gpu", [g for g in ALL_GPUS if g not in ("a100_sxm", "a100_pcie")])
@pytest.mark.parametrize("batch,kv_len", [(64, 8192), (256, 4096), (32, 32768)])
def test_fp8_kv_decodes_no_slower_than_bf16_at_large_batch_times_context(gpu, batch, kv_len):
    km = model(gpu)
    fp8 = km.decode_attention_ms(batch, kv_len, 32, 8, 128, "fp8")
    bf16 = km.decode_attention_ms(batch, kv_len, 32, 8, 128, "bf16")
    assert fp8 <= bf16


@pytest.mark.parametrize("gpu", ALL_GPUS)
def test_prefill_attention_grows_with_prompt_and_cached_prefix(gpu):
    km = model(gpu)
    q = np.array([128, 512, 2048, 8192, 32768], dtype=float)
    assert np.all(np.diff(km.context_attention_ms(1, q, q, 32, 8, 128, "bf16")) > 0)
    fresh = km.context_attention_ms(1, 2048, 2048, 32, 8, 128, "bf16")
    cached = km.context_attention_ms(1, 2048, 16384, 32, 8, 128, "bf16")
    assert cached > fresh
    windowed = km.context_attention_ms(1, 32768, 32768, 32, 8, 128, "bf16", 4096)
    assert windowed < km.context_attention_ms(1, 32768, 32768, 32, 8, 128, "bf16")


@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("kernel", kernels.MOE_KERNELS)
def test_more_tokens_never_make_a_moe_layer_faster(gpu, kernel):
    tokens = np.array([1, 8, 64, 512, 4096, 16384], dtype=float)
    for imbalance in kernel_forms.DISTRIBUTIONS:
        t = model(gpu).moe_ms(kernel, tokens, 7168, 2048, 8, 256, 1, 8, imbalance)
        assert np.all(np.isfinite(t)) and np.all(np.diff(t) > 0)


@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("ep", [1, 8, 64])
def test_skewed_routing_is_no_faster_than_balanced_once_every_expert_is_hit(gpu, ep):
    km = model(gpu)
    balanced = km.moe_ms("bf16", 16384, 4096, 1536, 8, 128, 1, ep, "balanced")
    assert km.moe_ms("bf16", 16384, 4096, 1536, 8, 128, 1, ep, "power_law_1.01") >= balanced


def test_expert_parallel_moe_pays_its_own_floor():
    # gpt-oss MXFP4 experts on H100 (AIConfigurator's table): one token costs ~39 us with the
    # experts split by TP and ~67 us split by EP; a single launch term sat at 63 us for both.
    km = model("h100_sxm")
    tp8 = float(km.moe_ms("mxfp4", 1, 2880, 2880, 4, 128, 8, 1))
    ep8 = float(km.moe_ms("mxfp4", 1, 2880, 2880, 4, 128, 1, 8))
    assert tp8 == pytest.approx(0.039, rel=0.25)
    assert ep8 == pytest.approx(0.067, rel=0.25)



@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("op", ["allreduce", "allgather", "reduce_scatter", "alltoall"])
def test_collectives_grow_with_message_size_and_cost_nothing_alone(gpu, op):
    fn = getattr(model(gpu), f"{op}_ms")
    sizes = np.logspace(3, 9, 13)
    for n in (2, 4, 8, 16):
        t = fn(n, sizes)
        assert np.all(np.diff(t) > 0)
    assert np.all(fn(1, sizes) == 0)


@pytest.mark.parametrize("gpu", ALL_GPUS)
def test_crossing_nodes_is_slower_than_staying_inside_one(gpu):
    km = model(gpu)
    assert km.allreduce_ms(16, 64e6) > km.allreduce_ms(8, 64e6)
    if gpu not in ("l40s", "a100_pcie"):  # PCIe inside the node is slower than the NIC
        assert km.p2p_ms(64e6, True) > km.p2p_ms(64e6, False)


@pytest.mark.parametrize("gpu", ALL_GPUS)
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_mla_modules_grow_with_context_and_heads(gpu, kv):
    km = model(gpu)
    lengths = np.array([128, 1024, 8192, 32768], dtype=float)
    for gemm in ("bf16", "fp8_block"):
        assert np.all(np.diff(km.mla_context_ms(gemm, 1, lengths, 16, kv)) > 0)
        assert np.all(np.diff(km.mla_decode_ms(gemm, 64, lengths, 16, kv)) > 0)
        assert km.mla_decode_ms(gemm, 64, 4096, 128, kv) > km.mla_decode_ms(gemm, 64, 4096,
                                                                            16, kv)


def test_a_faster_datasheet_predicts_faster_kernels():
    slow = model("a100_pcie")
    fast = model("mi300x")
    assert fast.gemm_ms("bf16", 4096, 8192, 8192) < slow.gemm_ms("bf16", 4096, 8192, 8192)
    assert fast.decode_attention_ms(64, 8192, 32, 8, 128, "bf16") < slow.decode_attention_ms(
        64, 8192, 32, 8, 128, "bf16")


# --- Vectorization ----------------------------------------------------------------------------

def _elementwise(fn, *args):
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in args])
    return np.array([float(fn(*[a.flat[i] for a in arrays])) for i in range(arrays[0].size)])


CALLS = {
    "gemm": lambda km: (lambda m, n, k: km.gemm_ms("fp8", m, n, k),
                        ([1, 17, 300, 5000], [4096], [[1024], [7168]])),
    "context": lambda km: (lambda b, q, kv, w: km.context_attention_ms(b, q, kv, 32, 8, 128,
                                                                       "fp8", w),
                           ([1, 4, 16], [[64], [2048]], [4096], [0, 0, 128])),
    "decode": lambda km: (lambda b, kv, h: km.decode_attention_ms(b, kv, h, 8, 128, "bf16"),
                          ([1, 64, 512], [[100], [30000]], [8, 32, 64])),
    "moe": lambda km: (lambda t, ep: km.moe_ms("fp8", t, 7168, 2048, 8, 256, 8 / ep, ep),
                       ([1, 100, 5000], [[1], [8]])),
    "mla": lambda km: (lambda b, s: km.mla_decode_ms("bf16", b, s, 16, "fp8"),
                       ([1, 32, 256], [[512], [8192]])),
    "allreduce": lambda km: (km.allreduce_ms, ([1, 2, 4, 6, 8, 16], [[1e3], [1e8]])),
    "alltoall": lambda km: (km.alltoall_ms, ([2, 8, 32], [[4e3], [4e7]])),
    "p2p": lambda km: (lambda b, inter: km.p2p_ms(b, inter), ([1e3, 1e6, 1e9], [[0], [1]])),
}


@pytest.mark.parametrize("gpu", ["h100_sxm", "a100_sxm", "l40s", "mi300x"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_vectorized_call_equals_elementwise_scalar_calls(gpu, name):
    fn, args = CALLS[name](model(gpu))
    vector = fn(*[np.asarray(a, dtype=float) for a in args])
    expected = _elementwise(fn, *args)
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float64
    assert vector.shape == np.broadcast_shapes(*[np.shape(a) for a in args])
    np.testing.assert_allclose(vector.ravel(), expected, rtol=1e-12)


def test_scalar_arguments_give_a_zero_dimensional_float64_array():
    t = model("h100_sxm").gemm_ms("bf16", 128, 4096, 4096)
    assert isinstance(t, np.ndarray) and t.shape == () and t.dtype == np.float64


def test_a_hundred_thousand_candidates_price_in_a_few_milliseconds():
    km = model("h100_sxm")
    m = np.linspace(1, 16384, 100_000)
    km.gemm_ms("fp8", m, 8192, 8192)  # warm the resolution cache
    start = time.perf_counter()
    km.gemm_ms("fp8", m, 8192, 8192)
    km.decode_attention_ms(m, 4096, 32, 8, 128, "bf16")
    km.moe_ms("fp8", m, 7168, 2048, 8, 256, 1, 8)
    km.allreduce_ms(8, m * 16384)
    assert time.perf_counter() - start < 0.25


# --- Provenance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu,family,kernel,expected", [
    ("h100_sxm", "gemm", "bf16", "fitted"),
    ("h100_sxm", "gemm", "fp8_block", "fitted"),
    ("h100_sxm", "gemm", "w4a16", "extrapolated"),
    ("h100_sxm", "gemm", "int8", "extrapolated"),
    ("h100_sxm", "gemm", "fp4", "extrapolated"),
    ("b200_sxm", "gemm", "fp4", "fitted"),
    ("a100_sxm", "gemm", "fp8", "extrapolated"),
    ("l40s", "gemm", "fp8_block", "fitted"),
    ("h100_sxm", "context_attention", "fp8", "fitted"),
    ("a100_sxm", "decode_attention", "fp8", "extrapolated"),
    ("a100_sxm", "attention", "bf16", "fitted"),
    ("h100_sxm", "moe", "w4a16", "fitted"),
    ("h100_sxm", "moe", "int8", "extrapolated"),
    ("a100_sxm", "moe", "fp8", "extrapolated"),
    ("h100_sxm", "mla_decode", "fp8_block/fp8", "fitted"),
    ("h100_sxm", "mla", "bf16", "fitted"),
    ("h100_sxm", "mla_context", "fp4/bf16", "extrapolated"),
    ("a100_sxm", "mla_context", "bf16/bf16", "extrapolated"),
    ("l40s", "allreduce", "", "fitted"),
    ("h100_sxm", "comm", "allreduce", "fitted"),
    ("h100_sxm", "p2p", "intra", "extrapolated"),
    ("h100_sxm", "p2p", "inter", "datasheet"),
    ("mi300x", "gemm", "bf16", "datasheet"),
    ("mi300x", "gemm", "fp4", "datasheet"),
    ("mi300x", "moe", "fp8", "datasheet"),
    ("mi300x", "allreduce", "", "datasheet"),
    ("a100_pcie", "gemm", "fp8", "datasheet"),
])
def test_provenance_says_how_each_number_was_obtained(gpu, family, kernel, expected):
    assert model(gpu).provenance(family, kernel) == expected


def test_an_extrapolated_w4a16_gemm_is_the_bf16_fit_reading_four_bit_weights():
    km = model("h100_sxm")
    # Compute-bound: the same as bf16. Memory-bound (m = 1): about a quarter of the bytes.
    assert km.gemm_ms("w4a16", 16384, 8192, 8192) == pytest.approx(
        km.gemm_ms("bf16", 16384, 8192, 8192), rel=0.05)
    assert km.gemm_ms("w4a16", 1, 16384, 16384) < 0.5 * km.gemm_ms("bf16", 1, 16384, 16384)


def test_a100_mla_is_the_measured_attention_kernel_plus_its_projection_gemms():
    km = model("a100_sxm")
    module = km.mla_decode_ms("bf16", 64, 4096, 16, "bf16")
    gemms = km._mla_projections("bf16", np.float64(64.0), np.float64(16.0))
    assert module > gemms > 0


def test_a_datasheet_gpu_is_labelled_and_uncalibrated():
    km = model("mi300x")
    assert not km.calibrated
    assert km.provenance("decode_attention", "fp8") == "datasheet"
    assert np.isfinite(km.mla_context_ms("bf16", 2, 4096, 16, "bf16"))


def test_a_datasheet_without_fp8_prices_fp8_as_weight_only():
    km = model("a100_pcie")
    # Marlin-style W8A16: the bf16 compute rate, so never faster than bf16 when compute-bound.
    assert km.gemm_ms("fp8", 16384, 8192, 8192) >= 0.95 * km.gemm_ms("bf16", 16384, 8192, 8192)
    assert km.gemm_ms("fp8", 1, 8192, 8192) < km.gemm_ms("bf16", 1, 8192, 8192)


# --- Errors --------------------------------------------------------------------------------------

def test_an_unknown_gpu_without_a_datasheet_is_an_input_error_naming_the_field():
    with pytest.raises(InputError) as info:
        kernels.kernel_model("tpu_v5")
    assert info.value.field == "gpu"


@pytest.mark.parametrize("call,field", [
    (lambda km: km.gemm_ms("int3", 1, 1, 1), "kernel"),
    (lambda km: km.moe_ms("nope", 1, 1024, 1024, 2, 8, 1, 1), "kernel"),
    (lambda km: km.decode_attention_ms(1, 1, 8, 8, 128, "fp16"), "kv_dtype"),
    (lambda km: km.moe_ms("bf16", 1, 1024, 1024, 2, 8, 1, 1, "zipf"), "imbalance"),
    (lambda km: km.mla_decode_ms("int3", 1, 1, 8, "bf16"), "kernel"),
    (lambda km: km.provenance("gemm", "int3"), "kernel"),
])
def test_bad_kernel_names_are_input_errors(call, field):
    with pytest.raises(InputError) as info:
        call(model("h100_sxm"))
    assert info.value.field == field


# --- The shared forms ----------------------------------------------------------------------------

@pytest.mark.parametrize("kv,q,w", [(10, 10, 0), (10, 3, 0), (10, 10, 4), (50, 7, 4), (5, 5, 9)])
def test_causal_pairs_count_what_a_mask_allows(kv, q, w):
    allowed = sum(1 for i in range(kv - q + 1, kv + 1) for j in range(1, i + 1)
                  if w <= 0 or i - j < w)
    got = kernel_forms.causal_pairs(np.float64(kv), np.float64(q), np.float64(w))
    assert got == allowed


def test_a_collective_takes_the_faster_of_its_two_algorithms():
    x = (0.005, 1e10, 0.05, 1e12)
    t = kernel_forms.collective_ms(x, np.array([1e3, 1e9]))
    assert t[0] == pytest.approx(0.005 + 1e-4, rel=0.05)
    assert t[1] == pytest.approx(0.05 + 1.0, rel=0.05)


def test_a_graph_replayed_kernel_keeps_a_device_floor_its_fit_could_not_separate():
    # B200's block-fp8 GEMM profile is host-bound at small shapes: its fitted launch_ms sits
    # on the lower bound. Under CUDA graphs it keeps the GPU's identified device floor.
    from trilemma.optimizer.perf import graph_floor, kernels
    fits = kernels.calibration()["gpus"]["b200_sxm"]["fits"]
    floor = graph_floor.device_floor_ms(fits)
    assert 0.003 < floor < 0.02
    assert fits["gemm/fp8_block"]["params"]["launch_ms"] <= graph_floor.COLLAPSED_MS
    km = kernels.kernel_model("b200_sxm", cuda_graphs=True)
    # (the collapsed fit alone would price it at ~0.1 us plus its bytes)
    assert float(km.gemm_ms("fp8_block", 1.0, 1024.0, 1024.0)) > 0.8 * floor
