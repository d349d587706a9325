"""ServingConfig's closed sets are enums; its canonical JSON and hashes are what they were.

The JSON and hashes below were produced by the string-typed ServingConfig (main at 799e34d)
from the same configurations: plan files, operator status and Deployment names carry them,
so typing the fields must not move a byte.
"""

import yaml

from trilemma.optimizer.catalog import Engine, KvDtype, QuantRecipe, SpecMethod
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig, canonical_json

AGGREGATED = ServingConfig(model="Qwen/Qwen3-8B", replicas=2, worker=WorkerConfig(
    gpu="h100_sxm", tp=2, quant=QuantRecipe.FP8, kv_dtype=KvDtype.FP8,
    spec_method=SpecMethod.EAGLE3, spec_k=3, max_model_len=16384))
DISAGGREGATED = ServingConfig(
    model="meta-llama/Llama-3.1-70B", engine=Engine.SGLANG, mode=Mode.DISAGGREGATED, replicas=3,
    worker=WorkerConfig(gpu="h200_sxm", tp=4, quant=QuantRecipe.INT4),
    prefill=WorkerConfig(gpu="h200_sxm", tp=8, spec_method=SpecMethod.NGRAM, spec_k=4),
    prefill_replicas=1)

AGGREGATED_JSON = (
    '{"engine":"vllm","mode":"aggregated","model":"Qwen/Qwen3-8B","prefill":null,'
    '"prefill_replicas":0,"replicas":2,"worker":{"dp":1,"draft_model":null,"ep":false,'
    '"gpu":"h100_sxm","gpu_memory_utilization":0.9,"kv_dtype":"fp8","max_model_len":16384,'
    '"max_num_batched_tokens":8192,"max_num_seqs":256,"pp":1,"prefix_caching":true,'
    '"quant":"fp8","spec_k":3,"spec_method":"eagle3","tp":2}}')
DISAGGREGATED_JSON = (
    '{"engine":"sglang","mode":"disaggregated","model":"meta-llama/Llama-3.1-70B","prefill":'
    '{"dp":1,"draft_model":null,"ep":false,"gpu":"h200_sxm","gpu_memory_utilization":0.9,'
    '"kv_dtype":"bf16","max_model_len":null,"max_num_batched_tokens":8192,"max_num_seqs":256,'
    '"pp":1,"prefix_caching":true,"quant":"bf16","spec_k":4,"spec_method":"ngram","tp":8},'
    '"prefill_replicas":1,"replicas":3,"worker":{"dp":1,"draft_model":null,"ep":false,'
    '"gpu":"h200_sxm","gpu_memory_utilization":0.9,"kv_dtype":"bf16","max_model_len":null,'
    '"max_num_batched_tokens":8192,"max_num_seqs":256,"pp":1,"prefix_caching":true,'
    '"quant":"int4","spec_k":0,"spec_method":"none","tp":4}}')


def test_canonical_json_and_hashes_are_byte_identical_to_the_string_typed_config():
    assert canonical_json(AGGREGATED.to_dict()) == AGGREGATED_JSON
    assert (AGGREGATED.config_hash(), AGGREGATED.layout_hash()) == ("1dbb26ce", "bda5bf36")
    assert canonical_json(DISAGGREGATED.to_dict()) == DISAGGREGATED_JSON
    assert (DISAGGREGATED.config_hash(), DISAGGREGATED.layout_hash()) == ("a6d6cac8", "241bc98b")


def test_summaries_print_the_wire_spellings():
    assert AGGREGATED.summary() == "2x [fp8 TP2 kv-fp8 eagle3x3] on h100_sxm"
    assert DISAGGREGATED.summary() == (
        "1x prefill[bf16 TP8 ngramx4] + 3x decode[int4 TP4] on h200_sxm")


def test_from_dict_decodes_the_enums_and_round_trips():
    for config in (AGGREGATED, DISAGGREGATED):
        again = ServingConfig.from_dict(config.to_dict())
        assert again == config
        assert type(again.engine) is Engine
        workers = [again.worker] + ([again.prefill] if again.prefill else [])
        for w in workers:
            assert type(w.quant) is QuantRecipe
            assert type(w.kv_dtype) is KvDtype
            assert type(w.spec_method) is SpecMethod


def test_from_dict_reads_a_quant_as_user_text_and_fills_defaults():
    worker = WorkerConfig.from_dict({"gpu": "h100_sxm", "quant": "AWQ"})
    assert worker == WorkerConfig(gpu="h100_sxm", quant=QuantRecipe.INT4)
    assert ServingConfig.from_dict({"model": "m", "worker": {"gpu": "l40s"}}).engine is Engine.VLLM


def test_to_dict_holds_plain_strings_that_yaml_can_write():
    # yaml.safe_dump refuses str subclasses such as StrEnum members: to_dict must unwrap them.
    data = DISAGGREGATED.to_dict()
    assert type(data["engine"]) is str and type(data["worker"]["quant"]) is str
    assert yaml.safe_load(yaml.safe_dump(data)) == data
