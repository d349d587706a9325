"""`trilemma demo` end to end, with short phases: the real operator against KMock, a real
Prometheus scraping a simulated vLLM fleet, and a prompt shift the loop must follow.

About 100 s: a plan, 35 s of steady traffic (the spec's), then prompts 4x longer until the
rollout is through and a whole window of the new traffic has been observed. Prints the
timeline and the summary (detection delay, estimator errors against loadgen's truth).
"""

from __future__ import annotations

import io

import pytest

from tests.tools import require_tool
from trilemma.operator import demo

pytestmark = pytest.mark.slow


async def test_demo_follows_a_prompt_shift_and_leaves_steady_traffic_alone():
    binary = require_tool("prometheus")  # skip (or fail in CI) before planning anything
    out = io.StringIO()
    result = await demo.run_demo(demo.DemoOptions(steady_s=35, shift_s=90, prometheus=binary),
                                 out=out)
    print(out.getvalue())
    print("\n".join(demo.summary_lines(result)))

    assert result.exit_code == demo.EXIT_ROLLED_OUT, result.message
    assert result.steady_replans == 0 and result.steady_rollouts == 0
    # Two checks 10 s apart must see the drift; the first may come up to one interval (plus
    # the timer's 2 s) after the shift, and the window needs a few seconds of new traffic.
    assert result.detection_delay_s is not None and 0 < result.detection_delay_s <= 35
    assert result.replanned and result.accepted and result.rolled_out
    assert result.new_plan["hash"] != result.plan["hash"]
    kinds = {e.kind for e in result.timeline}
    assert {"plan", "kubelet", "traffic", "shift", "DETECTED", "accepted", "new plan",
            "rollout", "service", "removed"} <= kinds
    assert "REPLAN" not in kinds  # the marker of a re-plan during steady traffic

    shifted = next(e for e in result.estimates if e.phase == "shifted")
    assert shifted.full_window and shifted.requests >= 50
    errors = demo.errors(shifted)
    # Truth and estimate cover the same window, so Poisson noise cancels: what is left is
    # scrape alignment and the histograms' interpolation.
    assert abs(errors["rate"]) <= 0.15, errors
    assert abs(errors["prompt"]) <= 0.10 and abs(errors["output"]) <= 0.10, errors
    assert abs(errors["prefix_points"]) <= 5, errors
    assert result.load["shifted"]["failed"] == 0  # the shifted prompts fit --max-model-len


async def test_demo_without_prometheus_plans_then_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("PROMETHEUS", "/nonexistent/prometheus")
    out = io.StringIO()
    result = await demo.run_demo(demo.DemoOptions(), out=out)
    assert result.exit_code == demo.EXIT_NO_PROMETHEUS
    assert result.plan["summary"] and result.plan["costPerHour"] > 0
    assert "apt-get install prometheus" in result.message
    assert ".ci/install-prometheus" in result.message
    assert "plan" in {e.kind for e in result.timeline}
