"""`trilemma validate --simulate`: each row's benchmark replayed through the serving simulator
with its client as it ran (validation_sim, perf/data/bench_clients.yaml)."""

import dataclasses
import json

import numpy as np
import pytest

from trilemma.optimizer import validation, validation_sim
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.perf import latency
from trilemma.optimizer.perf.engine import Engine, engine_facts
from trilemma.optimizer.perf.parallelism import Parallelism
from trilemma.optimizer.serving import toy

SGLANG = toy.RooflineStepModel(models.load_model("meta-llama/Llama-3.1-8B"),
                               gpus.get_gpu("h100_sxm"), engine_facts(Engine.SGLANG))
ONE = Parallelism(tp=1, pp=1, dp=1, ep=False)
IMAX = validation_sim.clients().for_source("source_file=2026-03-25.csv; model=GLM-5")


def test_rows_take_the_client_their_source_names():
    c = validation_sim.clients()
    assert c.for_source("db-dump/2026-04-27; config_id=615").name == "inferencemax"
    assert c.for_source("source_file=2026-04-06.csv; model=DeepSeek-R1").name == "inferencemax"
    aic = c.for_source("source_file=/x/aic-auto-gap-analysis/data/h100_sxm/vllm/0.12.0/q.csv")
    assert aic.name == "aiconfigurator_aiperf" and aic.range_ratio == 1.0
    assert c.for_source("source_file=kimi-k2.5-gap-analysis.csv").name == "aiconfigurator_aiperf"
    assert (IMAX.requests_per_concurrency, IMAX.range_ratio) == (10, 0.8)


def test_the_workload_is_benchmark_servings_uniform_draw():
    w = validation_sim.workload(IMAX, concurrency=16, isl=1024, osl=1000)
    assert len(w) == 160 and w.concurrency == 16
    for lengths, top in ((w.prompt_tokens, 1024), (w.output_tokens, 1000)):
        assert lengths.min() >= int(0.8 * top) and lengths.max() <= top
        assert lengths.std() > 0.05 * top  # spread over the range, not fixed


@pytest.mark.parametrize("isl,osl,concurrency", [(1000, 200, 8), (1000, 200, 32),
                                                 (4000, 500, 32)])
def test_jittered_lengths_desynchronise_the_clients(isl, osl, concurrency):
    """The closed form prices SGLang's loop as lockstep prefill-first waves. With the lengths
    InferenceMAX draws (uniform in [0.8 L, L]) the clients drift apart: a prefill batch holds
    a few prompts, not the whole wave, and the simulated TTFT falls well below the waves'
    (observed 0.21-0.45x here). The same run with fixed lengths stays in lockstep and agrees
    with the waves (within 1.3% observed, its first wave counted): the difference is the
    jitter, not the simulator."""
    an = latency.closed_loop(SGLANG, tp=1, pp=1, dp=1, ep=False, concurrency=concurrency,
                             prompt_tokens=isl, output_tokens=osl)
    jittered = validation_sim.simulate_row(SGLANG, ONE, IMAX, concurrency=concurrency,
                                           isl=isl, osl=osl)
    fixed = validation_sim.simulate_row(SGLANG, ONE, dataclasses.replace(IMAX, range_ratio=1.0),
                                        concurrency=concurrency, isl=isl, osl=osl)
    assert jittered.ttft_ms < 0.6 * float(an.ttft_ms)
    assert fixed.ttft_ms == pytest.approx(float(an.ttft_ms), rel=0.03)


def test_the_simulated_path_is_deterministic():
    runs = [validation_sim.simulate_row(SGLANG, ONE, IMAX, concurrency=24, isl=2000, osl=300)
            for _ in range(2)]
    assert runs[0] == runs[1]
    a, b = (validation_sim.workload(IMAX, concurrency=24, isl=2000, osl=300) for _ in range(2))
    np.testing.assert_array_equal(a.prompt_tokens, b.prompt_tokens)
    np.testing.assert_array_equal(a.output_tokens, b.output_tokens)


ROW = {"id": "r1", "backend": "sglang",
       "silicon_data_source": "source_file=2026-03-25.csv", "model_path": "Qwen/Qwen3-32B",
       "system": "h100_sxm", "precision": "bf16", "gemm_quant_mode": "", "mode": "agg",
       "isl": "1024", "osl": "1024", "batch_size": "32", "tp_size": "2", "pp_size": "1",
       "attention_dp_size": "1", "moe_tp_size": "", "moe_ep_size": "",
       "silicon_ttft_ms": "100", "silicon_tpot_ms": "10"}


def _calibrated_or_skip():
    try:
        validation.predict_rows([ROW])
    except (AttributeError, ImportError, FileNotFoundError, KeyError) as e:
        pytest.skip(f"calibrated kernels unavailable: {e!r}")


def test_validate_simulates_only_the_engines_asked_for():
    _calibrated_or_skip()
    closed = validation.predict_rows([ROW])[0]
    simulated = validation.predict_rows([ROW], simulate={Engine.SGLANG})[0]
    other = validation.predict_rows([ROW], simulate={Engine.VLLM})[0]
    assert other == closed
    assert simulated.skipped is None and simulated.pred_ttft_ms < closed.pred_ttft_ms
    assert validation.predict_rows([ROW], simulate={Engine.SGLANG})[0] == simulated


def test_cli_validate_simulate_replays_the_named_engine(capsys, tmp_path):
    _calibrated_or_skip()
    from trilemma.optimizer import cli
    path = tmp_path / "rows.csv"
    path.write_text(",".join(ROW) + "\n" + ",".join(ROW.values()) + "\n")

    def ttft(*extra):
        assert cli.main(["validate", str(path), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)["rows"][0]["pred_ttft_ms"]

    closed = ttft()
    assert ttft("--simulate", "vllm") == closed
    assert ttft("--simulate", "sglang") == ttft("--simulate", "all") < closed


def test_the_simulated_fit_leaves_out_the_closed_forms_first_wave_weight():
    """The simulator sends the client's own requests (bench_clients.yaml), so the closed
    form's fitted requests-per-concurrency moves no simulated prediction: nothing to fit."""
    _calibrated_or_skip()
    from trilemma.optimizer import engine_fit
    vllm = engine_facts(Engine.VLLM)
    assert "benchmark_requests_per_concurrency" not in engine_fit.fitted_keys(vllm, True)
    row = dict(ROW, backend="vllm")
    facts = [{Engine.VLLM: dataclasses.replace(vllm, benchmark_requests_per_concurrency=w)}
             for w in (2.0, 20.0)]
    runs = [validation.predict_rows([row], simulate={Engine.VLLM}, facts=f)[0] for f in facts]
    assert runs[0] == runs[1] and runs[0].skipped is None
