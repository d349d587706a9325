"""The search space: counts, and each pruning rule removing what it should."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trilemma.optimizer.catalog.quantization import QuantRecipe
from trilemma.optimizer.search import space
from trilemma.optimizer.spec import load_spec

CASES = Path(__file__).parent / "fixtures" / "search"


def _space(name: str) -> space.Space:
    return space.enumerate_space(load_spec(CASES / name), space.SearchSettings())


def test_case_studies_enumerate_over_100k_candidates() -> None:
    for name in ("chatbot.yaml", "code_completion.yaml", "code_rewriting.yaml"):
        assert _space(name).enumerated >= 100_000


def test_every_enumerated_candidate_is_pruned_or_kept() -> None:
    sp = _space("code_rewriting.yaml")
    kept = sum(len(r) for r in sp.rows) * sp.modes * sp.replica_options
    assert kept + sum(sp.pruned.values()) == sp.enumerated


def test_nvfp4_is_pruned_on_gpus_without_fp4_and_kept_on_blackwell(tmp_path: Path) -> None:
    text = (CASES / "chatbot.yaml").read_text().replace("deepseek-ai/DeepSeek-V3",
                                                         "nvidia/DeepSeek-R1-NVFP4")
    path = tmp_path / "nvfp4.yaml"
    path.write_text(text)
    sp = space.enumerate_space(load_spec(path), space.SearchSettings())
    keys = {r.group.gpu.key for r in sp.rows if r.group.quant is QuantRecipe.NVFP4}
    assert keys == {"b200_sxm"}
    assert sp.pruned["dtype"] > 0


def test_only_recipes_the_checkpoint_can_be_served_in_survive() -> None:
    # DeepSeek-V3 ships fp8: no engine re-quantizes it to nvfp4/int4 or back to bf16.
    sp = _space("chatbot.yaml")
    assert {r.group.quant for r in sp.rows} == {QuantRecipe.FP8}
    assert sp.pruned["checkpoint"] > 0


def test_dense_model_never_gets_attention_dp_or_expert_parallelism() -> None:
    sp = _space("code_rewriting.yaml")
    assert sp.pruned["parallelism"] > 0
    assert all((r.dp == 1).all() and not r.ep.any() for r in sp.rows)


def test_surviving_rows_fit_memory_nodes_and_engine_limits() -> None:
    sp = _space("code_completion.yaml")
    for reason in ("memory", "nodes", "limits"):
        assert sp.pruned[reason] > 0, reason
    for r in sp.rows:
        g = r.group
        assert (r.tp * r.dp <= g.gpus_per_node).all()
        assert (r.tp * r.pp * r.dp <= g.pool_gpus).all()
        assert (r.max_num_batched_tokens >= r.max_num_seqs * (1 + g.spec.k)).all()
        # DeepSeek-V3 (671B) never fits one GPU.
        assert (r.tp * r.pp * r.dp > 1).all()


def test_mtp_only_for_models_with_nextn_layers_and_draft_never_without_a_model() -> None:
    methods = {r.group.spec.method.value for r in _space("code_rewriting.yaml").rows}
    assert "mtp" not in methods and "draft" not in methods
    assert "mtp" in {r.group.spec.method.value for r in _space("chatbot.yaml").rows}


def test_prefix_caching_off_is_pruned_as_redundant_without_prefix_reuse() -> None:
    sp = _space("code_rewriting.yaml")
    assert sp.pruned["prefix_caching"] > 0
    assert all(np.all(r.prefix_caching) for r in sp.rows)


def test_vllm_rows_never_spread_data_parallel_ranks_over_nodes() -> None:
    # The renderer refuses them (per-node --data-parallel-start-rank wiring): never planned.
    sp = _space("code_completion.yaml")
    for r in sp.rows:
        nodes = np.ceil(r.tp * r.pp * r.dp / r.group.gpus_per_node)
        assert not ((r.dp > 1) & (nodes > 1)).any()
    assert any((r.dp > 1).any() for r in sp.rows)
