"""The simulator's workload: one row per request, as numpy arrays, and samplers that make one.

Sits at the entrance of serving/: the user-facing workload spec (pydantic, later) converts into
a `RequestStream`; `simulate` reads nothing else about the requests. Lengths are tokens, times are
milliseconds from the start of the run.

How requests arrive is part of the workload, because it is the client's behaviour:
  * OPEN: at the times in `arrival_ms` (Poisson, gamma with a burstiness CV, or given stamps);
  * CLOSED: `concurrency` clients, each sending its next request the moment the last finishes
    (genai-perf / `vllm bench serve --max-concurrency`), rows taken in order;
  * OFFLINE: everything queued at t = 0 (batch inference).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.errors import InputError

# z of the 90th percentile of a standard normal: ties the lognormal's p90 to its sigma.
_Z90 = 1.2815515655446004


class LoadMode(enum.Enum):
    """How the client sends requests."""

    OPEN = "open"
    CLOSED = "closed"
    OFFLINE = "offline"


def _frozen(values: object, dtype: type, name: str) -> np.ndarray:
    arr: np.ndarray = np.array(values, dtype=dtype, copy=True)
    if arr.ndim != 1:
        raise InputError(name, arr.shape, "must be a one-dimensional array, one row per request")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, kw_only=True)
class RequestStream:
    """Requests for one simulation. Arrays are copied and made read-only on construction.

    prefix_id: which shared prefix (system prompt, few-shot block) a request starts with, -1 for
    none; prefix_tokens: how many of its prompt tokens that prefix covers. Requests with the same
    id share those tokens and can reuse each other's prefix KV blocks.
    """

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_id: np.ndarray
    prefix_tokens: np.ndarray
    arrival_ms: np.ndarray
    mode: LoadMode = LoadMode.OPEN
    concurrency: int = 0  # CLOSED only: clients in flight

    def __post_init__(self) -> None:
        for name, dtype in (("prompt_tokens", np.int64), ("output_tokens", np.int64),
                            ("prefix_id", np.int64), ("prefix_tokens", np.int64),
                            ("arrival_ms", np.float64)):
            object.__setattr__(self, name, _frozen(getattr(self, name), dtype, name))
        n = len(self.prompt_tokens)
        if n == 0:
            raise InputError("prompt_tokens", 0, "a workload needs at least one request")
        for name in ("output_tokens", "prefix_id", "prefix_tokens", "arrival_ms"):
            if len(getattr(self, name)) != n:
                raise InputError(name, len(getattr(self, name)),
                                 f"must have one row per request ({n})")
        if np.any(self.prompt_tokens < 1):
            raise InputError("prompt_tokens", int(self.prompt_tokens.min()), "must be >= 1")
        if np.any(self.output_tokens < 1):
            raise InputError("output_tokens", int(self.output_tokens.min()), "must be >= 1")
        if np.any(self.prefix_id < -1):
            raise InputError("prefix_id", int(self.prefix_id.min()), "must be -1 or an id >= 0")
        shared = self.prefix_id >= 0
        bad = (self.prefix_tokens < 0) | (shared & (self.prefix_tokens >= self.prompt_tokens))
        if np.any(bad) or np.any(~shared & (self.prefix_tokens != 0)):
            raise InputError("prefix_tokens", int(self.prefix_tokens[np.argmax(bad)]),
                             "must be 0 without a prefix id and below the prompt length with one")
        if not np.all(np.isfinite(self.arrival_ms)) or np.any(self.arrival_ms < 0):
            raise InputError("arrival_ms", float(self.arrival_ms.min()),
                             "must be finite and >= 0")
        if self.mode is LoadMode.OPEN and np.any(np.diff(self.arrival_ms) < 0):
            raise InputError("arrival_ms", "unsorted", "open-loop arrivals must be non-decreasing")
        if self.mode is LoadMode.CLOSED and not self.concurrency >= 1:
            raise InputError("concurrency", self.concurrency, "closed loop needs >= 1 client")
        if self.mode is not LoadMode.CLOSED and self.concurrency != 0:
            raise InputError("concurrency", self.concurrency, "only a closed loop has clients")

    def __len__(self) -> int:
        return len(self.prompt_tokens)


# ---- length distributions ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Fixed:
    """Every request has the same length."""

    tokens: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.tokens < 1:
            raise InputError("tokens", self.tokens, "must be >= 1")
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class Lognormal:
    """Lengths with a given mean and 90th percentile (what dataset summaries report).

    sigma solves ln(p90 / mean) = z90 sigma - sigma^2 / 2 on its lighter-tailed branch, so
    p90 / mean must lie in (1, e^(z90^2 / 2) ~= 2.27]; `high` truncates (a context limit).
    """

    mean: float
    p90: float
    high: int | None = None

    def sigma(self) -> float:
        if not self.mean >= 1.0:
            raise InputError("mean", self.mean, "must be >= 1 token")
        ratio = self.p90 / self.mean
        limit = math.exp(_Z90**2 / 2.0)
        if not 1.0 < ratio <= limit:
            raise InputError("p90", self.p90,
                             f"p90 / mean must be in (1, {limit:.2f}] for a lognormal")
        return _Z90 - math.sqrt(_Z90**2 - 2.0 * math.log(ratio))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        sigma = self.sigma()
        mu = math.log(self.mean) - sigma**2 / 2.0
        out = np.maximum(np.rint(rng.lognormal(mu, sigma, n)), 1).astype(np.int64)
        if self.high is not None:
            if self.high < 1:
                raise InputError("high", self.high, "must be >= 1")
            out = np.minimum(out, self.high)
        return out


@dataclass(frozen=True, kw_only=True)
class Histogram:
    """An empirical histogram: bin edges and counts; lengths uniform within a bin."""

    edges: Sequence[int]
    counts: Sequence[float]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        edges = np.asarray(self.edges, dtype=np.float64)
        counts = np.asarray(self.counts, dtype=np.float64)
        if len(edges) != len(counts) + 1 or len(counts) == 0:
            raise InputError("edges", len(edges), "needs one more edge than counts")
        if np.any(np.diff(edges) <= 0) or edges[0] < 1:
            raise InputError("edges", list(self.edges), "must increase and start at >= 1")
        if np.any(counts < 0) or counts.sum() <= 0:
            raise InputError("counts", list(self.counts), "must be >= 0 with a positive sum")
        bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
        lo, hi = edges[bins], edges[bins + 1]
        return np.maximum(np.floor(lo + rng.random(n) * (hi - lo)), 1).astype(np.int64)


LengthDist = Fixed | Lognormal | Histogram


# ---- arrival processes -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Poisson:
    """Open loop, exponential gaps at `rate_per_s`."""

    rate_per_s: float

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return Gamma(rate_per_s=self.rate_per_s, cv=1.0).sample(rng, n)


@dataclass(frozen=True, kw_only=True)
class Gamma:
    """Open loop, gamma-distributed gaps: cv = std/mean of a gap (1 is Poisson, > 1 bursty)."""

    rate_per_s: float
    cv: float

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if not self.rate_per_s > 0 or not math.isfinite(self.rate_per_s):
            raise InputError("rate_per_s", self.rate_per_s, "must be a positive number")
        if not self.cv > 0 or not math.isfinite(self.cv):
            raise InputError("cv", self.cv, "must be a positive number")
        shape = 1.0 / self.cv**2
        mean_gap_ms = 1e3 / self.rate_per_s
        gaps = rng.gamma(shape, mean_gap_ms / shape, n)
        # The first request arrives at 0 so that runs at different rates start together.
        return np.concatenate(([0.0], np.cumsum(gaps[1:])))


@dataclass(frozen=True, kw_only=True)
class Timestamps:
    """Open loop, arrivals replayed from a trace (ms, non-decreasing)."""

    ms: Sequence[float]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.asarray(self.ms, dtype=np.float64)
        if len(out) != n:
            raise InputError("ms", len(out), f"needs one timestamp per request ({n})")
        return out


@dataclass(frozen=True, kw_only=True)
class ClosedLoop:
    """`concurrency` clients, each sending its next request when the last one finishes."""

    concurrency: int


@dataclass(frozen=True, kw_only=True)
class Offline:
    """All requests queued at t = 0."""


Arrivals = Poisson | Gamma | Timestamps | ClosedLoop | Offline


@dataclass(frozen=True, kw_only=True)
class SharedPrefixes:
    """A shared prefix (system prompt) that a share of requests start with.

    Each request carries one of `prefixes` ids with probability `share`, else none; a request
    with a prefix has at least `tokens` + 1 prompt tokens (its own question follows the
    prefix). Whether its prefix is still cached when it is scheduled is the engine's business:
    the realised hit rate is at most `share`, less the first use of each id and evictions.
    """

    tokens: int
    share: float
    prefixes: int = 1

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.tokens < 1:
            raise InputError("tokens", self.tokens, "a shared prefix needs >= 1 token")
        if not 0.0 <= self.share <= 1.0:
            raise InputError("share", self.share, "must be between 0 and 1")
        if self.prefixes < 1:
            raise InputError("prefixes", self.prefixes, "must be >= 1")
        has = rng.random(n) < self.share
        ids = np.where(has, rng.integers(0, self.prefixes, n), -1)
        return ids.astype(np.int64), np.where(has, self.tokens, 0).astype(np.int64)


def sample_requests(rng: np.random.Generator, *, requests: int, prompt_tokens: LengthDist,
                    output_tokens: LengthDist, arrivals: Arrivals,
                    prefix: SharedPrefixes | None = None) -> RequestStream:
    """Draw `requests` rows: lengths, then prefixes, then arrival times (in that order)."""
    if requests < 1:
        raise InputError("requests", requests, "must be >= 1")
    prompt = prompt_tokens.sample(rng, requests)
    output = output_tokens.sample(rng, requests)
    if prefix is None:
        ids = np.full(requests, -1, dtype=np.int64)
        shared = np.zeros(requests, dtype=np.int64)
    else:
        ids, shared = prefix.sample(rng, requests)
        prompt = np.maximum(prompt, shared + 1)
    mode, concurrency = LoadMode.OPEN, 0
    if isinstance(arrivals, ClosedLoop):
        mode, concurrency = LoadMode.CLOSED, arrivals.concurrency
        arrival = np.zeros(requests)
    elif isinstance(arrivals, Offline):
        mode, arrival = LoadMode.OFFLINE, np.zeros(requests)
    else:
        arrival = arrivals.sample(rng, requests)
    return RequestStream(prompt_tokens=prompt, output_tokens=output, prefix_id=ids,
                         prefix_tokens=shared, arrival_ms=arrival, mode=mode,
                         concurrency=concurrency)
