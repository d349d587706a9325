"""The serving package's public surface, its configs' checks, and what it derives from perf."""

import math

import numpy as np
import pytest

from trilemma.optimizer import serving
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import memory
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.serving import toy

ROOFLINE = toy.RooflineStepModel(models.load_model("meta-llama/Llama-3.1-8B"),
                                 gpus.get_gpu("h100_sxm"), engine_facts())


def test_the_facade_exports_exactly_the_supported_names():
    assert sorted(serving.__all__) == [
        "Balancer", "ClosedLoop", "Cluster", "EngineConfig", "Fixed", "Gamma", "Histogram",
        "KvTransfer", "LoadMode", "Lognormal", "Method", "Offline", "Poisson", "Pool",
        "RequestStream", "SharedPrefixes", "SimResult", "Speculation", "Stats", "StepCost",
        "StepTable", "Summary", "Timestamps", "engine_config", "kv_transfer", "sample_requests",
        "simulate",
    ]
    for name in serving.__all__:
        assert getattr(serving, name) is not None


@pytest.mark.parametrize("over,field", [
    (dict(kv_blocks=0), "kv_blocks"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_batched_tokens"),
    (dict(block_size=0), "block_size"),
    (dict(tp=True), "tp"),
    (dict(dp=1.5), "dp"),
])
def test_engine_config_rejects_bad_limits_naming_the_field(over, field):
    with pytest.raises(InputError) as err:
        serving.EngineConfig(**{"kv_blocks": 100, **over})
    assert err.value.field == field


def test_speculation_caps_the_batch_at_what_the_token_budget_can_verify():
    spec = serving.Speculation(config=SpecConfig(method=SpecMethod.EAGLE3, k=3), acceptance=0.6)
    e = serving.EngineConfig(kv_blocks=100, max_num_seqs=1024, max_num_batched_tokens=2048,
                             speculation=spec)
    assert e.tokens_per_decode == 4 and e.seats == 512
    assert serving.EngineConfig(kv_blocks=100, max_num_seqs=256).seats == 256


@pytest.mark.parametrize("spec,acceptance,draft", [
    (SpecConfig(method=SpecMethod.NONE, k=0), 0.5, None),
    (SpecConfig(method=SpecMethod.NGRAM, k=2), 1.5, None),
    (SpecConfig(method=SpecMethod.DRAFT, k=2, draft_model="meta-llama/Llama-3.2-1B"), 0.5, None),
    (SpecConfig(method=SpecMethod.EAGLE, k=2), 0.5, ROOFLINE),
])
def test_speculation_rejects_inconsistent_settings(spec, acceptance, draft):
    with pytest.raises(InputError):
        serving.Speculation(config=spec, acceptance=acceptance, draft=draft)


def test_speculation_takes_its_acceptance_from_the_catalog_fit():
    s = serving.Speculation.for_workload(SpecConfig(method=SpecMethod.EAGLE3, k=3), 0.5)
    from trilemma.optimizer.catalog import speculation
    assert s.acceptance == pytest.approx(
        float(speculation.acceptance_rate(SpecMethod.EAGLE3, 0.5)))


def test_a_disaggregated_cluster_needs_both_a_prefill_pool_and_a_link():
    pool = serving.Pool(engine=serving.EngineConfig(kv_blocks=100))
    with pytest.raises(InputError):
        serving.Cluster(pool=pool, prefill=pool)
    with pytest.raises(InputError):
        serving.Cluster(pool=pool, transfer=serving.KvTransfer(bytes_per_token=1.0,
                                                               bandwidth=1.0))
    with pytest.raises(InputError):
        serving.Pool(engine=pool.engine, replicas=0)


def test_engine_config_takes_vllms_limits_and_the_kv_that_memory_leaves():
    e = serving.engine_config(ROOFLINE)
    facts = engine_facts()
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.block_size) == (1024, 8192, 16)
    mem = memory.breakdown(ROOFLINE.arch, ROOFLINE.gpu, ROOFLINE.recipe, ROOFLINE.kv, facts,
                           tp=1, pp=1, dp=1, seq_len=16, max_batched_tokens=8192,
                           max_num_seqs=1024)
    per_block = float(mem.kv_bytes_per_token) * 16
    assert e.kv_blocks == math.floor(float(mem.kv_cache) / per_block)
    # More GPUs for the same model: more room for KV on each.
    assert serving.engine_config(ROOFLINE, tp=2).kv_blocks > 2 * e.kv_blocks


def test_kv_transfer_uses_nvlink_within_a_node_and_the_nic_across_nodes():
    intra = serving.kv_transfer(ROOFLINE, tp=1, inter_node=False)
    inter = serving.kv_transfer(ROOFLINE, tp=1, inter_node=True)
    assert intra.bandwidth == ROOFLINE.gpu.intra_node_bw
    assert inter.bandwidth == ROOFLINE.gpu.inter_node_bw
    assert intra.bytes_per_token == 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B, bf16 KV
    assert inter.ms(4096) > intra.ms(4096) > intra.latency_ms


def test_the_prefill_pool_must_hold_the_longest_prompt():
    w = serving.sample_requests(np.random.default_rng(0), requests=5,
                                prompt_tokens=serving.Fixed(tokens=4000),
                                output_tokens=serving.Fixed(tokens=10), arrivals=serving.Offline())
    small = serving.Pool(engine=serving.EngineConfig(kv_blocks=100))
    cluster = serving.Cluster(pool=serving.Pool(engine=serving.EngineConfig(kv_blocks=1000)),
                              prefill=small,
                              transfer=serving.KvTransfer(bytes_per_token=1e5, bandwidth=1e11))
    with pytest.raises(InputError) as err:
        serving.simulate(cluster, w, ROOFLINE, np.random.default_rng(0))
    assert err.value.field == "prefill.kv_blocks"


def test_result_statistics_skip_undefined_tpot_and_check_their_arguments():
    w = serving.RequestStream(prompt_tokens=np.full(4, 100), output_tokens=np.array([1, 1, 5, 5]),
                              prefix_id=np.full(4, -1), prefix_tokens=np.zeros(4),
                              arrival_ms=np.array([0.0, 1000.0, 2000.0, 3000.0]))
    res = serving.simulate(serving.Cluster(pool=serving.Pool(engine=serving.EngineConfig(
        kv_blocks=100))), w, toy.LinearStepModel(), np.random.default_rng(0))
    assert np.isnan(res.tpot_ms[:2]).all() and np.isfinite(res.tpot_ms[2:]).all()
    assert res.summary().tpot_ms.mean == pytest.approx(np.nanmean(res.tpot_ms))
    assert res.goodput(tpot_ms=0.001) == 0.5  # one-token answers cannot miss a TPOT target
    with pytest.raises(InputError):
        res.goodput()
    with pytest.raises(InputError):
        res.steady(warmup=0.6, cooldown=0.5)
    with pytest.raises(InputError):
        res.mean_in_system(5.0, 5.0)
