"""The model catalog: config.json parsing, bundled ids, parameter counts, KV bytes and FLOPs."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest

from trilemma.optimizer.catalog import models
from trilemma.optimizer.catalog.models import AttentionKind, StepPhase
from trilemma.optimizer.errors import InputError, UnknownModelError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SHARED_CONFIGS = SHARED / "aic" / "model_configs"
BUNDLED = Path(models.__file__).parent / "data" / "models"
B = 1e9
DECODE, PREFILL = StepPhase.DECODE, StepPhase.PREFILL

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


def within(ours: float, published: float, tolerance: float = 0.02) -> bool:
    return abs(ours - published) <= tolerance * published


# --- every bundled config -------------------------------------------------------------------

@pytest.mark.parametrize("model_id", models.bundled_models())
def test_every_bundled_model_parses_into_a_consistent_architecture(model_id):
    arch = models.load_model(model_id)
    assert arch.id == model_id
    assert len(arch.layer_kinds()) == arch.num_layers
    assert 0 < arch.active_params <= arch.total_params
    assert arch.param_breakdown().total == arch.total_params
    assert arch.kv_bytes_per_token(2.0) > 0
    assert arch.flops_per_token(4096, DECODE) > 2 * arch.active_params * 0.99
    assert arch.source


REQUIRED_IDS = [
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B",
    "Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B",
    "Qwen/Qwen2.5-Coder-14B-Instruct", "mistralai/Mixtral-8x7B-v0.1", "deepseek-ai/DeepSeek-V3",
    "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2.5", "MiniMaxAI/MiniMax-M2.5",
    "openai/gpt-oss-20b", "openai/gpt-oss-120b", "Qwen/Qwen3-Coder-480B-A35B-Instruct",
    "Qwen/Qwen3.5-397B-A17B", "google/gemma-4-26B-A4B", "meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct", "mistralai/Mixtral-8x22B-v0.1",
    "nvidia/GLM-5-NVFP4", "nvidia/Llama-3.1-70B-Instruct-FP8", "Qwen/Qwen3-32B-FP8",
    "Qwen/Qwen3-235B-A22B-FP8",
]


def test_bundle_holds_every_model_the_issue_names():
    assert set(REQUIRED_IDS) <= set(models.bundled_models())


def test_every_bundled_file_has_a_recorded_source():
    sources = json.loads((BUNDLED / "index.json").read_text())["sources"]
    files = {p.name for p in BUNDLED.glob("*--*.json")}
    assert files == set(sources)


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason="shared reference data not present")
@pytest.mark.parametrize(
    "shared_file", sorted(p.name for p in SHARED_CONFIGS.glob("*.json")) or ["none"])
def test_bundled_copies_match_the_shared_aiconfigurator_files(shared_file):
    stem = shared_file.removesuffix("_hf_quant_config.json").removesuffix("_config.json")
    stem = stem.replace("Meta-Llama-3.1-", "Llama-3.1-")
    suffix = ".hf_quant_config.json" if shared_file.endswith("_hf_quant_config.json") else ".json"
    assert (BUNDLED / (stem + suffix)).read_bytes() == (SHARED_CONFIGS / shared_file).read_bytes()


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason="shared reference data not present")
def test_a_shared_config_path_parses_with_its_quant_companion():
    arch = models.load_model(str(SHARED_CONFIGS / "nvidia--GLM-5-NVFP4_config.json"))
    assert arch.id == "nvidia/GLM-5-NVFP4"
    assert (arch.checkpoint_quant, arch.checkpoint_kv_quant) == ("nvfp4", "fp8")


# --- parameter counts against published figures --------------------------------------------
# Totals exclude vision towers and MTP layers. Publishers differ on whether "active" counts the
# input embedding table: Qwen, Mistral and Meta include it, OpenAI, DeepSeek and Moonshot do not
# (their figures only round right without it), so each row says which figure it compares.

PUBLISHED = [
    # id, total (B), active (B) or None for dense, active counts the embedding table
    ("meta-llama/Llama-3.1-8B", 8.03, None, True),
    ("meta-llama/Llama-3.1-70B", 70.6, None, True),
    ("meta-llama/Llama-3.1-405B", 405.9, None, True),
    ("Qwen/Qwen3-8B", 8.2, None, True),
    ("Qwen/Qwen3-32B", 32.8, None, True),
    ("Qwen/Qwen3-30B-A3B", 30.5, 3.3, True),
    ("Qwen/Qwen3-235B-A22B", 235.0, 22.0, True),
    ("Qwen/Qwen2.5-Coder-14B-Instruct", 14.7, None, True),
    ("mistralai/Mixtral-8x7B-v0.1", 46.7, 12.9, True),
    ("mistralai/Mixtral-8x22B-v0.1", 141.0, 39.0, True),
    # 671B is DeepSeek's figure without the 14B MTP module (num_nextn_predict_layers=1).
    ("deepseek-ai/DeepSeek-V3", 671.0, 37.0, False),
    ("deepseek-ai/DeepSeek-R1", 671.0, 37.0, False),
    # LLM only: Kimi-K2.5's vision tower (vision_config) is not counted; ours is 1.026T.
    ("moonshotai/Kimi-K2.5", 1040.0, 32.0, False),
    ("openai/gpt-oss-120b", 116.8, 5.1, False),
    ("openai/gpt-oss-20b", 20.9, 3.6, False),
    ("Qwen/Qwen3-Coder-480B-A35B-Instruct", 480.0, 35.0, True),
    ("google/gemma-4-26B-A4B", 25.2, 3.8, True),  # tied embeddings: both figures agree
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", 400.0, 17.0, True),
    # GLM-5 "744B (40B active)": the total matches. The active figure is not asserted: ours is
    # 40.8B without the embedding table (41.8B with it), 2.1% over, and we do not know what
    # Zhipu left out (the sparse-attention indexer would account for 0.7B).
    ("nvidia/GLM-5-NVFP4", 744.0, None, False),
]


@pytest.mark.parametrize(("model_id", "total", "active", "with_embedding"), PUBLISHED)
def test_parameter_counts_are_within_two_percent_of_published(
    model_id, total, active, with_embedding
):
    arch = models.load_model(model_id)
    assert within(arch.total_params / B, total), arch.total_params
    if active is None:
        return
    ours = arch.active_params_with_embedding if with_embedding else arch.active_params
    assert within(ours / B, active), ours


@pytest.mark.parametrize(("model_id", "total", "active", "with_embedding"), [
    # MiniMax publishes "229B total, 10B active"; derived active is 10.42B without the
    # embedding table (11.03B with it). The 3 MTP modules are excluded.
    ("MiniMaxAI/MiniMax-M2.5", 229.0, 10, False),
    # "A17B" in the name; derived 17.35B with the embedding table (2.1% over 17), 16.33B without.
    # The total leaves out the vision tower (396.4B against 397B).
    ("Qwen/Qwen3.5-397B-A17B", 397.0, 17, True),
])
def test_active_counts_published_to_the_billion_round_to_it(model_id, total, active,
                                                             with_embedding):
    # These active figures are rounded to the billion, so a 2% band is tighter than the figure
    # itself: they are compared as rounding intervals. Totals keep the 2% band.
    arch = models.load_model(model_id)
    assert within(arch.total_params / B, total)
    ours = arch.active_params_with_embedding if with_embedding else arch.active_params
    assert round(ours / B) == active


def test_llama4_scout_total_leaves_out_the_vision_tower():
    # Meta's 109B counts the vision encoder too; the language model alone is 107.8B.
    arch = models.load_model("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    assert within(arch.total_params / B, 107.8, 0.005)
    assert within(arch.active_params_with_embedding / B, 17.0)


def test_deepseek_v3_checkpoint_size_is_main_model_plus_mtp_and_its_copies():
    arch = models.load_model("deepseek-ai/DeepSeek-V3")
    assert arch.nextn_layers == 1
    # Hugging Face's 685B = 671B + the MTP layer with its own embedding and lm_head copies.
    shared_copies = 2 * arch.vocab_size * arch.hidden_size
    assert within((arch.total_params + arch.mtp_params + shared_copies) / B, 685.0)


def test_gpt_oss_counts_attention_biases_sinks_and_expert_biases():
    arch = models.load_model("openai/gpt-oss-120b")
    assert arch.attention_bias and arch.o_proj_bias and arch.attention_sinks and arch.mlp_bias
    without = dataclasses.replace(arch, attention_bias=False, o_proj_bias=False,
                                  attention_sinks=False, mlp_bias=False)
    assert arch.total_params - without.total_params > 20e6


def test_qwen2_has_qkv_biases_but_no_output_bias():
    arch = models.load_model("Qwen/Qwen2.5-Coder-14B-Instruct")
    assert arch.attention_bias and not arch.o_proj_bias
    assert arch.sliding_layers == 0  # use_sliding_window is false


def test_active_breakdown_uses_experts_per_token_of_the_routed_experts():
    arch = models.load_model("Qwen/Qwen3-30B-A3B")
    total, active = arch.param_breakdown(), arch.param_breakdown(active=True)
    assert active.routed_experts * 128 == total.routed_experts * 8
    assert active.embedding == 0 and active.lm_head == total.lm_head


def test_tied_embeddings_are_counted_once():
    arch = models.load_model("google/gemma-4-26B-A4B")
    assert arch.tie_word_embeddings
    assert arch.param_breakdown().lm_head == 0
    assert arch.active_params_with_embedding == arch.active_params


# --- KV cache ---------------------------------------------------------------------------------

def test_llama31_70b_kv_bytes_per_token():
    arch = models.load_model("meta-llama/Llama-3.1-70B")
    assert arch.kv_bytes_per_token(2) == 80 * 2 * 8 * 128 * 2 == 327_680
    assert arch.kv_bytes_per_token(1) == 327_680 / 2
    assert arch.kv_bytes(1000, 2) == 1000 * 327_680


@pytest.mark.parametrize("kv_bytes", [2.0, 1.0])
def test_deepseek_v3_mla_caches_the_latent_and_rope_key(kv_bytes):
    arch = models.load_model("deepseek-ai/DeepSeek-V3")
    assert arch.kv_bytes_per_token(kv_bytes) == 61 * (512 + 64) * kv_bytes


def test_gpt_oss_alternates_sliding_and_full_layers_with_a_128_token_window():
    arch = models.load_model("openai/gpt-oss-120b")
    assert (arch.sliding_window, arch.sliding_layers) == (128, 18)
    kinds = [k.attention for k in arch.layer_kinds()]
    assert kinds[:2] == [AttentionKind.SLIDING, AttentionKind.FULL]
    assert kinds == [AttentionKind.SLIDING, AttentionKind.FULL] * 18
    per_layer = 2 * 8 * 64 * 2
    assert arch.kv_bytes_per_token(2) == 36 * per_layer
    assert arch.kv_bytes(100, 2) == 100 * 36 * per_layer  # inside the window: every layer grows
    assert arch.kv_bytes(10_000, 2) == 18 * per_layer * (10_000 + 128)


def test_llama4_local_layers_keep_one_chunk_and_every_fourth_layer_is_global():
    arch = models.load_model("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    kinds = [k.attention for k in arch.layer_kinds()]
    assert kinds[:4] == [AttentionKind.CHUNKED] * 3 + [AttentionKind.FULL]
    assert (arch.sliding_window, arch.sliding_layers) == (8192, 36)
    per_layer = 2 * 8 * 128 * 2
    assert arch.kv_bytes(100_000, 2) == per_layer * (12 * 100_000 + 36 * 8192)


def test_gemma4_global_layers_use_their_own_head_width():
    arch = models.load_model("google/gemma-4-26B-A4B")
    counts = {(k.attention, k.num_kv_heads, k.head_dim): n for k, n in arch.layer_counts().items()}
    assert counts == {(AttentionKind.SLIDING, 8, 256): 25, (AttentionKind.FULL, 2, 512): 5}
    assert arch.kv_bytes_per_token(2) == (25 * 2 * 8 * 256 + 5 * 2 * 2 * 512) * 2


def test_qwen35_linear_attention_layers_hold_a_fixed_state_instead_of_kv():
    arch = models.load_model("Qwen/Qwen3.5-397B-A17B")
    counts = {k.attention: n for k, n in arch.layer_counts().items()}
    assert counts == {AttentionKind.LINEAR: 45, AttentionKind.FULL: 15}
    assert arch.kv_bytes_per_token(2) == 15 * 2 * 2 * 256 * 2
    state = arch.recurrent_state_bytes()
    assert state > 0
    assert arch.kv_bytes(1000, 2) == 1000 * arch.kv_bytes_per_token(2) + state
    assert arch.flops_per_token(10, DECODE) < arch.flops_per_token(10_000, DECODE)


def test_glm5_sparse_attention_caches_the_indexer_key_too():
    arch = models.load_model("nvidia/GLM-5-NVFP4")
    assert arch.indexer is not None and arch.indexer.topk == 2048
    assert arch.kv_bytes_per_token(1) == 78 * (512 + 64 + 128)


# --- FLOPs ------------------------------------------------------------------------------------

def test_decode_flops_are_twice_active_params_plus_linear_attention_term():
    arch = models.load_model("meta-llama/Llama-3.1-70B")
    base = 2 * (arch.active_params - arch.param_breakdown(active=True).norms)
    assert arch.flops_per_token(0, DECODE) == base
    assert arch.flops_per_token(8192, DECODE) == base + 80 * 4 * 64 * 128 * 8192
    # A prompt token attends to half the prompt on average (causal mask).
    assert arch.flops_per_token(8191, PREFILL) == base + 80 * 4 * 64 * 128 * 4096


def test_prefill_flops_can_leave_out_lm_head():
    arch = models.load_model("meta-llama/Llama-3.1-8B")
    lm_head = arch.vocab_size * arch.hidden_size
    with_logits = arch.flops_per_token(512, PREFILL)
    assert with_logits - arch.flops_per_token(512, PREFILL, logits=False) == 2 * lm_head


def test_sliding_layers_stop_adding_attention_flops_beyond_the_window():
    arch = models.load_model("openai/gpt-oss-120b")
    per_key = 4 * 64 * 64
    growth = arch.flops_per_token(20_000, DECODE) - arch.flops_per_token(10_000, DECODE)
    assert growth == 18 * per_key * 10_000  # only the 18 full layers grow


def test_mla_decode_attends_over_the_latent_and_prefill_over_head_dims():
    arch = models.load_model("deepseek-ai/DeepSeek-V3")
    ctx = 1000
    decode = arch.flops_per_token(ctx, DECODE) - arch.flops_per_token(0, DECODE)
    assert decode == 61 * 2 * 128 * (512 + 64 + 512) * ctx
    prefill = arch.flops_per_token(ctx, PREFILL) - arch.flops_per_token(0, PREFILL)
    assert prefill == 61 * 2 * 128 * (128 + 64 + 128) * (ctx + 1) / 2


# --- layer structure --------------------------------------------------------------------------

@pytest.mark.parametrize(("model_id", "dense", "moe"), [
    ("deepseek-ai/DeepSeek-V3", 3, 58), ("moonshotai/Kimi-K2.5", 1, 60),
    ("nvidia/GLM-5-NVFP4", 3, 75), ("Qwen/Qwen3-235B-A22B", 0, 94),
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", 24, 24),
    ("meta-llama/Llama-3.1-70B", 80, 0),
])
def test_layer_kinds_count_dense_and_moe_layers(model_id, dense, moe):
    kinds = models.load_model(model_id).layer_kinds()
    assert (sum(not k.moe for k in kinds), sum(k.moe for k in kinds)) == (dense, moe)


def test_maverick_interleaves_moe_from_its_second_layer():
    arch = models.load_model("meta-llama/Llama-4-Maverick-17B-128E-Instruct")
    assert [k.moe for k in arch.layer_kinds()[:4]] == [False, True, False, True]
    assert arch.moe is not None and arch.moe.moe_layer_interval == 2
    assert arch.intermediate_size == 16384 and arch.moe.shared_experts == 1


def test_deepseek_v3_moe_and_mla_fields():
    arch = models.load_model("deepseek-ai/DeepSeek-V3")
    assert arch.moe == models.MoE(
        num_experts=256, experts_per_token=8, expert_intermediate_size=2048, shared_experts=1,
        shared_expert_intermediate_size=2048, first_dense_layers=3, dense_intermediate_size=18432,
        moe_layer_interval=1, router_bias=True)
    assert arch.mla == models.MLA(q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                                  qk_nope_head_dim=128, v_head_dim=128)
    assert arch.family == "deepseek_v3" and arch.architecture == "DeepseekV3ForCausalLM"


def test_multimodal_configs_are_read_through_text_config():
    arch = models.load_model("moonshotai/Kimi-K2.5")
    assert arch.multimodal and arch.family == "kimi_k2" and arch.mla is not None
    assert arch.architecture == "KimiK25ForConditionalGeneration"
    assert (arch.num_layers, arch.hidden_size, arch.nextn_layers) == (61, 7168, 0)


@pytest.mark.parametrize(("model_id", "nextn"), [
    ("deepseek-ai/DeepSeek-V3", 1), ("moonshotai/Kimi-K2.5", 0), ("nvidia/GLM-5-NVFP4", 1),
    ("Qwen/Qwen3.5-397B-A17B", 1), ("MiniMaxAI/MiniMax-M2.5", 3), ("meta-llama/Llama-3.1-8B", 0),
])
def test_mtp_layers_are_recorded_not_counted(model_id, nextn):
    arch = models.load_model(model_id)
    assert arch.nextn_layers == nextn
    assert (arch.mtp_params > 0) == (nextn > 0)


# --- the checkpoint's own quantization --------------------------------------------------------

@pytest.mark.parametrize(("model_id", "weights", "kv"), [
    ("meta-llama/Llama-3.1-70B", None, None),
    ("deepseek-ai/DeepSeek-V3", "fp8", None),
    ("Qwen/Qwen3-32B-FP8", "fp8", None),
    ("MiniMaxAI/MiniMax-M2.5", "fp8", None),
    ("openai/gpt-oss-120b", "mxfp4", None),
    ("moonshotai/Kimi-K2.5", "int4", None),
    ("nvidia/GLM-5-NVFP4", "nvfp4", "fp8"),
    ("nvidia/Llama-3.1-70B-Instruct-FP8", "fp8", "fp8"),
    ("nvidia/Qwen3-32B-NVFP4", "nvfp4", None),
    ("zai-org/GLM-5", None, None),
])
def test_checkpoint_quantization_is_read_from_the_checkpoint(model_id, weights, kv):
    arch = models.load_model(model_id)
    assert (arch.checkpoint_quant, arch.checkpoint_kv_quant) == (weights, kv)


def test_exclusion_lists_name_the_parts_left_in_16_bits():
    gpt_oss = models.load_model("openai/gpt-oss-120b")
    assert "attention" in gpt_oss.unquantized_parts
    assert "routed_experts" not in gpt_oss.unquantized_parts
    kimi = models.load_model("moonshotai/Kimi-K2.5")
    assert {"attention", "shared_experts", "dense_mlp"} <= kimi.unquantized_parts
    assert models.load_model("Qwen/Qwen3-32B").unquantized_parts == frozenset()


# --- ids, aliases, caching ----------------------------------------------------------------------

@pytest.mark.parametrize(("spelling", "model_id"), [
    ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B"),
    ("META-LLAMA/llama-3.1-70b", "meta-llama/Llama-3.1-70B"),
    ("meta-llama--Llama-3.1-70B", "meta-llama/Llama-3.1-70B"),
    ("meta-llama/Meta-Llama-3.1-70B", "meta-llama/Llama-3.1-70B"),
    ("llama-3.1-70b", "meta-llama/Llama-3.1-70B"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    ("Qwen/Qwen2.5-Coder-14B", "Qwen/Qwen2.5-Coder-14B-Instruct"),
    ("qwen3-32b", "Qwen/Qwen3-32B"),
    ("gpt-oss-120b", "openai/gpt-oss-120b"),
    ("zhipuai/GLM-5", "zai-org/GLM-5"),
    ("  moonshotai/Kimi-K2.5 ", "moonshotai/Kimi-K2.5"),
])
def test_ids_resolve_case_insensitively_with_aliases(spelling, model_id):
    assert models.load_model(spelling).id == model_id


@pytest.mark.skipif(not (SHARED / "validation").is_dir(), reason="validation data not present")
def test_every_model_in_the_validation_data_resolves():
    with (SHARED / "validation" / "aic_silicon_sample_dev.csv").open() as f:
        ids = {row["model_path"] for row in csv.DictReader(f)}
    assert ids
    for model_id in sorted(ids):
        models.load_model(model_id)


def test_bundled_models_are_parsed_once():
    assert models.load_model("Qwen/Qwen3-8B") is models.load_model("qwen--qwen3-8b")


# --- local files and mappings -------------------------------------------------------------------

def test_a_folder_with_config_and_hf_quant_config_parses(tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    (folder / "hf_quant_config.json").write_text(
        json.dumps({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}))
    arch = models.load_model(str(folder))
    assert arch.id == "my-llama" and arch.family == "llama3"
    assert (arch.checkpoint_quant, arch.checkpoint_kv_quant) == ("fp8", "fp8")
    assert arch.total_params == models.load_model("meta-llama/Llama-3.1-8B").total_params


def test_a_mapping_parses_with_the_given_id():
    arch = models.parse_hf_config(LLAMA_8B, "local/llama")
    assert arch.id == "local/llama" and arch.head_dim == 128 and arch.num_kv_heads == 8


@pytest.mark.parametrize(("extra", "kinds"), [
    ({"sliding_window": 4096}, {AttentionKind.SLIDING: 32}),
    ({"sliding_window": 4096, "use_sliding_window": False}, {AttentionKind.FULL: 32}),
    ({"sliding_window": None}, {AttentionKind.FULL: 32}),
    ({"sliding_window": 4096, "sliding_window_pattern": 4},
     {AttentionKind.SLIDING: 24, AttentionKind.FULL: 8}),
])
def test_sliding_window_spellings(extra, kinds):
    arch = models.parse_hf_config({**LLAMA_8B, **extra}, "x")
    assert {k.attention: n for k, n in arch.layer_counts().items()} == kinds


def test_models_are_frozen_and_replace_recomputes_derived_sizes():
    arch = models.load_model("meta-llama/Llama-3.1-8B")
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.num_layers = 1  # type: ignore[misc]
    half = dataclasses.replace(arch, num_layers=16)
    assert half.kv_bytes_per_token(2) == arch.kv_bytes_per_token(2) / 2


def test_a_hand_built_architecture_with_contract_fields_only_works():
    arch = models.ModelArch(
        id="toy", family="llama3", architecture="LlamaForCausalLM", num_layers=2, hidden_size=64,
        num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=100,
        tie_word_embeddings=True, moe=None, mla=None, sliding_window=8, sliding_layers=1,
        checkpoint_quant=None, max_position_embeddings=128)
    assert arch.kv_bytes(100, 1) == 2 * 2 * 16 * (100 + 8)
    assert arch.total_params == 100 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 128) + 64


# --- errors -------------------------------------------------------------------------------------

def test_unknown_id_says_how_to_pass_a_config_json_and_lists_known_ids():
    with pytest.raises(UnknownModelError) as caught:
        models.load_model("acme/Nonexistent-7B")
    error = caught.value
    assert isinstance(error, InputError) and error.field == "model"
    assert "config.json" in str(error)
    assert models.bundled_models()[0] in str(error)


def test_unknown_id_suggests_a_close_spelling():
    with pytest.raises(UnknownModelError, match=re.escape("meta-llama/Llama-3.1-70B")):
        models.load_model("meta-llama/Llama-3.1-70")


def drop(key):
    return {k: v for k, v in LLAMA_8B.items() if k != key}


@pytest.mark.parametrize(("config", "field", "value"), [
    (drop("hidden_size"), "hidden_size", None),
    (drop("num_hidden_layers"), "num_hidden_layers", None),
    ({**LLAMA_8B, "num_key_value_heads": 7}, "num_key_value_heads", 7),
    ({**LLAMA_8B, "num_hidden_layers": -4}, "num_hidden_layers", -4),
    ({**LLAMA_8B, "vocab_size": 0}, "vocab_size", 0),
    ({**LLAMA_8B, "hidden_size": "4096"}, "hidden_size", "4096"),
    ({**LLAMA_8B, "hidden_size": 4096.5}, "hidden_size", 4096.5),
    ({**LLAMA_8B, "layer_types": ["full_attention"] * 31}, "layer_types", 31),
    ({**LLAMA_8B, "layer_types": ["full_attention"] * 31 + ["dilated"]}, "layer_types", "dilated"),
    ({**LLAMA_8B, "num_local_experts": 8}, "num_experts_per_tok", None),
    ({**LLAMA_8B, "quantization_config": {"quant_method": "bitsandbytes"}},
     "quantization_config.quant_method", "bitsandbytes"),
    ({"text_config": drop("hidden_size")}, "text_config.hidden_size", None),
])
def test_malformed_config_raises_input_error_naming_the_key_and_value(config, field, value):
    with pytest.raises(InputError) as caught:
        models.parse_hf_config(config, "bad")
    assert (caught.value.field, caught.value.value) == (field, value)
    assert field in str(caught.value)


def test_a_file_that_is_not_json_raises_input_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{ not json")
    with pytest.raises(InputError, match="not valid JSON") as caught:
        models.load_model(str(path))
    assert caught.value.field == "config"


def test_a_missing_json_path_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        models.load_model(str(tmp_path / "nowhere.json"))
