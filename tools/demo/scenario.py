"""The demo's scenario: the pool and the endpoint it declares, the traffic it sends (the spec's
workload, then a shift), and the operator's settings, with the figures that make the story
work on one laptop.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trilemma.simfleet.loadgen import LoadStage

if TYPE_CHECKING:
    from trilemma.operator.endpoint import OperatorConfig

Obj = dict[str, Any]

NAMESPACE = "demo"
NAME = "chat"
POOL = "demo-h100"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
# The traffic the endpoint is planned for, and what the steady phase sends: a chat service at
# 4 req/s (120 requests per 30 s window, over the 50 a re-tune check wants), half of whose
# requests open with the same 500-token system prompt.
RATE_RPS = 4.0
PROMPT_MEAN, PROMPT_P90 = 1000.0, 2000.0
OUTPUT_MEAN, OUTPUT_P90 = 150.0, 300.0
PREFIX_TOKENS, PREFIX_SHARE = 500, 0.5
# TTFT p90 200 ms: the steady plan meets it with room (about 75 ms predicted) on one GPU, while
# prompts four times longer push the same GPU past it, so a prompt shift needs a new layout.
SLO_TTFT_P90_MS, SLO_TPOT_P90_MS = 200.0, 50.0
SHIFT_FACTOR = 4.0
# The shifted prompts' p90 over their mean. Narrower than the steady 2x: the plan deploys a
# --max-model-len sized for the steady workload's p99 (about 5.4k tokens), and a 4x lognormal
# tail would be refused by the engine (HTTP 400) and never reach the metrics.
SHIFT_PROMPT_SPREAD = 1.1
INTERVAL_S, WINDOW_S = 10, 30
# Short enough not to matter for the first rollout (there was none before), long enough that
# the demo ends before a second one: the window the first re-plan saw was still mixing the
# old traffic with the new, so the next checks see drift again (and say so: Hold, Cooldown).
COOLDOWN_S = 60
RESYNC_S = 2.0  # the operator's timer: rollouts advance and re-tune checks come due this often
MAX_REPLICAS = 4  # sim-servers share this process and its CPU
POLL_S = 1.0
PLAN_TIMEOUT_S = 300.0  # a search takes seconds, more on a busy laptop
READY_TIMEOUT_S = 60.0
# A Prometheus window counts as inside a phase when it starts this long after the phase did:
# one scrape interval, plus the time requests sent just before take to finish.
WINDOW_MARGIN_S = 2.0
SHIFTS = ("prompt", "rate")
CONTROL_PLANES = ("auto", "real", "kmock")


@dataclass(frozen=True)
class DemoOptions:
    steady_s: float = 45.0
    shift_s: float = 120.0
    shift: str = "prompt"
    seed: int = 0
    prometheus: str | None = None  # the binary; None: $PROMETHEUS, then PATH
    verbose: bool = False  # the operator's log on stderr
    # "auto": a real control plane (trilemma.simfleet.cluster) when its binaries are built,
    # else KMock; "real" or "kmock" to insist on one.
    control_plane: str = "auto"
    # Where Prometheus keeps its data, left there after the run (trilemma.tools.dashboard_render
    # reads it back); None: a temporary folder, removed.
    prometheus_dir: Path | None = None


# ---- the spec and the traffic ----------------------------------------------------------------


def pool_manifest() -> Obj:
    return {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
            "metadata": {"name": POOL},
            # Tolerates the taint GPU nodes carry (the real control plane's fake nodes do).
            "spec": {"gpus": [{"gpu": "h100_sxm", "count": 16, "gpusPerNode": 8,
                               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                "effect": "NoSchedule"}]}]}}


def endpoint_manifest(prometheus_url: str) -> Obj:
    return {
        "apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
        # KMock assigns no uid: one makes the children's owner references real.
        "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": str(uuid.uuid4()),
                     "generation": 1},
        "spec": {
            "model": {"id": MODEL},
            "workload": {
                "promptTokens": {"kind": "lognormal", "mean": PROMPT_MEAN, "p90": PROMPT_P90},
                "outputTokens": {"kind": "lognormal", "mean": OUTPUT_MEAN, "p90": OUTPUT_P90},
                "prefix": {"sharedTokens": PREFIX_TOKENS, "hitRate": PREFIX_SHARE},
                "arrivals": {"kind": "poisson", "requestsPerSecond": RATE_RPS}},
            "slo": {"ttftMs": {"p90": SLO_TTFT_P90_MS}, "tpotMs": {"p90": SLO_TPOT_P90_MS}},
            "objective": "min_cost",
            "hardwarePoolRef": {"name": POOL},
            "engine": {"name": "vllm"},
            "bounds": {"allowDisaggregation": False},
            "retune": {"enabled": True, "intervalSeconds": INTERVAL_S,
                       "windowSeconds": WINDOW_S, "cooldownSeconds": COOLDOWN_S},
            "prometheus": {"url": prometheus_url},
        },
    }


def phases(options: DemoOptions) -> list[LoadStage]:
    """The steady phase (the spec's workload) and the shifted one."""
    steady = LoadStage(duration_s=options.steady_s, name="steady", rate=RATE_RPS,
                       prompt_mean=PROMPT_MEAN, prompt_p90=PROMPT_P90, output_mean=OUTPUT_MEAN,
                       output_p90=OUTPUT_P90, prefix_share=PREFIX_SHARE,
                       prefix_tokens=PREFIX_TOKENS)
    if options.shift == "rate":
        shifted = dataclasses.replace(steady, name="shifted", duration_s=options.shift_s,
                                      rate=RATE_RPS * SHIFT_FACTOR)
    else:
        mean = PROMPT_MEAN * SHIFT_FACTOR
        shifted = dataclasses.replace(steady, name="shifted", duration_s=options.shift_s,
                                      prompt_mean=mean, prompt_p90=mean * SHIFT_PROMPT_SPREAD)
    return [steady, shifted]


def describe_phase(phase: LoadStage) -> str:
    return (f"{phase.rate:g} req/s Poisson, prompts lognormal mean {phase.prompt_mean:.0f} / "
            f"p90 {phase.prompt_p90:.0f} tokens, outputs mean {phase.output_mean:.0f} / p90 "
            f"{phase.output_p90:.0f}, {phase.prefix_share:.0%} of requests open with a shared "
            f"{phase.prefix_tokens}-token prefix")


def operator_config(prometheus_port: int) -> OperatorConfig:
    """The operator as the platform team would set it up: its Prometheus is the demo's."""
    # Imported here: `trilemma --help` imports this module, and these pull in the operator.
    from trilemma.operator.endpoint import OperatorConfig
    from trilemma.tools.inprocess import CACHE_DIR

    return OperatorConfig(prometheus_url=f"http://127.0.0.1:{prometheus_port}",
                          cache_dir=CACHE_DIR)
