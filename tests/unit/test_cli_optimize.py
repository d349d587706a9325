import json
from pathlib import Path

from trilemma.optimizer import cli

FIXTURES = Path(__file__).parent / "fixtures" / "cli"
SMALL = FIXTURES / "small.yaml"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_optimize_prints_the_front_and_the_recommendation(capsys):
    code, out, err = run(capsys, "optimize", SMALL)
    assert code == 0
    assert "searched" in out and "recommended (min_cost)" in out
    assert "binding" in out and "sensitivity" in out
    assert "[" in err  # the progress bar goes to stderr, not into the report


def test_optimize_json_is_deterministic_and_renders(capsys, tmp_path):
    _, first, _ = run(capsys, "optimize", SMALL, "--json")
    _, second, _ = run(capsys, "optimize", SMALL, "--json")
    assert first == second
    plan = json.loads(first)
    assert plan["recommended"]["prediction"]["cost_per_hour"] > 0
    assert plan["counts"]["enumerated"] >= plan["counts"]["screened"] > 0
    path = tmp_path / "plan.json"
    path.write_text(first)
    code, out, _ = run(capsys, "render", path, "--name", "small")
    assert code == 0 and "vllm serve meta-llama/Llama-3.1-8B" in out


def test_an_slo_nothing_meets_exits_2_naming_the_binding_term(capsys):
    code, _, err = run(capsys, "optimize", FIXTURES / "impossible.yaml")
    assert code == 2
    assert "slo=" in err and "tpot p90" in err and "Nearest" in err


def test_optimize_plot_writes_both_pictures(capsys, tmp_path):
    target = tmp_path / "curves.png"
    code, _, _ = run(capsys, "optimize", SMALL, "--plot", target)
    assert code == 0
    for path in (target, tmp_path / "curves-pareto.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "meta-llama/Llama-3.1-8B", "replicas": 1,
                                "worker": {"gpu": "l40s", "tp": 1, "quant": "fp8",
                                           "max_num_seqs": 64}}))
    return path


def test_simulate_open_loop_reports_percentiles(capsys, tmp_path):
    code, out, _ = run(capsys, "simulate", SMALL, "--config", _config(tmp_path), "--requests",
                       "300", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["mode"] == "open"
    assert 0 < doc["ttft_ms"]["p50"] <= doc["ttft_ms"]["p90"] <= doc["ttft_ms"]["p99"]
    assert doc["requests_per_s"] > 0


def test_simulate_closed_loop_saturates_throughput_above_open_loop_rate(capsys, tmp_path):
    config = _config(tmp_path)
    _, open_out, _ = run(capsys, "simulate", SMALL, "--config", config, "--requests", "300",
                         "--json")
    _, closed_out, _ = run(capsys, "simulate", SMALL, "--config", config, "--requests", "300",
                           "--mode", "closed", "--concurrency", "64", "--json")
    assert json.loads(closed_out)["requests_per_s"] > json.loads(open_out)["requests_per_s"]


def test_simulate_with_a_bad_config_file_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, err = run(capsys, "simulate", SMALL, "--config", bad)
    assert code == 2 and "config=" in err


def test_optimize_compares_the_recommendation_with_a_baseline(capsys, tmp_path):
    code, out, _ = run(capsys, "optimize", SMALL, "--baseline", _config(tmp_path))
    assert code == 0
    lines = [ln for ln in out.splitlines() if "req/s at the SLO" in ln]
    assert len(lines) == 2 and lines[0].strip().startswith("recommended")


def test_no_context_parallel_takes_the_lever_out_of_the_search(capsys, monkeypatch):
    from trilemma.optimizer import commands
    from trilemma.optimizer.errors import InputError

    seen = []

    def plan(request, *, settings=None, **_):
        seen.append(settings)
        raise InputError("spec", "stop", "captured the settings")

    monkeypatch.setattr(commands.planning, "plan", plan)
    run(capsys, "optimize", SMALL, "--json")
    run(capsys, "optimize", SMALL, "--json", "--no-context-parallel")
    assert seen[0] is None  # the defaults: context parallelism offered where it applies
    assert seen[1].cp == (1,)
