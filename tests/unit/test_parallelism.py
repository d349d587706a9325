import numpy as np
import pytest

from trilemma.optimizer.catalog import models
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import parallelism
from trilemma.optimizer.perf.parallelism import Parallelism


@pytest.mark.parametrize(("model", "par", "field"), [
    ("meta-llama/Llama-3.1-70B", Parallelism(tp=3), "tp"),
    ("Qwen/Qwen2.5-Coder-14B-Instruct", Parallelism(tp=16), "tp"),
    ("meta-llama/Llama-3.1-8B", Parallelism(pp=64), "pp"),
    ("meta-llama/Llama-3.1-8B", Parallelism(tp=2, ep=True), "ep"),
    ("meta-llama/Llama-3.1-8B", Parallelism(tp=1, dp=2), "dp"),
    ("mistralai/Mixtral-8x7B-v0.1", Parallelism(tp=1, dp=3, ep=True), "ep"),
])
def test_rejects_layouts_the_model_cannot_be_split_by(model, par, field):
    with pytest.raises(InputError) as err:
        parallelism.check(models.load_model(model), par)
    assert err.value.field == field
    assert str(err.value.value) in str(err.value)


def test_accepts_tensor_parallelism_that_replicates_kv_heads():
    parallelism.check(models.load_model("meta-llama/Llama-3.1-8B"), Parallelism(tp=8))


def test_vectorized_feasibility_agrees_with_the_scalar_check():
    arch = models.load_model("Qwen/Qwen3-30B-A3B")
    layouts = [(tp, pp, dp, ep) for tp in (1, 2, 3, 4, 8) for pp in (1, 2) for dp in (1, 2, 4)
               for ep in (False, True)]
    arr = np.array(layouts)
    mask = parallelism.feasible(arch, arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3].astype(bool))
    for (tp, pp, dp, ep), ok in zip(layouts, mask, strict=True):
        try:
            parallelism.check(arch, Parallelism(tp=tp, pp=pp, dp=dp, ep=bool(ep)))
            assert ok, (tp, pp, dp, ep)
        except InputError:
            assert not ok, (tp, pp, dp, ep)


def test_expert_parallel_group_spans_tensor_and_data_ranks():
    p = Parallelism(tp=2, dp=4, ep=True)
    assert (p.gpus, p.moe_ep, p.moe_tp) == (8, 8, 1)
    assert Parallelism(tp=4, dp=2).moe_tp == 8
