"""Engine flags rendered from plans: exact names, provenance, and refusals with a reason."""

import json

import pytest

from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine, KvDtype, QuantRecipe, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig


def config(model="Qwen/Qwen3-8B", **worker):
    return ServingConfig(model=model, worker=WorkerConfig(gpu="h100_sxm", **worker))


def value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_vllm_renders_the_plan_fields_under_their_real_flag_names():
    argv = render.engine_args(config(tp=2, quant=QuantRecipe.FP8, kv_dtype=KvDtype.FP8,
                                     max_num_seqs=128,
                                     max_num_batched_tokens=4096, prefix_caching=False,
                                     gpu_memory_utilization=0.85), "vllm")
    assert argv[0] == "Qwen/Qwen3-8B"
    assert value(argv, "--tensor-parallel-size") == "2"
    assert value(argv, "--quantization") == "fp8"
    assert value(argv, "--kv-cache-dtype") == "fp8"
    assert value(argv, "--max-num-seqs") == "128"
    assert value(argv, "--max-num-batched-tokens") == "4096"
    assert value(argv, "--gpu-memory-utilization") == "0.85"
    assert "--no-enable-prefix-caching" in argv
    assert "--pipeline-parallel-size" not in argv and "--speculative-config" not in argv


def test_sglang_renders_the_same_plan_with_its_own_names():
    argv = render.engine_args(config(tp=2, quant=QuantRecipe.FP8, kv_dtype=KvDtype.FP8,
                                     prefix_caching=False),
                              "sglang")
    assert value(argv, "--model-path") == "Qwen/Qwen3-8B"
    assert value(argv, "--tp-size") == "2"
    assert value(argv, "--kv-cache-dtype") == "fp8_e4m3"
    assert value(argv, "--max-running-requests") == "256"
    assert value(argv, "--chunked-prefill-size") == "8192"
    assert value(argv, "--mem-fraction-static") == "0.9"
    assert value(argv, "--host") == "0.0.0.0"
    assert "--disable-radix-cache" in argv


def test_a_prequantized_checkpoint_gets_no_quantization_flag():
    argv = render.engine_args(config(model="openai/gpt-oss-120b", quant=QuantRecipe.MXFP4), "vllm")
    assert "--quantization" not in argv
    plan = render.layout(config(model="openai/gpt-oss-120b", quant=QuantRecipe.MXFP4), "vllm",
                         name="x")
    assert plan.provenance["server"]["--quantization"] == "catalog"


@pytest.mark.parametrize("quant", [QuantRecipe.INT4, QuantRecipe.NVFP4, QuantRecipe.INT8])
def test_a_recipe_that_needs_a_prequantized_checkpoint_is_refused(quant):
    with pytest.raises(InputError) as err:
        render.engine_args(config(quant=quant), "vllm")
    assert err.value.field == "quant"


def test_eagle3_uses_the_cited_head_and_json_speculative_config():
    argv = render.engine_args(config(spec_method=SpecMethod.EAGLE3, spec_k=3), "vllm")
    spec = json.loads(value(argv, "--speculative-config"))
    assert spec == {"method": "eagle3", "model": "RedHatAI/Qwen3-8B-speculator.eagle3",
                    "num_speculative_tokens": 3}


def test_an_eagle_plan_without_a_published_head_names_the_field():
    with pytest.raises(InputError) as err:
        render.engine_args(config(model="Qwen/Qwen3-32B-FP8", quant=QuantRecipe.FP8,
                                  spec_method=SpecMethod.EAGLE3, spec_k=3), "vllm")
    assert err.value.field == "draft_model"


def test_a_head_passed_by_the_caller_is_recorded_as_a_user_override():
    options = render.RenderOptions(draft_model="me/my-head")
    plan = render.layout(config(spec_method=SpecMethod.EAGLE3, spec_k=2), "sglang", name="x",
                         options=options)
    server = plan.workers[0]
    assert value(server.argv(), "--speculative-draft-model-path") == "me/my-head"
    assert server.provenance["--speculative-draft-model-path"] == "user override"


def test_ngram_and_mtp_use_the_engines_method_names():
    ngram_argv = render.engine_args(config(spec_method=SpecMethod.NGRAM, spec_k=4), "vllm")
    ngram = json.loads(value(ngram_argv, "--speculative-config"))
    assert ngram == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
    ds = config(model="deepseek-ai/DeepSeek-V3", quant=QuantRecipe.FP8, tp=8,
                spec_method=SpecMethod.MTP, spec_k=1)
    assert json.loads(value(render.engine_args(ds, "vllm"), "--speculative-config")) == {
        "method": "mtp", "num_speculative_tokens": 1}
    sg = render.engine_args(ds, "sglang")
    assert value(sg, "--speculative-algorithm") == "NEXTN"
    assert value(sg, "--speculative-num-steps") == "1"
    assert value(sg, "--speculative-num-draft-tokens") == "2"


def test_mtp_on_a_model_without_nextn_layers_is_refused():
    with pytest.raises(InputError) as err:
        render.engine_args(config(spec_method=SpecMethod.MTP, spec_k=1), "vllm")
    assert err.value.field == "spec_method"


def test_moe_data_and_expert_parallel_map_to_each_engine():
    moe = config(model="Qwen/Qwen3-30B-A3B", tp=2, dp=2, ep=True)
    vllm = render.engine_args(moe, "vllm")
    assert value(vllm, "--data-parallel-size") == "2" and "--enable-expert-parallel" in vllm
    sg = render.engine_args(moe, "sglang")
    assert value(sg, "--tp-size") == "4" and value(sg, "--dp-size") == "2"
    assert "--enable-dp-attention" in sg and value(sg, "--ep-size") == "4"


def test_expert_parallel_on_a_dense_model_is_refused():
    with pytest.raises(InputError) as err:
        render.engine_args(config(ep=True, tp=2), "sglang")
    assert err.value.field == "ep"


def test_disaggregated_vllm_uses_nixl_producer_and_consumer_roles():
    cfg = ServingConfig(model="Qwen/Qwen3-8B", mode=Mode.DISAGGREGATED,
                        worker=WorkerConfig(gpu="h100_sxm"), replicas=2,
                        prefill=WorkerConfig(gpu="h100_sxm", tp=2), prefill_replicas=1)
    opts = render.RenderOptions(router_command=("my-router",))
    plan = render.layout(cfg, "vllm", name="x", options=opts)
    roles = {w.role.value: w for w in plan.workers}
    kv = {r: json.loads(value(roles[r].argv(), "--kv-transfer-config"))
          for r in ("prefill", "decode")}
    assert kv["prefill"] == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    assert kv["decode"]["kv_role"] == "kv_both"
    with pytest.raises(InputError) as err:
        render.layout(cfg, "vllm", name="x")
    assert err.value.field == "router"


def test_user_max_model_len_is_an_override_and_omitted_otherwise():
    plan = render.layout(config(), "vllm", name="x",
                       options=render.RenderOptions(max_model_len=16384))
    assert value(plan.workers[0].argv(), "--max-model-len") == "16384"
    assert plan.provenance["server"]["--max-model-len"] == "user override"
    assert "--max-model-len" not in render.engine_args(config(), "vllm")


def test_unknown_engine_is_an_input_error():
    with pytest.raises(InputError) as err:
        render.engine_args(config(), "trtllm")
    assert err.value.field == "engine"


def test_render_text_is_shell_quoted_and_repeatable():
    cfg = config(spec_method=SpecMethod.EAGLE3, spec_k=3)
    first = render.render_text(cfg, "vllm")
    assert first == render.render_text(cfg, "vllm")
    assert first.startswith("vllm serve Qwen/Qwen3-8B ")
    assert "'{\"method\":\"eagle3\"" in first


def test_the_plans_context_limit_is_rendered_for_both_engines():
    import dataclasses

    cfg = ServingConfig(model="meta-llama/Llama-3.1-8B",
                        worker=WorkerConfig(gpu="l40s", max_model_len=4352))
    assert "--max-model-len" in render.engine_args(cfg, "vllm")
    assert "4352" in render.engine_args(cfg, "vllm")
    sgl = render.engine_args(dataclasses.replace(cfg, engine=Engine.SGLANG), "sglang")
    assert sgl[sgl.index("--context-length") + 1] == "4352"
    bare = ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(gpu="l40s"))
    assert "--max-model-len" not in render.engine_args(bare, "vllm")
