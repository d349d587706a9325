"""The load generator: phases of synthetic traffic against OpenAI-compatible endpoints.

`run_load(urls, phases, seed=...)` drives one or more servers (sim-servers or real vLLM) and
returns a LoadReport (load_report.py) of what it truly sent and what it measured. Each phase
is a segment of `duration_s` seconds with its own shape, so a run can change mid-way (prompts
1k -> 8k tokens, the rate x 4) and the closed loop can be watched re-tuning:

* open loop: arrivals from a Poisson or gamma renewal process (`rate`, `cv`), sent whether or
  not earlier requests are done; closed loop (`concurrency` set): that many users, each
  sending its next request when the last one finished plus an exponential think time;
* lengths: fixed, or lognormal given mean and p90 (the optimizer's own spec distributions);
* prefix reuse: a `prefix_share` of requests start with one of `prefixes` shared prefixes of
  `prefix_tokens` tokens (the whole prompt when it is shorter), the rest with fresh tokens.

Prompts go out as token-id arrays to /v1/completions with `ignore_eos` and `max_tokens` set to
the output length, so a server's token counts equal the generator's by construction. Every
random draw comes from generators seeded by (seed, phase, stream): the same seed sends the
same requests in the same order (open loop: at the same offsets).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import aiohttp
import numpy as np
import pydantic

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec.arrivals import GammaArrivals, PoissonArrivals
from trilemma.optimizer.spec.lengths import FixedLengths, LognormalLengths
from trilemma.simfleet.load_report import LoadReport, PhaseReport, RequestRecord

TOKEN_IDS = (100, 32_000)  # ids drawn from here exist in every bundled model's vocabulary
_GAP_BATCH = 256


class Arrival(enum.Enum):
    POISSON = "poisson"
    GAMMA = "gamma"  # renewal process with gamma gaps; cv > 1 is burstier than Poisson


class Balance(enum.Enum):
    """How requests are spread over several URLs."""

    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, kw_only=True)
class LoadStage:
    """One segment of a load run. Rates in requests/s, lengths in tokens, times in seconds."""

    duration_s: float
    name: str = ""
    rate: float = 1.0  # open loop
    arrivals: Arrival = Arrival.POISSON
    cv: float = 1.0  # gamma arrivals only
    concurrency: int | None = None  # closed loop: users, each one request at a time
    think_s: float = 0.0  # closed loop: mean think time between a user's requests
    prompt_mean: float = 1000.0
    prompt_p90: float | None = None  # None: every prompt prompt_mean tokens
    output_mean: float = 200.0
    output_p90: float | None = None
    prefix_share: float = 0.0  # of requests
    prefix_tokens: int = 0
    prefixes: int = 1

    def __post_init__(self) -> None:
        checks = (("duration_s", self.duration_s > 0), ("rate", self.rate > 0),
                  ("cv", 0 < self.cv <= 10), ("think_s", self.think_s >= 0),
                  ("prefix_share", 0 <= self.prefix_share <= 1),
                  ("prefix_tokens", self.prefix_tokens >= 0), ("prefixes", self.prefixes >= 1),
                  ("concurrency", self.concurrency is None or self.concurrency >= 1))
        for name, ok in checks:
            if not ok:
                raise InputError(name, getattr(self, name), "out of range for a load phase")
        if self.prefix_share > 0 and self.prefix_tokens < 1:
            raise InputError("prefix_tokens", self.prefix_tokens,
                             "a prefix share needs prefix tokens")
        _ = self.prompt_lengths, self.output_lengths, self.arrival_process  # validate

    @property
    def closed(self) -> bool:
        return self.concurrency is not None

    @cached_property
    def prompt_lengths(self) -> FixedLengths | LognormalLengths:
        return _lengths("prompt", self.prompt_mean, self.prompt_p90)

    @cached_property
    def output_lengths(self) -> FixedLengths | LognormalLengths:
        return _lengths("output", self.output_mean, self.output_p90)

    @cached_property
    def arrival_process(self) -> PoissonArrivals | GammaArrivals:
        if self.arrivals is Arrival.GAMMA:
            return GammaArrivals(kind="gamma", requests_per_second=self.rate, cv=self.cv)
        return PoissonArrivals(kind="poisson", requests_per_second=self.rate)

    def label(self, index: int) -> str:
        return self.name or f"phase {index}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arrivals"] = self.arrivals.value
        return d


def _lengths(what: str, mean: float, p90: float | None) -> FixedLengths | LognormalLengths:
    try:
        if p90 is None:
            return FixedLengths(kind="fixed", value=max(round(mean), 1))
        return LognormalLengths(kind="lognormal", mean=mean, p90=p90)
    except pydantic.ValidationError as exc:
        why = "; ".join(e["msg"] for e in exc.errors())
        raise InputError(f"{what}_p90", p90, why) from None


# ---- what to send ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Planned:
    """One request's content."""

    tokens: tuple[int, ...]
    output_tokens: int
    shared_tokens: int
    prefix: int  # -1: none


class Contents:
    """The requests of one phase, drawn in send order from its own generator."""

    def __init__(self, phase: LoadStage, index: int, seed: int) -> None:
        self.phase = phase
        self.seed = seed
        self.rng = np.random.default_rng([seed, index, 1])
        self._prefixes: dict[int, np.ndarray] = {}

    def _prefix(self, k: int) -> np.ndarray:
        # Seeded by (seed, k) only: every phase shares the same K prefixes, so a cache warmed in
        # one phase stays warm in the next; a longer prefix_tokens extends them.
        p = self._prefixes.get(k)
        if p is None:
            p = np.random.default_rng([self.seed, 1_000_003, k]).integers(
                *TOKEN_IDS, self.phase.prefix_tokens)
            self._prefixes[k] = p
        return p

    def next(self) -> Planned:
        ph, rng = self.phase, self.rng
        prompt = int(ph.prompt_lengths.sample(1, rng)[0])
        output = int(ph.output_lengths.sample(1, rng)[0])
        shared, k = 0, -1
        if rng.random() < ph.prefix_share:
            k = int(rng.integers(ph.prefixes))
            shared = min(ph.prefix_tokens, prompt)
        own = rng.integers(*TOKEN_IDS, prompt - shared)
        tokens = np.concatenate([self._prefix(k)[:shared], own]) if shared else own
        return Planned(tokens=tuple(int(t) for t in tokens), output_tokens=output,
                       shared_tokens=shared, prefix=k)


def arrival_offsets(phase: LoadStage, index: int, seed: int) -> np.ndarray:
    """Open-loop send times (s from the phase start) of a phase, all within its duration."""
    rng = np.random.default_rng([seed, index, 0])
    process = phase.arrival_process
    times: list[np.ndarray] = []
    end = 0.0
    while end < phase.duration_s:
        t = end + np.cumsum(process.sample_gaps(_GAP_BATCH, rng))
        times.append(t)
        end = float(t[-1])
    out = np.concatenate(times)
    return out[out < phase.duration_s]


def plan_open_loop(phase: LoadStage, index: int, seed: int) -> list[tuple[float, Planned]]:
    """Every request an open-loop phase sends, with its offset: what `run_load` will send."""
    contents = Contents(phase, index, seed)
    return [(float(t), contents.next()) for t in arrival_offsets(phase, index, seed)]


# ---- sending ---------------------------------------------------------------------------------


class _Run:
    def __init__(self, session: aiohttp.ClientSession, urls: Sequence[str], model: str,
                 seed: int, balance: Balance) -> None:
        self.session = session
        self.urls = list(urls)
        self.model = model
        self.seed = seed
        self.balance = balance
        self.pick_rng = np.random.default_rng([seed, 4])
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.records: list[RequestRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = False  # set by run_load's `stop`: closed-loop users send no more

    def _target(self) -> int:
        if self.balance is Balance.RANDOM:
            return int(self.pick_rng.integers(len(self.urls)))
        return len(self.records) % len(self.urls)

    def _record(self, index: int, p: Planned) -> RequestRecord:
        digest = zlib.crc32(np.asarray(p.tokens, dtype=np.int32).tobytes())
        rec = RequestRecord(phase=index, sent_s=self.loop.time() - self.t0,
                            prompt_tokens=len(p.tokens), output_tokens=p.output_tokens,
                            shared_tokens=p.shared_tokens, prefix=p.prefix,
                            prompt_digest=digest, target=self._target())
        self.records.append(rec)
        return rec

    async def send(self, index: int, p: Planned) -> None:
        rec = self._record(index, p)
        body = {"model": self.model, "prompt": list(p.tokens), "max_tokens": p.output_tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = self.loop.time()
        last: float | None = None
        done = False
        try:
            async with self.session.post(self.urls[rec.target] + "/v1/completions",
                                         json=body) as resp:
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {_message(await resp.text())}"
                    return
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    doc = json.loads(data)
                    usage = doc.get("usage")
                    if usage:
                        rec.usage_prompt = usage.get("prompt_tokens")
                        rec.usage_completion = usage.get("completion_tokens")
                        rec.usage_cached = (usage.get("prompt_tokens_details") or {}).get(
                            "cached_tokens")
                    choices = doc.get("choices") or []
                    if choices and choices[0].get("text"):
                        now = self.loop.time()
                        if last is None:
                            rec.ttft_s = now - sent
                        else:
                            rec.chunk_gaps_s.append(now - last)
                        last = now
            rec.e2e_s = (last if last is not None else self.loop.time()) - sent
            rec.ok = done
            if not done:
                rec.error = "stream ended without [DONE]"
        except asyncio.CancelledError:
            rec.error = "unfinished when the drain time ran out"
            raise
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"[:200]

    def spawn(self, index: int, p: Planned) -> None:
        task = self.loop.create_task(self.send(index, p))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_loop(self, phase: LoadStage, index: int, start: float) -> None:
        for offset, p in plan_open_loop(phase, index, self.seed):
            await _sleep_until(self.loop, start + offset)
            self.spawn(index, p)

    async def closed_loop(self, phase: LoadStage, index: int, start: float) -> None:
        contents = Contents(phase, index, self.seed)
        end = start + phase.duration_s
        assert phase.concurrency is not None

        async def user(u: int) -> None:
            think = np.random.default_rng([self.seed, index, 3, u])
            while self.loop.time() < end and not self.stopped:
                await self.send(index, contents.next())
                if phase.think_s > 0:
                    await asyncio.sleep(float(think.exponential(phase.think_s)))

        for u in range(phase.concurrency):
            task = self.loop.create_task(user(u))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await _sleep_until(self.loop, end)

    async def phase(self, phase: LoadStage, index: int, start: float,
                    stop: asyncio.Event | None) -> float:
        """Send one phase until its end, or until `stop` is set; returns how long it ran."""
        async def whole() -> None:
            if phase.closed:
                await self.closed_loop(phase, index, start)
            else:
                await self.open_loop(phase, index, start)
            await _sleep_until(self.loop, start + phase.duration_s)

        if stop is None:
            await whole()
            return phase.duration_s
        sending = self.loop.create_task(whole())
        stopping = self.loop.create_task(stop.wait())
        try:
            await asyncio.wait({sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sending, stopping):
                task.cancel()
            await asyncio.gather(sending, stopping, return_exceptions=True)
        if stop.is_set():
            # Requests already sent run on (and are drained); closed-loop users stop sending.
            self.stopped = True
        return min(phase.duration_s, self.loop.time() - start)

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _message(text: str) -> str:
    try:
        doc = json.loads(text)
        return str(doc.get("error", {}).get("message", text))[:160]
    except (json.JSONDecodeError, AttributeError):
        return text[:160]


async def served_model(session: aiohttp.ClientSession, url: str) -> str:
    """The first model a server lists on /v1/models."""
    async with session.get(url + "/v1/models") as resp:
        resp.raise_for_status()
        return str((await resp.json())["data"][0]["id"])


async def run_load(url: str | Sequence[str], phases: Sequence[LoadStage], *, seed: int = 0,
                   model: str | None = None, balance: Balance = Balance.ROUND_ROBIN,
                   drain_s: float = 120.0, stop: asyncio.Event | None = None) -> LoadReport:
    """Send `phases` one after another to `url` (several: spread by `balance`).

    Phases start on schedule whether or not earlier requests are done; after the last one
    the run waits up to `drain_s` for requests in flight, then cancels them (failed).
    model: the name to send; None asks the first server's /v1/models.
    stop: once set, the running phase ends there and later ones are skipped (the report gives
        each phase the time it actually ran, 0 for skipped ones), then the run drains as
        usual. For a caller that ends the traffic when something it watches has happened.
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls or not phases:
        raise InputError("url" if not urls else "phases", [], "need at least one")
    urls = [u.rstrip("/") for u in urls]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        name = model or await served_model(session, urls[0])
        run = _Run(session, urls, name, seed, balance)
        start = run.t0
        # How long each phase ran: its duration, less when `stop` cut it, 0 when never begun.
        ran = [0.0] * len(phases)
        try:
            for index, phase in enumerate(phases):
                ran[index] = await run.phase(phase, index, start, stop)
                if run.stopped:
                    break
                start += phase.duration_s
            await run.drain(drain_s)
        except asyncio.CancelledError:
            # The requests in flight end with the run: left running, they would outlive the
            # session they read from (and the caller, which cancelled the run to be done).
            await run.drain(0.0)
            raise
    reports = tuple(
        PhaseReport.build([r for r in run.records if r.phase == i], name=p.label(i), index=i,
                          duration_s=ran[i], parameters=p.to_dict())
        for i, p in enumerate(phases))
    overall = PhaseReport.build(run.records, name="overall", index=None,
                                duration_s=sum(ran), parameters={"phases": len(phases)})
    return LoadReport(urls=tuple(urls), model=name, seed=seed, phases=reports,
                      overall=overall, requests=tuple(run.records))


# ---- phase files -----------------------------------------------------------------------------


class _PhaseFields(pydantic.BaseModel):
    """One phase in a phases file: its duration, and the parameters that change from the
    phase before (or, for the first, from the command line). An explicit null resets an
    optional parameter (prompt_p90: null -> fixed lengths; concurrency: null -> open loop)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    duration_s: float = pydantic.Field(gt=0)
    name: str | None = None
    rate: float | None = None
    arrivals: Arrival | None = None
    cv: float | None = None
    concurrency: int | None = None
    think_s: float | None = None
    prompt_mean: float | None = None
    prompt_p90: float | None = None
    output_mean: float | None = None
    output_p90: float | None = None
    prefix_share: float | None = None
    prefix_tokens: int | None = None
    prefixes: int | None = None


class _PhasesFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    phases: list[_PhaseFields] = pydantic.Field(min_length=1)


def parse_phases(doc: object, base: LoadStage) -> list[LoadStage]:
    """Phases from a parsed YAML/JSON document ({phases: [...]} or a bare list); each phase
    starts from the one before it, the first from `base`."""
    if isinstance(doc, list):
        doc = {"phases": doc}
    try:
        parsed = _PhasesFile.model_validate(doc)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(where or "phases", err.get("input"), err["msg"]) from None
    out: list[LoadStage] = []
    prev = dataclasses.replace(base, name="")
    for i, fields in enumerate(parsed.phases):
        changed = {k: getattr(fields, k) for k in fields.model_fields_set}
        if changed.get("name") is None:
            changed["name"] = ""
        try:
            prev = dataclasses.replace(prev, **changed)
        except InputError as exc:
            raise InputError(f"phases.{i}.{exc.field}", exc.value, exc.why) from None
        out.append(prev)
    return out
