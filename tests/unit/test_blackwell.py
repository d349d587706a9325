"""Blackwell Ultra and rack-scale NVLink: B300, GB200, GB300 priced from B200's fitted kernels
at their own datasheet rates, an NVL72 rack as one NVLink domain in the collectives, the
search and the renderer."""

from __future__ import annotations

import numpy as np
import pytest

from trilemma.optimizer import render
from trilemma.optimizer.catalog import QuantRecipe, gpus
from trilemma.optimizer.perf import estimate, kernels
from trilemma.optimizer.perf.steps import kernels_datasheet
from trilemma.optimizer.search import planning, space
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig
from trilemma.optimizer.spec import parse_spec

ULTRA = ("b300_sxm", "gb300")
EXTRAPOLATED = ("b300_sxm", "gb200", "gb300")
DSV3 = "deepseek-ai/DeepSeek-V3"


def _km(key: str) -> kernels.KernelModel:
    gpu = gpus.get_gpu(key)
    return kernels.kernel_model(gpu.key, datasheet=kernels_datasheet(gpu), cuda_graphs=True)


# --- catalog ---------------------------------------------------------------------------------

@pytest.mark.parametrize("key", EXTRAPOLATED)
def test_rack_scale_and_ultra_gpus_cite_every_figure_and_name_their_calibrated_sibling(key):
    gpu = gpus.get_gpu(key)
    assert gpu.extrapolated_from == "b200_sxm" and gpus.get_gpu("b200_sxm").calibrated
    assert not gpu.calibrated and gpu.kernels == "extrapolated from b200_sxm"
    for field in ("memory_bytes", "memory_bw", "dense_flops.bf16", "dense_flops.fp8",
                  "dense_flops.fp4", "intra_node_bw", "scale_up_gpus", "price_per_hour"):
        assert len(gpu.sources[field]) > 20, field
    # NVLink 5: 1.8 TB/s bidirectional per GPU.
    assert gpu.intra_node_bw == 900e9


def test_the_nvlink_domain_is_the_node_on_hgx_and_the_rack_on_nvl72():
    for key, per_node, domain in (("b300", 8, 8), ("h100", 8, 8), ("gb200", 4, 72),
                                  ("gb300", 4, 72)):
        gpu = gpus.get_gpu(key)
        assert (gpu.gpus_per_node, gpu.scale_up_gpus) == (per_node, domain)
        assert gpu.nvlink_reach(gpu.gpus_per_node) == domain
    # Past the rack only the scale-out network (800 Gb/s per GPU) remains.
    assert gpus.get_gpu("gb300").scale_out_bw == 100e9
    assert gpus.get_gpu("h100").scale_out_bw == gpus.get_gpu("h100").inter_node_bw


@pytest.mark.parametrize("key", ULTRA)
def test_blackwell_ultra_has_1_5x_dense_fp4_more_memory_and_a_doubled_sfu(key):
    ultra, base = gpus.get_gpu(key), gpus.get_gpu("gb200" if key == "gb300" else "b200")
    assert ultra.dense_flops["fp4"] / base.dense_flops["fp4"] == pytest.approx(1.5, rel=0.06)
    assert ultra.dense_flops["bf16"] == base.dense_flops["bf16"]
    assert ultra.memory_bytes > 1.45 * base.memory_bytes
    assert ultra.softmax_exp_ratio == 2.0 and base.softmax_exp_ratio == 1.0
    assert ultra.sm_version == 103


# --- kernels: B200's fits at the sibling's rates ---------------------------------------------

@pytest.mark.parametrize("key", EXTRAPOLATED)
def test_every_family_on_an_extrapolated_gpu_says_extrapolated(key):
    km = _km(key)
    for family, kernel in (("gemm", "fp4"), ("gemm", "bf16"), ("moe", "fp8_block"),
                           ("attention", "fp8"), ("mla", "fp8_block/fp8"), ("comm", "allreduce"),
                           ("p2p", "intra")):
        assert km.provenance(family, kernel) == "extrapolated", family


def test_a_compute_bound_fp4_gemm_scales_with_the_fp4_peak_and_a_decode_read_with_bandwidth():
    b200, b300 = _km("b200_sxm"), _km("b300_sxm")
    ratio = float(b300.gemm_ms("fp4", 16384, 16384, 16384) / b200.gemm_ms("fp4", 16384, 16384,
                                                                          16384))
    # The FLOP term scales by 9/14; the activation-quantization pass and launch do not.
    assert 9 / 14 * 0.999 < ratio < 0.72
    # bf16 peaks are equal: the same GEMM costs the same (HBM 7.75 vs 7.7 TB/s aside).
    assert float(b300.gemm_ms("bf16", 4096, 8192, 8192)) == pytest.approx(
        float(b200.gemm_ms("bf16", 4096, 8192, 8192)), rel=1e-3)
    # A memory-bound decode attention follows HBM bandwidth (7.75 vs 7.7 TB/s), not the SFU.
    args = (256, 8192, 64, 8, 128, "bf16")
    assert float(b300.decode_attention_ms(*args)) == pytest.approx(
        float(b200.decode_attention_ms(*args)) * 7.7 / 7.75, rel=0.01)


def test_the_doubled_sfu_speeds_up_long_prefill_attention_on_blackwell_ultra_only():
    args = (1, 32768, 32768, 64, 8, 128, "bf16")
    b200, b300 = (float(_km(k).context_attention_ms(*args)) for k in ("b200_sxm", "b300_sxm"))
    assert 1.2 < b200 / b300 < 2.0
    # GB200 vs B200: only the clock (bf16 2.5 vs 2.25 PF), well under the SFU's gain.
    gb200 = float(_km("gb200").context_attention_ms(*args))
    assert 1.0 < b200 / gb200 < 1.12


def test_int8_follows_blackwell_ultras_cut_int8_rate():
    b200, b300 = _km("b200_sxm"), _km("b300_sxm")
    shape = (8192, 8192, 8192)
    assert float(b300.gemm_ms("int8", *shape)) > 10 * float(b200.gemm_ms("int8", *shape))


# --- collectives: an NVL72 rack is one NVLink domain -----------------------------------------

def test_collectives_inside_an_nvl72_rack_stay_at_nvlink_speed():
    msg = 64 * 2**20
    gb200, h100 = _km("gb200"), _km("h100_sxm")
    for op in ("allreduce", "allgather", "reduce_scatter"):
        f = getattr(gb200, f"{op}_ms")
        eight, sixteen, seventy_two = (float(f(n, msg)) for n in (8, 16, 72))
        assert eight < sixteen < 1.25 * eight
        assert seventy_two < 1.35 * eight
        # Past the rack the scale-out network (100 GB/s per GPU) is crossed.
        assert float(f(144, msg)) > 3 * seventy_two
        g = getattr(h100, f"{op}_ms")
        assert float(g(16, msg)) > 3 * float(g(8, msg))


def test_hgx_collectives_are_unchanged_by_the_domain_model():
    # B200 is calibrated: its table comes from calibration.json's sheet (no domain fields).
    km = _km("b200_sxm")
    sheet = {"inter_node_bw": 100e9, "p2p_latency_ms": 0.01}
    msg = 8 * 2**20
    eight = float(km.allreduce_ms(8, msg))
    expected = eight + sheet["p2p_latency_ms"] + 1e3 * 2.0 * msg / sheet["inter_node_bw"]
    assert float(km.allreduce_ms(16, msg)) == pytest.approx(expected, rel=1e-9)


def test_expert_parallel_16_on_gb200_is_priced_at_nvlink_and_on_h100_across_nodes():
    """DeepSeek-V3, TP4 x DP4 with EP: the 16-GPU all-gather/reduce-scatter around each MoE
    layer and the TP all-reduces, per decode step."""
    comm = {}
    for key in ("gb200", "h100_sxm"):
        for dp in (2, 4):
            cfg = estimate.resolve(model=DSV3, gpu=key, tp=4, dp=dp, ep=True)
            sm = estimate.step_model(cfg)
            t = sm.step(tp=4, dp=dp, ep=True, pp=1, dec_seqs=np.float64(64 * dp),
                        dec_kv=np.float64(4096))
            comm[key, dp] = float(t.comm)
    # EP8 -> EP16: on the rack the group stays on NVLink; on H100 it leaves the 8-GPU node.
    assert comm["gb200", 4] < 2.5 * comm["gb200", 2]
    assert comm["h100_sxm", 4] > 4 * comm["h100_sxm", 2]
    assert comm["h100_sxm", 4] > 3 * comm["gb200", 4]
    cfg = estimate.resolve(model=DSV3, gpu="gb200", tp=4, dp=4, ep=True)
    prov = estimate.provenance(cfg)
    assert prov.pop("kernels") == "extrapolated from b200_sxm"
    assert set(prov.values()) == {"extrapolated"}


# --- search and render -----------------------------------------------------------------------

def _request(gpu: str, count: int):
    return parse_spec({
        "model": {"id": DSV3},
        "workload": {"promptTokens": {"kind": "fixed", "value": 2000},
                     "outputTokens": {"kind": "fixed", "value": 500},
                     "arrivals": {"kind": "poisson", "requestsPerSecond": 20}},
        "slo": {"ttftMs": {"p90": 3000}, "tpotMs": {"p90": 60}},
        "hardware": {"gpus": [{"gpu": gpu, "count": count}]},
        "objective": "min_cost"})


def test_the_search_spans_trays_of_an_nvl72_rack_but_not_hgx_nodes():
    settings = space.SearchSettings(pp=(1,), spec_k=(2,), max_num_seqs=(256,),
                                    max_num_batched_tokens=(8192,))
    gb = space.enumerate_space(_request("gb200", 72), settings)
    layouts = {(int(t), int(d)) for r in gb.rows for t, d in zip(r.tp, r.dp, strict=True)}
    assert (16, 1) in layouts and (8, 1) in layouts
    # vLLM cannot deploy data-parallel ranks over several pods: DP stays inside a tray.
    assert all(t * d <= 4 for t, d in layouts if d > 1)
    # DeepSeek-V3 needs two H100 nodes: PP crosses them, TP and DP stay in one.
    h = space.enumerate_space(_request("h100_sxm", 64), space.SearchSettings(
        **{**settings.__dict__, "pp": (1, 2)}))
    widths = {int(t) * int(d) for r in h.rows for t, d in zip(r.tp, r.dp, strict=True)}
    assert widths and max(widths) <= 8 and h.pruned["nodes"] > 0


def test_optimize_with_a_gb300_pool_yields_a_plan_that_says_it_is_extrapolated():
    settings = space.SearchSettings(pp=(1,), spec_k=(2,), pd_ratios=((1, 1),),
                                    max_num_seqs=(256, 1024), max_num_batched_tokens=(8192,),
                                    simulate_top_k=1, simulate_front=0, simulate_requests=200,
                                    explain_sensitivity=False, workers=1)
    plan = planning.plan(_request("gb300", 72), settings=settings)
    assert plan.recommended.config.worker.gpu == "gb300"
    assert plan.recommended.prediction.provenance["kernels"] == "extrapolated from b200_sxm"
    assert all(c.config.worker.gpu == "gb300" for c in plan.front)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("tp,pp", [(16, 1), (8, 2)])
def test_a_16_gpu_gb200_replica_renders_as_a_leader_worker_set_of_four_trays(engine, tp, pp):
    cfg = ServingConfig(model=DSV3, worker=WorkerConfig(gpu="gb200", tp=tp, pp=pp,
                                                        ep=True, quant=QuantRecipe.FP8))
    lws = render.manifests(cfg, name="ds", engine=engine)[0]
    assert lws["kind"] == "LeaderWorkerSet"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 4
    for role in ("leaderTemplate", "workerTemplate"):
        container = template[role]["spec"]["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
