"""What the load generator sent and measured: per-request records and the per-phase report.

The report states the workload as it truly went out (counts, realized rate and burstiness,
token-length percentiles, prefix reuse) beside what the client measured (TTFT, inter-token
gaps, end-to-end) and what the servers said they counted (`usage`), so a closed-loop test can
check the operator's view of the workload against the truth.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np


# The JSON report's shapes (`trilemma loadgen --json`), as `to_dict` writes them.
class StatsDict(TypedDict):
    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class PhaseReportDict(TypedDict):
    name: str
    index: int | None
    duration_s: float
    parameters: dict[str, Any]  # the phase's settings, as loadgen.LoadStage.to_dict gives them
    sent: int
    completed: int
    failed: int
    rate_per_s: float
    arrival_cv: float | None
    prompt_tokens: StatsDict
    output_tokens: StatsDict
    prompt_tokens_total: int
    output_tokens_total: int
    prefix_token_share: float
    prefix_request_share: float
    server_prompt_tokens: int
    server_completion_tokens: int
    server_cached_tokens: int
    ttft_ms: StatsDict
    itl_ms: StatsDict
    e2e_ms: StatsDict
    errors: dict[str, int]


class LoadReportDict(TypedDict):
    urls: list[str]
    model: str
    seed: int
    phases: list[PhaseReportDict]
    overall: PhaseReportDict


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Mean and percentiles of a sample; None where the sample is empty."""

    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Stats:
        a = np.asarray(values, dtype=np.float64)
        if a.size == 0:
            return cls(n=0, mean=None, p50=None, p90=None, p99=None)
        p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        return cls(n=int(a.size), mean=float(a.mean()), p50=p50, p90=p90, p99=p99)

    def to_dict(self) -> StatsDict:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {"n": self.n, "mean": r(self.mean), "p50": r(self.p50), "p90": r(self.p90),
                "p99": r(self.p99)}


@dataclass(kw_only=True)
class RequestRecord:
    """One request: what was sent (filled at send time) and what came back (filled later)."""

    phase: int
    sent_s: float  # since the run started
    prompt_tokens: int
    output_tokens: int  # max_tokens asked for (with ignore_eos: exactly what should come)
    shared_tokens: int  # leading tokens taken from a shared prefix
    prefix: int  # which shared prefix; -1 for none
    prompt_digest: int  # CRC-32 of the prompt's token ids: compares runs without keeping them
    target: int  # index of the URL it went to
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)  # between content chunks
    usage_prompt: int | None = None
    usage_completion: int | None = None
    usage_cached: int | None = None

    def key(self) -> tuple[int, int, int, int, int]:
        """What a run with the same seed must send again (timing aside)."""
        return (self.phase, self.prompt_digest, self.prompt_tokens, self.output_tokens,
                self.target)


@dataclass(frozen=True, kw_only=True)
class PhaseReport:
    """One phase (or the whole run: index None) of a load run."""

    name: str
    index: int | None
    duration_s: float
    parameters: dict[str, Any]
    sent: int
    completed: int
    failed: int
    rate_per_s: float  # realized: requests sent / duration
    arrival_cv: float | None  # realized CV of the gaps between sends
    prompt_tokens: Stats
    output_tokens: Stats
    prompt_tokens_total: int
    output_tokens_total: int
    prefix_token_share: float  # shared-prefix tokens / prompt tokens, of what was sent
    prefix_request_share: float  # requests that started with a shared prefix
    server_prompt_tokens: int  # sums of the servers' `usage`, over completed requests
    server_completion_tokens: int
    server_cached_tokens: int
    ttft_ms: Stats
    itl_ms: Stats  # gaps between streamed chunks (a speculative step sends several tokens)
    e2e_ms: Stats
    errors: dict[str, int]

    @classmethod
    def build(cls, records: Sequence[RequestRecord], *, name: str, index: int | None,
              duration_s: float, parameters: dict[str, Any]) -> PhaseReport:
        ok = [r for r in records if r.ok]
        prompt = np.asarray([r.prompt_tokens for r in records], dtype=np.int64)
        output = np.asarray([r.output_tokens for r in records], dtype=np.int64)
        shared = sum(r.shared_tokens for r in records)
        sends = np.sort(np.asarray([r.sent_s for r in records]))
        gaps = np.diff(sends)
        cv = float(gaps.std() / gaps.mean()) if gaps.size >= 2 and gaps.mean() > 0 else None
        return cls(
            name=name, index=index, duration_s=duration_s, parameters=parameters,
            sent=len(records), completed=len(ok), failed=len(records) - len(ok),
            rate_per_s=len(records) / duration_s if duration_s > 0 else math.nan,
            arrival_cv=cv, prompt_tokens=Stats.of(prompt), output_tokens=Stats.of(output),
            prompt_tokens_total=int(prompt.sum()), output_tokens_total=int(output.sum()),
            prefix_token_share=shared / int(prompt.sum()) if prompt.size else 0.0,
            prefix_request_share=(sum(r.prefix >= 0 for r in records) / len(records)
                                  if records else 0.0),
            server_prompt_tokens=sum(r.usage_prompt or 0 for r in ok),
            server_completion_tokens=sum(r.usage_completion or 0 for r in ok),
            server_cached_tokens=sum(r.usage_cached or 0 for r in ok),
            ttft_ms=Stats.of([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]),
            itl_ms=Stats.of([g * 1e3 for r in ok for g in r.chunk_gaps_s]),
            e2e_ms=Stats.of([r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]),
            errors=dict(Counter(r.error for r in records if r.error).most_common()))

    def to_dict(self) -> PhaseReportDict:
        return {
            "name": self.name, "index": self.index, "duration_s": round(self.duration_s, 3),
            "parameters": self.parameters, "sent": self.sent, "completed": self.completed,
            "failed": self.failed, "rate_per_s": round(self.rate_per_s, 4),
            "arrival_cv": None if self.arrival_cv is None else round(self.arrival_cv, 4),
            "prompt_tokens": self.prompt_tokens.to_dict(),
            "output_tokens": self.output_tokens.to_dict(),
            "prompt_tokens_total": self.prompt_tokens_total,
            "output_tokens_total": self.output_tokens_total,
            "prefix_token_share": round(self.prefix_token_share, 4),
            "prefix_request_share": round(self.prefix_request_share, 4),
            "server_prompt_tokens": self.server_prompt_tokens,
            "server_completion_tokens": self.server_completion_tokens,
            "server_cached_tokens": self.server_cached_tokens,
            "ttft_ms": self.ttft_ms.to_dict(), "itl_ms": self.itl_ms.to_dict(),
            "e2e_ms": self.e2e_ms.to_dict(), "errors": self.errors,
        }


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """A whole load run: every phase, the run overall, and the request log."""

    urls: tuple[str, ...]
    model: str
    seed: int
    phases: tuple[PhaseReport, ...]
    overall: PhaseReport
    requests: tuple[RequestRecord, ...]

    def to_dict(self) -> LoadReportDict:
        return {"urls": list(self.urls), "model": self.model, "seed": self.seed,
                "phases": [p.to_dict() for p in self.phases],
                "overall": self.overall.to_dict()}

    def table(self) -> str:
        """The report as fixed-width text, one column per phase and one for the run."""
        cols = [*self.phases, self.overall] if len(self.phases) > 1 else [self.overall]
        heads = [p.name for p in cols]
        rows: list[tuple[str, list[str]]] = [
            ("duration s", [f"{p.duration_s:.1f}" for p in cols]),
            ("sent / completed / failed",
             [f"{p.sent}/{p.completed}/{p.failed}" for p in cols]),
            ("rate req/s (arrival CV)", [f"{p.rate_per_s:.2f} ({_num(p.arrival_cv, 2)})"
                                         for p in cols]),
        ]
        for label, attr in (("prompt tokens", "prompt_tokens"),
                            ("output tokens", "output_tokens")):
            rows.append((f"{label} mean", [_num(getattr(p, attr).mean, 1) for p in cols]))
            rows.append((f"{label} p50/p90/p99", [_pcts(getattr(p, attr), 0) for p in cols]))
        rows += [
            ("prefix share tokens / requests", [
                f"{p.prefix_token_share:.3f} / {p.prefix_request_share:.3f}" for p in cols]),
            ("server prompt/output/cached", [
                f"{p.server_prompt_tokens}/{p.server_completion_tokens}/"
                f"{p.server_cached_tokens}" for p in cols]),
            ("TTFT ms p50/p90/p99", [_pcts(p.ttft_ms, 1) for p in cols]),
            ("ITL ms p50/p90/p99", [_pcts(p.itl_ms, 2) for p in cols]),
            ("e2e ms p50/p90/p99", [_pcts(p.e2e_ms, 0) for p in cols]),
        ]
        width = max(len(label) for label, _ in rows) + 2
        col = max(12, *(len(v) + 2 for _, vals in rows for v in vals), *(len(h) + 2
                                                                          for h in heads))
        lines = [f"loadgen: {self.model} at {', '.join(self.urls)} (seed {self.seed})",
                 " " * width + "".join(h.rjust(col) for h in heads)]
        lines += [label.ljust(width) + "".join(v.rjust(col) for v in vals)
                  for label, vals in rows]
        lines += [f"failed: {n} x {error}" for error, n in self.overall.errors.items()]
        return "\n".join(lines)


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pcts(s: Stats, digits: int) -> str:
    return "/".join(_num(v, digits) for v in (s.p50, s.p90, s.p99))
