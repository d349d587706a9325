"""DeepEP under SGLang: fitted to its measured dispatch/combine, priced and rendered as one rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.models import load_model
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf import deepep, kernel_forms, kernels
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.perf.steps import StepModel, kernels_datasheet
from trilemma.optimizer.render import sglang_flags
from trilemma.optimizer.search.configs import WorkerConfig

DEEPSEEK = load_model("deepseek-ai/DeepSeek-R1")
SGLANG = engine_facts(Engine.SGLANG)

# AIConfigurator 0.12.0 wheel, aiconfigurator_core/systems/data/<gpu>/comm/sglang/0.5.12/
# wideep_deepep_{normal,ll}_perf.parquet: hidden 7168, top-8 of 256 experts, one 8-GPU node,
# normal mode on 20 SMs; (tokens per rank, dispatch us, combine us).
MEASURED = {
    ("b200_sxm", "normal"): ((128, 57.72, 86.95), (1024, 174.02, 296.42), (8192, 977.06, 1643.90)),
    ("b200_sxm", "low_latency"): ((8, 22.28, 22.78), (64, 26.61, 31.45), (256, 44.50, 62.91)),
    ("h100_sxm", "normal"): ((128, 50.11, 82.51), (1024, 157.82, 307.18), (8192, 967.62, 1845.19)),
    ("h100_sxm", "low_latency"): ((8, 14.79, 16.49), (64, 24.57, 39.73), (256, 62.57, 129.51)),
}


def _deepep(gpu_key: str, facts=SGLANG, arch=DEEPSEEK):
    gpu = gpus.get_gpu(gpu_key)
    km = kernels.kernel_model(gpu.key, datasheet=kernels_datasheet(gpu), cuda_graphs=True,
                              engine=facts.engine.value)
    return deepep.DeepEP.for_model(km, gpu, arch, facts)


def test_a_token_goes_once_to_each_distinct_rank_of_its_experts():
    one = kernel_forms.deepep_payload_bytes(1.0, 100.0, 1.0, 8.0)
    assert one == pytest.approx(200.0)  # top-1: one rank, bf16
    alone = kernel_forms.deepep_payload_bytes(1.0, 100.0, 8.0, 1.0)
    assert alone == pytest.approx(200.0)  # a single rank holds every expert
    wide = kernel_forms.deepep_payload_bytes(1.0, 100.0, 8.0, 8.0)
    assert wide == pytest.approx(200.0 * 8.0 * (1.0 - (7.0 / 8.0) ** 8))  # 5.25 ranks
    assert kernel_forms.deepep_payload_bytes(1.0, 100.0, 64.0, 8.0) < 200.0 * 8.0


@pytest.mark.parametrize("gpu_key,mode", sorted(MEASURED))
def test_the_fitted_cost_follows_the_measured_dispatch_and_combine(gpu_key, mode):
    model = _deepep(gpu_key)
    assert model is not None
    for tokens, dispatch_us, combine_us in MEASURED[(gpu_key, mode)]:
        got = float(model.layer_ms(np.array([float(tokens)]), np.array([mode == "normal"]),
                                   np.array([8.0]))[0])
        assert got == pytest.approx((dispatch_us + combine_us) * 1e-3, rel=0.20), tokens


def test_only_the_models_and_gpus_sglang_runs_it_for():
    assert _deepep("b200_sxm") is not None
    assert _deepep("gb200") is not None  # B200's fits, extrapolated
    assert _deepep("mi300x") is None  # no DeepEP measured (nor built for it)
    assert _deepep("b200_sxm", arch=load_model("openai/gpt-oss-120b")) is None
    assert _deepep("b200_sxm", facts=engine_facts(Engine.VLLM)) is None


def test_a_group_past_the_nvlink_domain_pays_the_scale_out_links():
    model = _deepep("h100_sxm")
    tokens, prefill = np.array([256.0, 256.0]), np.array([False, False])
    inside, across = model.layer_ms(tokens, prefill, np.array([8.0, 16.0]))
    assert across > 2.0 * inside


def test_sglang_dp_ep_steps_price_deepep_instead_of_gather_and_scatter():
    gpu = gpus.get_gpu("b200_sxm")
    with_a2a = StepModel(DEEPSEEK, gpu, QuantRecipe.FP8, KvDtype.FP8, SGLANG)
    without = StepModel(DEEPSEEK, gpu, QuantRecipe.FP8, KvDtype.FP8,
                        dataclasses.replace(SGLANG, deepep_architectures=()))
    assert with_a2a.deepep is not None and without.deepep is None
    decode = dict(tp=1, pp=1, dp=8, dec_seqs=64.0, dec_kv=2048.0)
    a2a = with_a2a.deepep.layer_ms(np.array(64.0), np.array(False), np.array(8.0))
    # The default backend gathers all 8 ranks' 64 tokens into each MoE layer and scatters back.
    msg = 64.0 * 8 * DEEPSEEK.hidden_size * 2.0
    gather_scatter = with_a2a.km.allgather_ms(8, msg) + with_a2a.km.reduce_scatter_ms(8, msg)
    diff = (float(with_a2a.step(ep=True, **decode).comm)
            - float(without.step(ep=True, **decode).comm))
    assert diff == pytest.approx(with_a2a.layers.moe * float(a2a - gather_scatter), rel=1e-6)
    assert diff < 0.0  # low-latency DeepEP beats moving every rank's tokens at decode
    # Without expert parallelism nothing changes.
    assert float(with_a2a.step(ep=False, **decode).comm) == pytest.approx(
        float(without.step(ep=False, **decode).comm))


def test_the_renderer_writes_the_backend_the_plan_priced():
    def backend(model_id: str, gpu: str, dp: int, ep: bool) -> str | None:
        worker = WorkerConfig(gpu=gpu, tp=8 // dp, dp=dp, ep=ep, quant=QuantRecipe.FP8)
        args = sglang_flags.parallel_args(load_model(model_id), worker)
        return next((a.value for a in args if a.flag == "--moe-a2a-backend" and a.emit), None)

    assert backend("deepseek-ai/DeepSeek-R1", "h200_sxm", 8, True) == "deepep"
    assert backend("deepseek-ai/DeepSeek-R1", "h200_sxm", 1, True) is None  # no DP attention
    assert backend("deepseek-ai/DeepSeek-R1", "h200_sxm", 8, False) is None
    assert backend("openai/gpt-oss-120b", "h200_sxm", 8, True) is None
    assert backend("deepseek-ai/DeepSeek-R1", "mi300x", 8, True) is None
