"""The demo's watcher: polls the endpoint and its children, prints what changed on the
timeline, and keeps the story's state (what was reported, the plans, the verdicts) in typed
parts that the story and the scoring read.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trilemma.tools.demo.api import DemoApi, Obj
from trilemma.tools.demo.controller import Deployments
from trilemma.tools.demo.scenario import (
    NAME,
    NAMESPACE,
    POLL_S,
    WINDOW_S,
    DemoOptions,
    describe_phase,
    phases,
)
from trilemma.tools.demo.scoring import DemoResult, Observation, PlanSummary, TrafficClock
from trilemma.tools.demo.timeline import Timeline


@dataclass
class Reported:
    """What the timeline already tells, so that each change is told once."""

    phase: str | None = None
    metrics: tuple[str, str] | None = None  # MetricsAvailable's (status, reason)
    history: set[tuple[str, str, str]] = field(default_factory=set)  # (time, action, reason)
    rollouts: set[str] = field(default_factory=set)  # toHash of each rollout seen
    serving_hash: str | None = None
    service_hash: str | None = None  # the Service's config-hash selector
    shift: bool = False


@dataclass
class Plans:
    """The first plan, and whether a different one has followed it."""

    first_hash: str | None = None
    # A new plan may keep the Deployment (a replica-only change scales it in place), so the
    # replica count counts as much as the hash.
    first_key: tuple[str, int | None] | None = None  # (hash, replicas)
    new_announced: bool = False


class Watcher:
    """One run's view of the endpoint: `poll` looks once, reports what changed and lets the
    Deployments step (on KMock the demo stands in for their controller)."""

    def __init__(self, options: DemoOptions, timeline: Timeline, api: DemoApi, *,
                 controllers: bool = False) -> None:
        self.options = options
        self.timeline = timeline
        self.api = api
        self.result = DemoResult(shift=options.shift)
        self.status: Obj = {}  # the endpoint's, as last polled
        self.reported = Reported()
        self.plans = Plans()
        self.clock = TrafficClock()
        self.observations: list[Observation] = []
        self.kept: list[float] = []  # when each re-plan was not rolled out (unix)
        self.deployments = Deployments(api, timeline, controllers=controllers)

    @property
    def phase(self) -> str | None:
        return self.reported.phase

    @property
    def planned(self) -> bool:
        return self.plans.first_hash is not None

    # -- watching ------------------------------------------------------------------------------

    async def poll(self) -> None:
        """One look at the endpoint and its children; prints what changed, and plays the
        Deployment controller."""
        self._announce_shift()
        body = self.api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NAMESPACE, NAME)
        self.status = (body or {}).get("status") or {}
        st = self.status
        if st.get("phase") == "Optimizing":
            self._watch_phase(st)
        self._watch_metrics(st)
        self._watch_history(st)
        self._watch_plan(st)
        if self.planned:
            # The reconciler applies the children before it writes the status: tell the plan
            # first, then what it deployed.
            await self.deployments.step()
        self._watch_rollout(st)
        self._watch_service()
        self._watch_phase(st)

    def _announce_shift(self) -> None:
        shift_start = self.clock.shift_start
        if (shift_start is not None and time.time() >= shift_start
                and not self.reported.shift):
            self.reported.shift = True
            shifted = phases(self.options)[1]
            what = ("prompts x4" if self.options.shift == "prompt" else "request rate x4")
            self.timeline.add("shift", f"traffic shift: {what} - {describe_phase(shifted)}",
                              when=shift_start)

    def _watch_phase(self, st: Obj) -> None:
        if st.get("phase") != self.reported.phase:
            self.reported.phase = st.get("phase")
            message = st.get("message") or ""
            self.timeline.add("phase", f"{self.reported.phase}"
                                       + (f": {message}" if message else ""))

    def _watch_metrics(self, st: Obj) -> None:
        observed = st.get("observedWorkload") or {}
        stamp = observed.get("observedAt")
        if stamp and (not self.observations
                      or self.observations[-1].workload.get("observedAt") != stamp):
            observation = Observation(at=_unix(stamp), workload=observed)
            self.observations.append(observation)
            if observation.has_figures:
                self.timeline.add("observed", _observed_line(observed),
                                  observedWorkload=observed)
        cond = next((c for c in st.get("conditions") or []
                     if c.get("type") == "MetricsAvailable"), None)
        if cond is not None and (cond.get("status"), cond.get("reason")) != self.reported.metrics:
            self.reported.metrics = (cond.get("status"), cond.get("reason"))
            self.timeline.add("metrics", f"MetricsAvailable={cond.get('status')} "
                                         f"({cond.get('reason')}): {cond.get('message', '')}")

    def _watch_history(self, st: Obj) -> None:
        for entry in st.get("retuneHistory") or []:
            key = (entry.get("time", ""), entry.get("action", ""), entry.get("reason", ""))
            if key in self.reported.history:
                continue
            self.reported.history.add(key)
            # Printed when seen; a re-plan's entries appear once its search is done, so the
            # decision's own time (the check's) is what the detection delay counts.
            when = _unix(entry["time"]) if entry.get("time") else time.time()
            action, cause, reason = entry.get("action"), entry.get("cause"), entry.get("reason")
            if action == "Replan":
                self._replan(entry, when)
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

    def _replan(self, entry: Obj, when: float) -> None:
        cause, reason = entry.get("cause"), entry.get("reason")
        shift_start = self.clock.shift_start
        shifted = self.clock.after_shift(when)
        self.result.replanned = self.result.replanned or shifted
        decided = f"decided at {self.timeline.at(when):.0f} s"
        if not shifted:
            self.result.steady_replans += 1
            self.timeline.add("REPLAN", f"during steady traffic, {decided} ({cause}): "
                                        f"{reason}", entry=entry)
        elif self.result.detection_delay_s is None and shift_start is not None:
            self.result.detection_delay_s = round(when - shift_start, 1)
            self.timeline.add(
                "DETECTED", f"Replan ({cause}), {decided}, "
                            f"{when - shift_start:.0f} s after the shift: {reason}",
                entry=entry)
        else:
            self.timeline.add("replan", f"({cause}, {decided}) {reason}", entry=entry)

    def _watch_plan(self, st: Obj) -> None:
        active = st.get("activeConfiguration") or {}
        if not active.get("hash") or (st.get("phase") == "Optimizing"):
            return
        key = (active["hash"], active.get("replicas"))
        plans = self.plans
        if plans.first_hash is None:
            plans.first_hash = active["hash"]
            plans.first_key = key
            self.result.plan = _plan_summary(st)
            self.timeline.add("plan", _plan_line(st), plan=self.result.plan)
        elif key != plans.first_key and not plans.new_announced:
            plans.new_announced = True
            self.result.new_plan = _plan_summary(st)
            self.timeline.add("new plan", _plan_line(st), plan=self.result.new_plan)

    def _watch_rollout(self, st: Obj) -> None:
        rollout = st.get("rollout") or {}
        to_hash, state = rollout.get("toHash"), rollout.get("state")
        if rollout.get("fromHash") and to_hash and to_hash not in self.reported.rollouts:
            self.reported.rollouts.add(to_hash)
            steady = not self.clock.after_shift(time.time())
            if steady:
                self.result.steady_rollouts += 1
            self.timeline.add("rollout", f"started: {rollout['fromHash']} -> {to_hash}; the "
                                         f"old configuration serves until the new one is "
                                         f"available" + (" (during steady traffic!)"
                                                         if steady else ""),
                              rollout=rollout)
        serving = st.get("servingHash")
        if serving != self.reported.serving_hash:
            if self.reported.serving_hash is not None and state == "Complete":
                self.timeline.add("rollout", f"complete: {serving} serves", rollout=rollout)
            self.reported.serving_hash = serving
        # Rolled out: the new plan is Ready and alone (a new Deployment the Service moved to,
        # the old one deleted; or the old one scaled in place).
        active = st.get("activeConfiguration") or {}
        if (self.plans.new_announced and not self.result.rolled_out
                and self.clock.after_shift(time.time())
                and st.get("phase") == "Ready" and state != "Progressing"
                and len(self.deployments.names) == 1):
            self.result.rolled_out = True
            self.timeline.add("done", f"the new plan serves: {active.get('summary')}")

    def _watch_service(self) -> None:
        svc = self.api.get("v1", "Service", NAMESPACE, NAME)
        selector = ((svc or {}).get("spec") or {}).get("selector") or {}
        found = selector.get("trilemma.dev/config-hash")
        if found != self.reported.service_hash:
            if self.reported.service_hash is not None:
                self.timeline.add("service", f"Service {NAME} switched: selector "
                                             f"config-hash {self.reported.service_hash} -> "
                                             f"{found}")
            self.reported.service_hash = found

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
        shift_start = self.clock.shift_start
        assert shift_start is not None
        return any(self.clock.whole_window_after(shift_start, o.at)
                   for o in self.observations if o.has_figures)

    def pending(self) -> str:
        """The first step of the story after the shift that has not happened yet: what a run
        that ran out of time names, instead of a bare timeout."""
        if not self.clock.after_shift(time.time()):
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
        shift_start = self.clock.shift_start
        if shift_start is None or not self.has_shift_window():
            return False
        # A re-plan kept on a window that still mixed in the old traffic does not end the
        # story: the next checks may decide otherwise.
        kept = any(self.clock.whole_window_after(shift_start, t) for t in self.kept)
        return self.result.rolled_out or kept


def _unix(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _plan_summary(st: Obj) -> PlanSummary:
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

    def num(v: float | None, fmt: str) -> str:
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
