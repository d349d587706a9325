"""`trilemma demo`'s pieces that need no servers: its spec, its traffic, its report. The run
itself is tests/integration/test_demo.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from trilemma.operator.resources import OptimizedEndpointSpec
from trilemma.optimizer.catalog import load_model
from trilemma.optimizer.search.space import model_len
from trilemma.optimizer.spec import Workload
from trilemma.tools import cli, demo
from trilemma.tools.demo.process import Problems


def test_the_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--shift {prompt,rate}" in capsys.readouterr().out


def test_the_endpoint_is_a_valid_spec_and_the_steady_phase_is_its_workload():
    body = demo.endpoint_manifest("http://127.0.0.1:9090")
    spec = OptimizedEndpointSpec.model_validate(body["spec"])
    assert spec.retune.enabled and spec.retune.window_seconds == demo.WINDOW_S
    assert spec.prometheus.url == "http://127.0.0.1:9090"
    steady, shifted = demo.phases(demo.DemoOptions(steady_s=10, shift_s=20))
    wl = spec.workload
    assert steady.rate == wl.arrivals.requests_per_second
    assert steady.prompt_lengths.mean_tokens() == pytest.approx(wl.prompt_distribution()
                                                                .mean_tokens())
    assert steady.output_lengths.mean_tokens() == pytest.approx(wl.output_distribution()
                                                                .mean_tokens())
    assert steady.prefix_tokens == wl.prefix.shared_tokens
    assert shifted.prompt_mean == 4 * steady.prompt_mean and shifted.duration_s == 20
    rate = demo.phases(demo.DemoOptions(shift="rate"))[1]
    assert rate.rate == 4 * steady.rate and rate.prompt_mean == steady.prompt_mean


def test_shifted_prompts_fit_the_context_the_steady_plan_deploys():
    # The search sizes --max-model-len for the p99 prompt plus the p99 output (space.py);
    # a shifted request beyond it would be refused and never reach the metrics.
    wl = Workload.model_validate(demo.endpoint_manifest("http://x")["spec"]["workload"])
    limit = model_len(load_model(demo.MODEL), wl.prompt_distribution().percentile_tokens(99)
                      + wl.output_distribution().percentile_tokens(99))
    shifted = demo.phases(demo.DemoOptions())[1]
    rng = np.random.default_rng(0)
    total = (shifted.prompt_lengths.sample(20_000, rng)
             + shifted.output_lengths.sample(20_000, rng))
    assert np.mean(total > limit) < 0.005


def test_the_summary_reads_the_result_and_keeps_the_operator_problems():
    estimate = demo.Estimate(phase="shifted", observed_at=90.0, full_window=True,
                             observed={"rate": 4.1, "prompt": 3900.0, "output": 150.0,
                                       "prefix": 0.06, "ttft_p90_ms": 230.0},
                             truth={"rate": 4.0, "prompt": 4000.0, "output": 152.0,
                                    "prefix": 0.065, "ttft_p90_ms": 190.0}, requests=120)
    assert demo.errors(estimate) == {"rate": 0.025, "prompt": -0.025, "output": -0.0132,
                                     "ttft_p90_ms": 0.2105, "prefix_points": -0.5}
    result = demo.DemoResult(exit_code=0, plan={"summary": "A"}, new_plan={"summary": "B"},
                             replanned=True, accepted=True, rolled_out=True,
                             detection_delay_s=18.0, estimates=[estimate])
    text = "\n".join(demo.summary_lines(result))
    assert "A -> B" in text and "18 s after the shift" in text
    assert "4.10 vs 4.00 (+2.5%)" in text and "0.060 vs 0.065 (-0.5 pt)" in text
    problems = Problems()
    for message in ("Failed to post an event. Code: 409. Message: exists",
                    "Timer failed\nTraceback..."):
        problems.emit(logging.LogRecord("kopf", logging.WARNING, __file__, 1, message, None,
                                        None))
    # A refused Event is a problem again: the emulator used to cause it (it kept generateName
    # unexpanded), and now names Events as an API server does (tests/operator/test_reconcile).
    assert problems.records == ["kopf: Failed to post an event. Code: 409. Message: exists",
                                "kopf: Timer failed"]
