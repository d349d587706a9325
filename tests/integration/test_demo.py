"""`trilemma demo` end to end, with short phases: the real operator against KMock, a real
Prometheus scraping a simulated vLLM fleet, and a prompt shift the loop must follow.

About 100 s: a plan, 35 s of steady traffic (the spec's), then prompts 4x longer until the
rollout is through and a whole window of the new traffic has been observed. Prints the
timeline and the summary (detection delay, estimator errors against loadgen's truth).

The shifted phase has no length of its own to fit: the demo ends it once the story is told
(it polls the endpoint's status for each step), and SHIFT_DEADLINE_S is only how long a
starved machine may take before the run fails naming the step that did not happen. The
detection delay is a figure the demo prints, not a bound asserted here.
"""

from __future__ import annotations

import io
import os

import pytest

from tests.tools import require_tool
from trilemma.simfleet.cluster import INSTALL_HINT, find_kube_bin
from trilemma.tools import demo


def require_kube() -> None:
    message = f"no Kubernetes control-plane binaries: {INSTALL_HINT}"
    if os.environ.get("TRILEMMA_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)

pytestmark = pytest.mark.slow

# Detection (~30 s), search, rollout and a whole 30 s window of new traffic take about 70 s
# on a quiet 2-core machine; four times that before giving up.
SHIFT_DEADLINE_S = 300


@pytest.mark.parametrize("plane", ["real", "kmock"])
async def test_demo_follows_a_prompt_shift_and_leaves_steady_traffic_alone(plane):
    """On the real control plane (its controllers bring the Deployments up) and on KMock (the
    demo plays the Deployment controller)."""
    binary = require_tool("prometheus")  # skip (or fail in CI) before planning anything
    if plane == "real" and find_kube_bin() is None:
        require_kube()
    out = io.StringIO()
    result = await demo.run_demo(demo.DemoOptions(steady_s=35, shift_s=SHIFT_DEADLINE_S,
                                                  prometheus=binary, control_plane=plane),
                                 out=out)
    print(out.getvalue())
    print("\n".join(demo.summary_lines(result)))

    assert result.exit_code == demo.EXIT_ROLLED_OUT, result.message
    assert result.steady_replans == 0 and result.steady_rollouts == 0
    # Detected after the shift, by a check of its own (the figure itself is printed above).
    assert result.detection_delay_s is not None and result.detection_delay_s > 0
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
    result = await demo.run_demo(demo.DemoOptions(control_plane="kmock"), out=out)
    assert result.exit_code == demo.EXIT_NO_PROMETHEUS
    assert result.plan["summary"] and result.plan["costPerHour"] > 0
    assert "apt-get install prometheus" in result.message
    assert ".ci/install-prometheus" in result.message
    assert "plan" in {e.kind for e in result.timeline}
