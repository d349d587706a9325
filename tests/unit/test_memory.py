import numpy as np
import pytest

from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf import memory
from trilemma.optimizer.perf.engine import engine_facts

LLAMA70 = "meta-llama/Llama-3.1-70B"


def _breakdown(model=LLAMA70, gpu="h100_sxm", quant=QuantRecipe.FP8, kv=KvDtype.BF16, tp=4,
               pp=1, dp=1, seq_len=2048, tokens=8192, seqs=1024):
    return memory.breakdown(models.load_model(model), gpus.get_gpu(gpu), quant, kv,
                            engine_facts(), tp=tp, pp=pp, dp=dp, seq_len=seq_len,
                            max_batched_tokens=tokens, max_num_seqs=seqs)


def test_more_tensor_parallelism_means_less_weight_memory_per_gpu():
    arch = models.load_model(LLAMA70)
    w = memory.weights_per_gpu(arch, QuantRecipe.BF16, np.array([1, 2, 4, 8]), 1, 1)
    assert np.all(np.diff(w) < 0)
    # Weights split almost exactly: 70.6B params x 2 bytes over 8 GPUs.
    assert w[3] == pytest.approx(arch.total_params * 2 / 8, rel=0.01)


def test_more_pipeline_stages_mean_less_weight_memory_per_gpu():
    arch = models.load_model(LLAMA70)
    w = memory.weights_per_gpu(arch, QuantRecipe.BF16, 1, np.array([1, 2, 4]), 1)
    assert np.all(np.diff(w) < 0)


def test_fp8_weights_take_half_the_bytes_of_bf16():
    arch = models.load_model(LLAMA70)
    bf16 = memory.weights_per_gpu(arch, QuantRecipe.BF16, 8, 1, 1)
    fp8 = memory.weights_per_gpu(arch, QuantRecipe.FP8, 8, 1, 1)
    # Embedding and lm_head stay in bf16, so slightly more than half.
    assert 0.5 < fp8 / bf16 < 0.53


def test_fp8_kv_cache_halves_kv_bytes_per_token():
    arch = models.load_model(LLAMA70)
    bf16 = memory.kv_bytes_per_token_per_gpu(arch, KvDtype.BF16, np.array([1, 8]), 1)
    fp8 = memory.kv_bytes_per_token_per_gpu(arch, KvDtype.FP8, np.array([1, 8]), 1)
    np.testing.assert_allclose(fp8, bf16 / 2)
    assert bf16[0] == 327_680  # 80 layers x 2 x 8 heads x 128 x 2 bytes


def test_kv_heads_are_replicated_not_split_below_one_per_gpu():
    arch = models.load_model(LLAMA70)  # 8 KV heads
    per_gpu = memory.kv_bytes_per_token_per_gpu(arch, KvDtype.BF16, np.array([8, 16]), 1)
    assert per_gpu[0] == per_gpu[1]


def test_mla_latent_is_not_split_by_tensor_parallelism():
    arch = models.load_model("deepseek-ai/DeepSeek-V3")
    per_gpu = memory.kv_bytes_per_token_per_gpu(arch, KvDtype.BF16, np.array([1, 8]), 1)
    assert per_gpu[0] == per_gpu[1] == 61 * (512 + 64) * 2


def test_sliding_window_layers_hold_only_their_window():
    arch = models.load_model("openai/gpt-oss-120b")
    short = memory.kv_bytes_per_seq(arch, KvDtype.BF16, 1, 1, 1024, 16)
    long = memory.kv_bytes_per_seq(arch, KvDtype.BF16, 1, 1, 2048, 16)
    full_layers = arch.num_layers - arch.sliding_layers
    per_layer = memory.per_layer_kv_bytes(arch, KvDtype.BF16, 1)
    # Doubling the length adds 1024 tokens to the full layers only.
    assert long - short == pytest.approx(full_layers * per_layer * 1024)


def test_a_model_larger_than_the_gpu_does_not_fit_and_says_so_without_raising():
    m = _breakdown(model="meta-llama/Llama-3.1-405B", quant=QuantRecipe.BF16, tp=1)
    assert not bool(m.fits)
    assert float(m.kv_cache) < 0
    assert int(m.max_seqs) == 0


def test_a_model_that_fits_has_kv_room_for_sequences():
    m = _breakdown(tp=4)
    assert bool(m.fits)
    assert int(m.max_seqs) > 100


def test_weights_that_fit_but_leave_no_room_for_one_sequence_do_not_fit():
    # 70B fp8 is ~70 GB: it fits an 80 GB H100 at 0.9 utilisation barely, never with 128k tokens.
    m = _breakdown(tp=1, seq_len=131072)
    assert not bool(m.fits)


def test_longer_sequences_fit_fewer_at_once():
    m = _breakdown(seq_len=np.array([1024, 4096, 16384]))
    assert np.all(np.diff(m.max_seqs) < 0)


def test_memory_parts_add_up_to_the_engine_budget():
    m = _breakdown()
    total = m.weights + m.activations + m.runtime + m.kv_cache
    assert float(total) == pytest.approx(float(m.capacity))
    assert float(m.capacity) == pytest.approx(gpus.get_gpu("h100_sxm").memory_bytes * 0.9)


def test_gpt_oss_keeps_attention_in_bf16_when_served_in_its_mxfp4_format():
    arch = models.load_model("openai/gpt-oss-120b")
    wb = memory.weight_bytes(arch, QuantRecipe.MXFP4)
    assert wb.attention == 2.0
    assert wb.experts < 0.6
    # About 61 GiB for the 120b model on one GPU, as its model card says it fits an 80 GB card.
    assert memory.weights_per_gpu(arch, QuantRecipe.MXFP4, 1, 1, 1) / 1024**3 == pytest.approx(
        61, abs=4)
