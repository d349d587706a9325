"""`trilemma demo`: the closed loop on this machine, printed as a timeline.

Everything listens on loopback, in this process except Prometheus:

    KMock (an emulated Kubernetes API) + the real operator (Kopf, in-process)
      -> a HardwarePool and an OptimizedEndpoint -> the operator's plan
      -> a simulated vLLM fleet serving the plan's configuration (trilemma.simfleet)
      -> a real Prometheus scraping it, with the labels a PodMonitor would add
      -> steady traffic matching the spec, then a shift (prompts x4, or the rate x4)
      -> the operator's re-tune check sees the drift, re-plans and rolls out.

KMock runs no controllers, so the demo plays the Deployment controller: it marks each new
Deployment available, and says so. The simulated fleet keeps serving the first plan's
configuration: the demo ends once the rollout is through and the shifted traffic has been
observed over a whole window, and compares what the operator estimated from Prometheus with
what the load generator sent. Exit 0 when the loop re-planned and rolled out, 1 otherwise, 2
when Prometheus is not installed (after the planning part, which needs none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from trilemma.optimizer.cli import Subcommand
from trilemma.simfleet import loadgen
from trilemma.simfleet.loadgen import Phase
from trilemma.simfleet.prometheus_server import (
    INSTALL_HINT,
    PrometheusServer,
    ScrapeJob,
    find_prometheus,
    free_port,
)

if TYPE_CHECKING:
    from trilemma.operator.endpoint import OperatorConfig

Obj = dict[str, Any]

EXIT_ROLLED_OUT = 0
EXIT_NO_ROLLOUT = 1
EXIT_NO_PROMETHEUS = 2
EXIT_INTERRUPTED = 130

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


# ---- the spec and the traffic ----------------------------------------------------------------


def pool_manifest() -> Obj:
    return {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
            "metadata": {"name": POOL},
            # Tolerates the taint GPU nodes carry (the real control plane's fake nodes do).
            "spec": {"gpus": [{"gpu": "h100_sxm", "count": 8, "gpusPerNode": 8,
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


def phases(options: DemoOptions) -> list[Phase]:
    """The steady phase (the spec's workload) and the shifted one."""
    steady = Phase(duration_s=options.steady_s, name="steady", rate=RATE_RPS,
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


def describe_phase(phase: Phase) -> str:
    return (f"{phase.rate:g} req/s Poisson, prompts lognormal mean {phase.prompt_mean:.0f} / "
            f"p90 {phase.prompt_p90:.0f} tokens, outputs mean {phase.output_mean:.0f} / p90 "
            f"{phase.output_p90:.0f}, {phase.prefix_share:.0%} of requests open with a shared "
            f"{phase.prefix_tokens}-token prefix")


# ---- the timeline ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the demo started
    kind: str
    message: str
    data: Obj = field(default_factory=dict)

    def to_dict(self) -> Obj:
        return {"t": round(self.t, 2), "kind": self.kind, "message": self.message,
                **({"data": self.data} if self.data else {})}


class Timeline:
    """Events as they happen: printed to `out` (if any) and kept for the JSON report."""

    WIDTH = 100

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.start = time.time()
        self.events: list[Event] = []

    def at(self, unix_s: float) -> float:
        return unix_s - self.start

    def add(self, kind: str, message: str, *, when: float | None = None, **data: Any) -> Event:
        event = Event(t=self.at(time.time() if when is None else when), kind=kind,
                      message=message, data=data)
        self.events.append(event)
        self._print(f"[{event.t:6.1f}s] {kind:<9} ", message)
        return event

    def say(self, text: str = "") -> None:
        """A line that is not an event (headings, the summary)."""
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def _print(self, head: str, message: str) -> None:
        if self.out is None:
            return
        lines = textwrap.wrap(message, width=self.WIDTH - len(head),
                              break_on_hyphens=False) or [""]
        print(head + lines[0], file=self.out)
        for line in lines[1:]:
            print(" " * len(head) + line, file=self.out)
        self.out.flush()


# ---- the result -------------------------------------------------------------------------------


@dataclass
class Estimate:
    """One status.observedWorkload against what loadgen saw finish in the same window."""

    phase: str
    observed_at: float  # seconds since the demo started
    full_window: bool  # the window lies inside the phase
    observed: Obj  # rate, prompt, output, prefix
    truth: Obj
    requests: int

    def to_dict(self) -> Obj:
        return {"phase": self.phase, "observedAt": round(self.observed_at, 1),
                "fullWindow": self.full_window, "requests": self.requests,
                "observed": self.observed, "truth": self.truth, "error": errors(self)}


def errors(e: Estimate) -> Obj:
    """Relative errors of rate, lengths and TTFT p90; the prefix share's in points (a share near 0
    makes a relative error meaningless)."""
    out: Obj = {}
    for key in ("rate", "prompt", "output", "ttft_p90_ms"):
        seen, true = e.observed.get(key), e.truth.get(key)
        if seen is not None and true:
            out[key] = round(seen / true - 1.0, 4)
    seen, true = e.observed.get("prefix"), e.truth.get("prefix")
    if seen is not None and true is not None:
        out["prefix_points"] = round((seen - true) * 100, 2)
    return out


@dataclass
class DemoResult:
    exit_code: int = EXIT_NO_ROLLOUT
    message: str = ""  # why the demo stopped short, if it did
    shift: str = "prompt"
    plan: Obj = field(default_factory=dict)
    new_plan: Obj = field(default_factory=dict)
    replanned: bool = False
    accepted: bool | None = None  # None: no verdict on a re-plan yet
    rolled_out: bool = False
    detection_delay_s: float | None = None
    steady_replans: int = 0
    steady_rollouts: int = 0
    estimates: list[Estimate] = field(default_factory=list)
    load: Obj = field(default_factory=dict)  # loadgen's per-phase report
    log_problems: list[str] = field(default_factory=list)
    timeline: list[Event] = field(default_factory=list)

    def to_dict(self) -> Obj:
        return {"exitCode": self.exit_code, "message": self.message, "shift": self.shift,
                "plan": self.plan,
                "newPlan": self.new_plan, "replanned": self.replanned,
                "accepted": self.accepted, "rolledOut": self.rolled_out,
                "detectionDelaySeconds": self.detection_delay_s,
                "steadyReplans": self.steady_replans, "steadyRollouts": self.steady_rollouts,
                "estimates": [e.to_dict() for e in self.estimates], "load": self.load,
                "operatorLogProblems": self.log_problems,
                "timeline": [e.to_dict() for e in self.timeline]}


# ---- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables, restoring them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Problems(logging.Handler):
    """Keeps the operator's warnings and errors for the summary, instead of printing them
    between the timeline's lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        first = message.splitlines()[0] if message else ""
        self.records.append(f"{record.name}: {first}"[:300])


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[_Problems]:
    root = logging.getLogger()
    problems = _Problems()
    added: list[logging.Handler] = [problems]
    level = root.level
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        stream.setLevel(logging.INFO)
        added.append(stream)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    for handler in added:
        root.addHandler(handler)
    try:
        yield problems
    finally:
        for handler in added:
            root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM cancel the demo (which then cleans up). Kopf, running in this loop,
    installs handlers that would stop only the operator; these replace them."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if task is not None:
                loop.add_signal_handler(sig, task.cancel)
                installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _unix(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class _Demo:
    """One run: the state the watcher keeps between polls, and the steps."""

    def __init__(self, options: DemoOptions, timeline: Timeline, api: Any, *,
                 controllers: bool = False) -> None:
        self.options = options
        # True on a real control plane: its Deployment controller and kwok bring Deployments
        # up; the demo only reports it. False on KMock, where the demo plays that part.
        self.controllers = controllers
        self.available: set[str] = set()
        self.timeline = timeline
        self.api = api
        self.result = DemoResult(shift=options.shift)
        self.status: Obj = {}
        self.phase: str | None = None
        self.metrics: tuple[str, str] | None = None
        self.history: set[tuple[str, str, str]] = set()
        self.observations: list[tuple[float, Obj]] = []  # (observedAt unix, observedWorkload)
        self.deployments: set[str] = set()
        self.marked: set[str] = set()
        self.explained_marking = False
        self.service_hash: str | None = None
        self.rollouts: set[str] = set()  # toHash of each rollout seen
        self.first_hash: str | None = None
        self.first_key: tuple[Any, Any] | None = None
        self.serving_hash: str | None = None
        self.load_start: float | None = None  # unix
        self.shift_start: float | None = None  # unix
        self.load_end = float("inf")  # unix, once the traffic is told to stop
        self.shift_announced = False
        self.new_plan_announced = False
        self.kept: list[float] = []  # when each re-plan was not rolled out

    # -- watching ------------------------------------------------------------------------------

    async def poll(self) -> None:
        """One look at the endpoint and its children; prints what changed, and plays the
        Deployment controller."""
        now = time.time()
        if (self.shift_start is not None and now >= self.shift_start
                and not self.shift_announced):
            self.shift_announced = True
            shifted = phases(self.options)[1]
            what = ("prompts x4" if self.options.shift == "prompt" else "request rate x4")
            self.timeline.add("shift", f"traffic shift: {what} - {describe_phase(shifted)}",
                              when=self.shift_start)
        body = self.api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NAMESPACE, NAME)
        self.status = (body or {}).get("status") or {}
        st = self.status
        if st.get("phase") == "Optimizing":
            self._watch_phase(st)
        self._watch_metrics(st)
        self._watch_history(st)
        self._watch_plan(st)
        await self._watch_deployments()
        self._watch_rollout(st)
        self._watch_service()
        self._watch_phase(st)

    def _watch_phase(self, st: Obj) -> None:
        if st.get("phase") != self.phase:
            self.phase = st.get("phase")
            message = st.get("message") or ""
            self.timeline.add("phase", f"{self.phase}" + (f": {message}" if message else ""))

    def _watch_metrics(self, st: Obj) -> None:
        observed = st.get("observedWorkload") or {}
        stamp = observed.get("observedAt")
        if stamp and (not self.observations or self.observations[-1][1].get("observedAt")
                      != stamp):
            self.observations.append((_unix(stamp), observed))
            if observed.get("rateRps") is not None:
                self.timeline.add("observed", _observed_line(observed),
                                  observedWorkload=observed)
        cond = next((c for c in st.get("conditions") or []
                     if c.get("type") == "MetricsAvailable"), None)
        if cond is not None and (cond.get("status"), cond.get("reason")) != self.metrics:
            self.metrics = (cond.get("status"), cond.get("reason"))
            self.timeline.add("metrics", f"MetricsAvailable={cond.get('status')} "
                                         f"({cond.get('reason')}): {cond.get('message', '')}")

    def _watch_history(self, st: Obj) -> None:
        for entry in st.get("retuneHistory") or []:
            key = (entry.get("time", ""), entry.get("action", ""), entry.get("reason", ""))
            if key in self.history:
                continue
            self.history.add(key)
            # Printed when seen; a re-plan's entries appear once its search is done, so the
            # decision's own time (the check's) is what the detection delay counts.
            when = _unix(entry["time"]) if entry.get("time") else time.time()
            action, cause, reason = entry.get("action"), entry.get("cause"), entry.get("reason")
            shifted = self.shift_start is not None and when >= self.shift_start
            if action == "Replan":
                self.result.replanned = self.result.replanned or shifted
                decided = f"decided at {self.timeline.at(when):.0f} s"
                if not shifted:
                    self.result.steady_replans += 1
                    self.timeline.add("REPLAN", f"during steady traffic, {decided} ({cause}): "
                                                f"{reason}", entry=entry)
                    continue
                if self.result.detection_delay_s is None and self.shift_start is not None:
                    self.result.detection_delay_s = round(when - self.shift_start, 1)
                    self.timeline.add(
                        "DETECTED", f"Replan ({cause}), {decided}, "
                                    f"{when - self.shift_start:.0f} s after the shift: {reason}",
                        entry=entry)
                else:
                    self.timeline.add("replan", f"({cause}, {decided}) {reason}", entry=entry)
            elif action == "RollOut":
                self.result.accepted = True
                self.timeline.add("accepted", f"{reason}{_figures(entry)}", entry=entry)
            elif action == "Keep":
                if self.result.accepted is None:
                    self.result.accepted = False
                self.kept.append(when)
                self.timeline.add("kept", f"{reason}{_figures(entry)}", entry=entry)
            else:
                self.timeline.add("check", f"{action} ({cause}): {reason}", entry=entry)

    def _watch_plan(self, st: Obj) -> None:
        active = st.get("activeConfiguration") or {}
        if not active.get("hash") or (st.get("phase") == "Optimizing"):
            return
        # A new plan may keep the Deployment (a replica-only change scales it in place), so
        # the replica count counts as much as the hash.
        key = (active["hash"], active.get("replicas"))
        if self.first_hash is None:
            self.first_hash = active["hash"]
            self.first_key = key
            self.result.plan = _plan_summary(st)
            self.timeline.add("plan", _plan_line(st), plan=self.result.plan)
        elif key != self.first_key and not self.new_plan_announced:
            self.new_plan_announced = True
            self.result.new_plan = _plan_summary(st)
            self.timeline.add("new plan", _plan_line(st), plan=self.result.new_plan)

    async def _watch_deployments(self) -> None:
        if self.first_hash is None:
            # The reconciler applies the children before it writes the status: tell the plan
            # first, then what it deployed.
            return
        live = {d["metadata"]["name"]: d
                for d in self.api.list("apps/v1", "Deployment", NAMESPACE)}
        for name in sorted(set(live) - self.deployments):
            self.deployments.add(name)
            replicas = live[name]["spec"].get("replicas", 1)
            self.timeline.add("deploy", f"Deployment {name} created ({replicas} replica(s))")
        for name in sorted(self.deployments - set(live)):
            self.deployments.discard(name)
            self.timeline.add("removed", f"Deployment {name} deleted by the operator")
        for name, dep in sorted(live.items()):
            replicas = dep["spec"].get("replicas", 1)
            have = (dep.get("status") or {}).get("availableReplicas")
            if self.controllers:
                self._report_available(name, replicas, have)
                continue
            if have == replicas:
                continue
            # New, or scaled in place: either way no controller will bring it up here.
            scaled = f" at {replicas} replica(s)" if have else ""
            await self.api.patch("apps/v1", "Deployment", NAMESPACE, name, {"status": {
                "replicas": replicas, "readyReplicas": replicas,
                "availableReplicas": replicas}})
            why = ("" if self.explained_marking else
                   " (KMock runs no controllers and no pods: the demo stands in for the "
                   "Deployment controller and the kubelet)")
            self.explained_marking = True
            self.timeline.add("kubelet", f"Deployment {name} marked available{scaled}{why}")

    def _report_available(self, name: str, replicas: int, have: int | None) -> None:
        if have != replicas:
            self.available.discard(name)
            return
        if name in self.available:
            return
        self.available.add(name)
        pods = self.api.list("v1", "Pod", NAMESPACE)
        nodes = sorted({p["spec"].get("nodeName") or "?" for p in pods
                        if p["metadata"]["name"].startswith(f"{name}-")})
        self.timeline.add("kubelet", f"Deployment {name} available ({replicas} replica(s)): "
                                     f"kube-scheduler placed its pods on {', '.join(nodes)}, "
                                     f"kwok marked them Ready, the Deployment controller "
                                     f"counted them")

    def _watch_rollout(self, st: Obj) -> None:
        rollout = st.get("rollout") or {}
        to_hash, state = rollout.get("toHash"), rollout.get("state")
        if rollout.get("fromHash") and to_hash and to_hash not in self.rollouts:
            self.rollouts.add(to_hash)
            steady = self.shift_start is None or time.time() < self.shift_start
            if steady:
                self.result.steady_rollouts += 1
            self.timeline.add("rollout", f"started: {rollout['fromHash']} -> {to_hash}; the "
                                         f"old configuration serves until the new one is "
                                         f"available" + (" (during steady traffic!)"
                                                         if steady else ""),
                              rollout=rollout)
        serving = st.get("servingHash")
        if serving != self.serving_hash:
            if self.serving_hash is not None and state == "Complete":
                self.timeline.add("rollout", f"complete: {serving} serves", rollout=rollout)
            self.serving_hash = serving
        # Rolled out: the new plan is Ready and alone (a new Deployment the Service moved to,
        # the old one deleted; or the old one scaled in place).
        active = st.get("activeConfiguration") or {}
        if (self.new_plan_announced and not self.result.rolled_out
                and self.shift_start is not None and time.time() >= self.shift_start
                and st.get("phase") == "Ready" and state != "Progressing"
                and len(self.deployments) == 1):
            self.result.rolled_out = True
            self.timeline.add("done", f"the new plan serves: {active.get('summary')}")

    def _watch_service(self) -> None:
        svc = self.api.get("v1", "Service", NAMESPACE, NAME)
        selector = ((svc or {}).get("spec") or {}).get("selector") or {}
        found = selector.get("trilemma.dev/config-hash")
        if found != self.service_hash:
            if self.service_hash is not None:
                self.timeline.add("service", f"Service {NAME} switched: selector "
                                             f"config-hash {self.service_hash} -> {found}")
            self.service_hash = found

    async def poll_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> bool:
        end = time.monotonic() + timeout_s
        while True:
            await self.poll()
            if done():
                return True
            if time.monotonic() > end:
                self.timeline.add("timeout", f"gave up waiting for {what} after "
                                             f"{timeout_s:.0f} s")
                return False
            await asyncio.sleep(POLL_S)

    # -- the end -------------------------------------------------------------------------------

    def has_shift_window(self) -> bool:
        assert self.shift_start is not None
        # Only observations with figures: a check whose query failed (a busy machine can time
        # one out) writes an observedWorkload without a rate, which no estimate can use.
        return any(t - WINDOW_S >= self.shift_start + WINDOW_MARGIN_S
                   for t, o in self.observations if o.get("rateRps") is not None)

    def pending(self) -> str:
        """The first step of the story after the shift that has not happened yet: what a run
        that ran out of time names, instead of a bare timeout."""
        if self.shift_start is None or time.time() < self.shift_start:
            return "the shift (still in the steady phase)"
        if not self.result.replanned:
            return ("a re-plan after the shift (no Replan entry in status.retuneHistory: "
                    "the drift was not detected)")
        if self.result.accepted is None:
            return "a verdict on the re-plan (RollOut or Keep in status.retuneHistory)"
        if self.result.accepted and not self.result.rolled_out:
            return ("the rollout to finish (the new Deployment alone and the endpoint Ready "
                    "again)")
        if not self.has_shift_window():
            return (f"a whole {WINDOW_S} s window of shifted traffic in "
                    "status.observedWorkload")
        return "a re-plan kept on a window of shifted traffic only"

    def settled(self) -> bool:
        """The story is told: the re-plan was rolled out (or kept) and the shifted traffic was
        observed over a whole window."""
        if self.shift_start is None or not self.has_shift_window():
            return False
        # A re-plan kept on a window that still mixed in the old traffic does not end the
        # story: the next checks may decide otherwise.
        kept = any(t - WINDOW_S >= self.shift_start + WINDOW_MARGIN_S for t in self.kept)
        return self.result.rolled_out or kept

    def estimates(self, report: Any) -> list[Estimate]:
        """For each phase, its latest observation (a whole window inside the phase if there
        is one) against the requests loadgen saw finish in the same window."""
        assert self.load_start is not None and self.shift_start is not None
        out = []
        bounds = (("steady", self.load_start, self.shift_start),
                  ("shifted", self.shift_start, self.load_end))
        for name, start, end in bounds:
            inside = [(t, o) for t, o in self.observations
                      if start < t <= end and o.get("rateRps") is not None]
            if not inside:
                continue
            full = [(t, o) for t, o in inside if t - WINDOW_S >= start + WINDOW_MARGIN_S]
            t, observed = (full or inside)[-1]
            truth, count = _truth(report, self.load_start, t - WINDOW_S, t)
            out.append(Estimate(
                phase=name, observed_at=self.timeline.at(t), full_window=bool(full),
                observed={"rate": observed.get("rateRps"),
                          "prompt": (observed.get("promptTokens") or {}).get("mean"),
                          "output": (observed.get("outputTokens") or {}).get("mean"),
                          "prefix": observed.get("prefixHitShare"),
                          "ttft_p90_ms": (observed.get("ttftMs") or {}).get("p90")},
                truth=truth, requests=count))
        return out


def _truth(report: Any, load_start: float, since: float, until: float) -> tuple[Obj, int]:
    """What loadgen saw finish in (since, until] (unix seconds): the window's true figures."""
    done = [r for r in report.requests if r.ok and r.e2e_s is not None
            and since < load_start + r.sent_s + r.e2e_s <= until]
    if not done:
        return {}, 0
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.usage_cached or 0 for r in done)
    served = sum(r.usage_prompt or r.prompt_tokens for r in done)
    ttft = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    return {"rate": round(len(done) / (until - since), 4),
            "prompt": round(prompt / len(done), 1),
            "output": round(sum(r.output_tokens for r in done) / len(done), 1),
            "prefix": round(cached / served, 4) if served else None,
            # Measured by the client: includes the HTTP hop the server's histogram does not.
            "ttft_p90_ms": round(ttft[int(0.9 * (len(ttft) - 1))] * 1000, 1) if ttft else None,
            }, len(done)


def _plan_summary(st: Obj) -> Obj:
    active = st.get("activeConfiguration") or {}
    pred = st.get("predictions") or {}
    opt = st.get("lastOptimization") or {}
    return {"hash": active.get("hash"), "summary": active.get("summary"),
            "gpus": active.get("gpus"), "replicas": active.get("replicas"),
            "costPerHour": st.get("costPerHour"), "ttftP90Ms": pred.get("ttftP90Ms"),
            "tpotP90Ms": pred.get("tpotP90Ms"), "capacityRps": pred.get("capacityRps"),
            "candidates": opt.get("candidates"), "searchSeconds": opt.get("durationSeconds"),
            "reused": opt.get("reused")}


def _plan_line(st: Obj) -> str:
    p = _plan_summary(st)

    def num(v: Any, fmt: str) -> str:
        return "?" if v is None else format(v, fmt)

    searched = ("reused the stored plan" if p["reused"] else
                f"{num(p['candidates'], ',')} configurations searched in "
                f"{num(p['searchSeconds'], '.1f')} s")
    return (f"{p['summary']} ({p['hash']}): ${num(p['costPerHour'], '.2f')}/h, predicted "
            f"TTFT p90 {num(p['ttftP90Ms'], '.0f')} ms, TPOT p90 {num(p['tpotP90Ms'], '.1f')} "
            f"ms, {num(p['capacityRps'], '.1f')} req/s within the SLO; {searched}")


def _observed_line(o: Obj) -> str:
    def mean(key: str) -> str:
        v = (o.get(key) or {}).get("mean")
        return "?" if v is None else f"{v:.0f}"

    share = o.get("prefixHitShare")
    ttft = (o.get("ttftMs") or {}).get("p90")
    parts = [f"{o['rateRps']:.2f} req/s", f"prompt {mean('promptTokens')}",
             f"output {mean('outputTokens')} tokens"]
    if share is not None:
        parts.append(f"prefix hits {share:.0%}")
    if ttft is not None:
        parts.append(f"TTFT p90 {ttft:.0f} ms")
    return (", ".join(parts) + f" ({o.get('samples', 0)} requests in the last "
            f"{o.get('windowSeconds', WINDOW_S)} s)")


def _figures(entry: Obj) -> str:
    f = entry.get("figures") or {}
    if "currentCostPerHour" not in f:
        return ""
    return (f" [running: ${f['currentCostPerHour']:.2f}/h, TTFT p90 "
            f"{f['currentTtftP90Ms']:.0f} ms; new: ${f['candidateCostPerHour']:.2f}/h, TTFT "
            f"p90 {f['candidateTtftP90Ms']:.0f} ms, at the observed workload]")


async def run_demo(options: DemoOptions, out: TextIO | None = None) -> DemoResult:
    """The whole demo; prints the timeline to `out` (None: silent) and returns the result.
    Cancelling it (Ctrl-C) stops everything it started."""
    if options.shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, got {options.shift!r}")
    timeline = Timeline(out)
    binary = options.prometheus or find_prometheus()
    with tempfile.TemporaryDirectory(prefix="trilemma-demo-") as tmp, \
            _logging(options.verbose) as problems:
        result = await _run(options, timeline, binary, Path(tmp))
        result.log_problems = problems.records[-20:]
    result.timeline = timeline.events
    return result


async def _run(options: DemoOptions, timeline: Timeline, binary: str | None,
               tmp: Path) -> DemoResult:
    # Imported here: `trilemma --help` imports every command's module, and these pull in
    # Kopf, KMock and the operator's handlers.
    import kmock

    from trilemma.operator.emulator import (
        Api,
        ForgetfulEmulator,
        Operator,
        declare_resources,
        write_kubeconfig,
    )
    from trilemma.simfleet.cluster import find_kube_bin

    bin_dir = find_kube_bin() if options.control_plane != "kmock" else None
    if bin_dir is not None:
        from trilemma.operator.demo_cluster import run_on_cluster

        return await run_on_cluster(options, timeline, binary, tmp, bin_dir)
    if options.control_plane == "real":
        from trilemma.simfleet.cluster import INSTALL_HINT as KUBE_HINT

        result = DemoResult(shift=options.shift, exit_code=EXIT_NO_ROLLOUT,
                            message=f"no Kubernetes control-plane binaries: {KUBE_HINT}")
        timeline.add("stop", result.message)
        return result
    timeline.say("trilemma demo: the closed loop on this machine - an emulated Kubernetes API "
                 "(KMock), the operator in-process, a simulated vLLM fleet and a real "
                 "Prometheus, all on loopback")
    async with ForgetfulEmulator() as server, kmock.Server(server):
        declare_resources(server)
        kubeconfig = tmp / "kubeconfig"
        write_kubeconfig(kubeconfig, str(server.url))
        env = {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": None,
               "TRILEMMA_RESYNC_SECONDS": f"{RESYNC_S:g}"}
        prometheus_port = free_port()
        operator = Operator(config=operator_config(prometheus_port))
        with _environment(env):
            await operator.start()
            try:
                with _interruptible():
                    timeline.add("start", f"KMock serves the Kubernetes API at "
                                          f"{str(server.url).rstrip('/')}; the operator runs "
                                          f"in-process (resync every {RESYNC_S:g} s)")
                    demo = _Demo(options, timeline, Api(server))
                    return await _story(demo, binary, tmp, prometheus_port)
            finally:
                await operator.stop()


def operator_config(prometheus_port: int) -> OperatorConfig:
    """The operator as the platform team would set it up: its Prometheus is the demo's."""
    from trilemma.operator.emulator import CACHE_DIR
    from trilemma.operator.endpoint import OperatorConfig

    return OperatorConfig(prometheus_url=f"http://127.0.0.1:{prometheus_port}",
                          cache_dir=CACHE_DIR)


async def _story(demo: _Demo, binary: str | None, tmp: Path,
                 prometheus_port: int) -> DemoResult:
    from trilemma.optimizer.search import ServingConfig
    from trilemma.simfleet.fleet import SimFleet

    options, timeline, api, result = demo.options, demo.timeline, demo.api, demo.result
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    await api.create(pool_manifest())
    timeline.add("create", f"HardwarePool {POOL}: 8x h100_sxm")
    await api.create(endpoint_manifest(prometheus_url))
    timeline.add("create", f"OptimizedEndpoint {NAMESPACE}/{NAME}: {MODEL} on vLLM; "
                           f"{describe_phase(phases(options)[0])}; SLO TTFT p90 "
                           f"{SLO_TTFT_P90_MS:.0f} ms, TPOT p90 {SLO_TPOT_P90_MS:.0f} ms; "
                           f"objective min_cost; re-tune checked every {INTERVAL_S} s over "
                           f"a {WINDOW_S} s window from {prometheus_url}")

    planned = await demo.poll_until(
        lambda: demo.first_hash is not None or demo.phase in ("Failed", "Infeasible"),
        PLAN_TIMEOUT_S, "the plan")
    if not planned or demo.first_hash is None:
        result.message = f"no plan: {demo.status.get('message') or 'timed out'}"
        return result
    if binary is None:
        result.message = (f"the closed loop needs a Prometheus server, and none was found: "
                          f"{INSTALL_HINT}")
        timeline.add("stop", result.message)
        result.exit_code = EXIT_NO_PROMETHEUS
        return result
    if not await demo.poll_until(lambda: demo.phase == "Ready", READY_TIMEOUT_S, "Ready"):
        result.message = "the endpoint did not become Ready"
        return result

    cm = api.get("v1", "ConfigMap", NAMESPACE, f"{NAME}-plan") or {}
    plan = json.loads((cm.get("data") or {})["plan.json"])
    config = ServingConfig.from_dict(plan["recommended"]["config"])
    replicas = min(config.replicas, MAX_REPLICAS)
    served = (demo.status.get("activeConfiguration") or {}).get("model") or config.model
    async with SimFleet(config, replicas=replicas, served_model_name=served,
                        seed=options.seed) as fleet:
        capped = (f" (the plan has {config.replicas}; capped)"
                  if replicas < config.replicas else "")
        limit = fleet.model.max_model_len
        timeline.add("fleet", f"{replicas} simulated vLLM replica(s){capped} of "
                              f"{plan['recommended']['summary']} at "
                              f"{', '.join(fleet.urls)}: step times from the same "
                              f"performance model, --max-model-len {limit}")
        labels = {"namespace": NAMESPACE, "trilemma_dev_endpoint": NAME}
        jobs = [ScrapeJob(f"{NAME}-{i}", address, labels=labels)
                for i, address in enumerate(fleet.addresses)]
        prometheus = PrometheusServer(tmp / "prometheus", jobs, binary=binary,
                                      port=prometheus_port)
        loop = asyncio.get_running_loop()
        # Blocking calls (a subprocess, HTTP polls): off the loop the operator runs in.
        starting = loop.run_in_executor(None, _start_prometheus, prometheus)
        try:
            try:
                await asyncio.shield(starting)
            except RuntimeError as err:
                result.message = f"Prometheus did not start: {err}"
                timeline.add("stop", result.message)
                return result
            timeline.add("prom", f"Prometheus at {prometheus_url} scrapes the fleet every "
                                 f"1 s, labelling the series namespace={NAMESPACE}, "
                                 f"trilemma_dev_endpoint={NAME} (what a PodMonitor adds)")
            await _traffic(demo, fleet.urls, served)
        finally:
            # Cancelled (Ctrl-C) while starting, the thread may still be launching the
            # process: let it finish, so that the stop below finds and ends it.
            with contextlib.suppress(Exception):
                await asyncio.shield(starting)
            await loop.run_in_executor(None, prometheus.stop)
    result.exit_code = EXIT_ROLLED_OUT if result.rolled_out else EXIT_NO_ROLLOUT
    return result


def _start_prometheus(prometheus: PrometheusServer) -> None:
    prometheus.start()
    prometheus.wait_for_targets()


async def _traffic(demo: _Demo, urls: list[str], model: str) -> None:
    options, timeline = demo.options, demo.timeline
    steady, shifted = phases(options)
    stop = asyncio.Event()
    demo.load_start = time.time()
    demo.shift_start = demo.load_start + options.steady_s
    load = asyncio.create_task(loadgen.run_load(urls, [steady, shifted], seed=options.seed,
                                                model=model, drain_s=15.0, stop=stop))
    try:
        timeline.add("traffic", f"steady phase for {options.steady_s:g} s: "
                                f"{describe_phase(steady)} (the spec's workload)")
        settled = await demo.poll_until(lambda: demo.settled() or load.done(),
                                        options.steady_s + options.shift_s + 30.0,
                                        "the loop to settle")
        if not demo.settled():
            why = "gave up" if not settled else "the shifted traffic ended"
            demo.result.message = (f"{why} {time.time() - demo.shift_start:.0f} s after the "
                                   f"shift, waiting for {demo.pending()}")
            demo.timeline.add("stop", demo.result.message)
        stop.set()
        # Observations seen so far belong to the traffic, even one whose whole-second stamp
        # lies a fraction past this moment: settled() may have counted it.
        demo.load_end = max([time.time()] + [t for t, _ in demo.observations])
        report = await load
    finally:
        if not load.done():
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    await demo.poll()
    timeline.add("traffic", f"stopped: {report.overall.sent} requests sent, "
                            f"{report.overall.completed} completed, "
                            f"{report.overall.failed} failed")
    demo.result.load = {p.name: _phase_figures(p) for p in report.phases}
    demo.result.estimates = demo.estimates(report)


def _phase_figures(p: Any) -> Obj:
    return {"durationSeconds": round(p.duration_s, 1), "sent": p.sent,
            "completed": p.completed, "failed": p.failed, "rateRps": round(p.rate_per_s, 3),
            "promptMean": p.prompt_tokens.mean and round(p.prompt_tokens.mean, 1),
            "outputMean": p.output_tokens.mean and round(p.output_tokens.mean, 1),
            "prefixTokenShare": round(p.prefix_token_share, 4),
            "cachedShare": (round(p.server_cached_tokens / p.server_prompt_tokens, 4)
                            if p.server_prompt_tokens else None),
            "errors": p.errors}


# ---- the summary ------------------------------------------------------------------------------


def summary_lines(result: DemoResult) -> list[str]:
    lines = ["", "summary"]
    plan, new = result.plan, result.new_plan
    if result.rolled_out:
        lines.append(f"  re-planned and rolled out: {plan.get('summary')} -> "
                     f"{new.get('summary')}")
    elif result.replanned:
        verdict = ("kept the running configuration" if result.accepted is False else
                   "no rollout completed")
        lines.append(f"  re-planned after the shift; {verdict}")
    else:
        lines.append("  no re-plan after the shift")
    delay = result.detection_delay_s
    from trilemma.operator import retune  # heavy (the optimizer): only when summarising
    from trilemma.operator.resources import Retune

    needed = retune.drift_checks_needed(Retune(enabled=True, interval_seconds=INTERVAL_S,
                                               window_seconds=WINDOW_S))
    lines.append("  detection delay: " + (f"{delay:.0f} s after the shift (checks every "
                                           f"{INTERVAL_S} s over a {WINDOW_S} s window; a "
                                           f"drift must show in {needed} checks in a row, "
                                           "an SLO miss in 2)"
                                           if delay is not None else "not detected"))
    lines.append(f"  during steady traffic: {result.steady_replans} re-plan(s), "
                 f"{result.steady_rollouts} rollout(s) (expected: 0)")
    if result.estimates:
        lines.append("  the operator's estimate (status.observedWorkload) against what "
                     "loadgen saw finish in the same window:")
        lines.append(f"    {'':18}" + "".join(
            f"{e.phase + ('' if e.full_window else ' (part)'):>28}"
            for e in result.estimates))
        for key, label in (("rate", "rate req/s"), ("prompt", "prompt tokens mean"),
                           ("output", "output tokens mean"), ("prefix", "prefix hit share"),
                           ("ttft_p90_ms", "TTFT p90 ms")):
            cells = []
            for e in result.estimates:
                seen, true = e.observed.get(key), e.truth.get(key)
                err = errors(e)
                if seen is None or true is None:
                    cells.append("-")
                elif key == "prefix":
                    cells.append(f"{seen:.3f} vs {true:.3f} ({err['prefix_points']:+.1f} pt)")
                else:
                    digits = 2 if key == "rate" else 0
                    cells.append(f"{seen:.{digits}f} vs {true:.{digits}f} "
                                 f"({err[key]:+.1%})")
            lines.append(f"    {label:18}" + "".join(f"{c:>28}" for c in cells))
        lines.append("    (TTFT: the server's histogram, whose buckets jump from 100 to 250 ms, "
                     "against the client's own clock)")
    for name, figures in result.load.items():
        if figures["sent"]:
            refused = sum(figures["errors"].values())
            lines.append(f"  loadgen {name}: {figures['sent']} requests in "
                         f"{figures['durationSeconds']:g} s ({figures['rateRps']:.2f} req/s), "
                         f"prompt mean {figures['promptMean']}, output mean "
                         f"{figures['outputMean']}, {refused} failed")
    if result.log_problems:
        lines.append(f"  operator log: {len(result.log_problems)} warning(s)/error(s), the "
                     f"last: {result.log_problems[-1]} (--verbose shows the log)")
    lines.append(f"  exit code {result.exit_code}")
    return lines


# ---- the command ------------------------------------------------------------------------------


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steady-s", type=_positive, default=DemoOptions.steady_s,
                   help="seconds of traffic matching the spec before the shift (a check "
                        f"needs a full {WINDOW_S} s window of it; default %(default)g)")
    p.add_argument("--shift-s", type=_positive, default=DemoOptions.shift_s,
                   help="at most this many seconds of shifted traffic; the demo ends sooner "
                        "once the rollout is through (default %(default)g)")
    p.add_argument("--shift", choices=SHIFTS, default=DemoOptions.shift,
                   help="prompt: prompts 4x longer (the GPU then misses the TTFT SLO: a new "
                        "layout rolls out); rate: 4x the requests/s (the planned GPU has "
                        "the headroom: the loop re-plans and keeps it)")
    p.add_argument("--seed", type=int, default=DemoOptions.seed,
                   help="seed of the traffic and the simulated servers")
    p.add_argument("--control-plane", choices=CONTROL_PLANES, default="auto",
                   help="real: kube-apiserver, controllers, scheduler and kwok GPU nodes "
                        "(bash .ci/install-kube builds them); kmock: the emulated API; auto "
                        "(default): real when built")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (timeline, plans, figures) instead")
    p.add_argument("--verbose", action="store_true", help="the operator's log on stderr")


def run(args: argparse.Namespace) -> int:
    options = DemoOptions(steady_s=args.steady_s, shift_s=args.shift_s, shift=args.shift,
                          seed=args.seed, verbose=args.verbose,
                          control_plane=args.control_plane)
    out = None if args.json else sys.stdout
    try:
        result = asyncio.run(run_demo(options, out=out))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("trilemma demo: interrupted; everything it started is stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in summary_lines(result):
            print(line)
    if result.message:
        print(f"trilemma demo: {result.message}", file=sys.stderr)
    return result.exit_code


SUBCOMMAND = Subcommand(
    name="demo",
    help="run the closed loop on this machine: plan, traffic shift, detection, re-plan, "
         "rollout (needs the prometheus binary)",
    add_arguments=add_arguments, run=run)
