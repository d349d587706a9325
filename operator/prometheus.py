"""An async client for the Prometheus HTTP API: instant and range queries, typed results.

The estimator (estimator.py) queries through it; the reconciler turns its errors into
conditions and retries. It speaks /api/v1/query and /api/v1/query_range over aiohttp with a
per-request timeout, bounded retries with exponential backoff where a retry can help
(connection failures, 5xx), none where it cannot (4xx: the query or the credentials are wrong,
and asking again changes nothing), and a bearer token when one is given (the operator reads it
from a Secret; this module never logs it).

Values arrive as strings; "NaN", "+Inf" and "-Inf" parse to floats, and `QueryResult.value()`
treats them as no value, since a NaN ratio means "no traffic to divide by", not a number.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp


class ErrorKind(enum.Enum):
    UNREACHABLE = "unreachable"  # no connection, or a 502/503/504 on the way
    TIMEOUT = "timeout"  # our deadline passed, or Prometheus gave up evaluating
    BAD_QUERY = "bad_query"  # 4xx: the query or the credentials are wrong
    BAD_RESPONSE = "bad_response"  # an answer that is not the API's JSON, or a 500


class PrometheusError(Exception):
    """A query that produced no result, and why (`kind`, the HTTP `status` if any)."""

    def __init__(self, kind: ErrorKind, message: str, *, status: int | None = None,
                 query: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.query = query

    @property
    def retryable(self) -> bool:
        """Worth asking again: the server or the path to it failed, not the request."""
        return self.kind is ErrorKind.UNREACHABLE or (self.status or 0) >= 500

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


class ResultType(enum.Enum):
    VECTOR = "vector"
    MATRIX = "matrix"
    SCALAR = "scalar"
    STRING = "string"


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One value of one series (a scalar is a sample without labels)."""

    labels: Mapping[str, str]
    timestamp: float  # unix seconds
    value: float  # may be NaN or +-Inf, as Prometheus computed it


@dataclass(frozen=True, kw_only=True)
class Series:
    """The values of one series over time, oldest first."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]  # (unix seconds, value)


@dataclass(frozen=True, kw_only=True)
class QueryResult:
    type: ResultType
    samples: tuple[Sample, ...] = ()  # vector and scalar results
    series: tuple[Series, ...] = ()  # matrix results
    warnings: tuple[str, ...] = ()

    def value(self) -> float | None:
        """The value of an aggregated query: one finite number, or None when there is none.

        None for an empty vector and for NaN/Inf; an error when several series came back,
        since picking one would silently drop the others.
        """
        if self.type not in (ResultType.VECTOR, ResultType.SCALAR):
            raise ValueError(f"a {self.type.value} result has no single value")
        if not self.samples:
            return None
        if len(self.samples) > 1:
            raise ValueError(f"{len(self.samples)} series where one was expected; aggregate "
                             "the query (sum, avg, max)")
        value = self.samples[0].value
        return value if math.isfinite(value) else None


class PrometheusClient:
    """Queries one Prometheus server; pass `session` to share a pool, or let it own one."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 10.0,
                 retries: int = 2, backoff_s: float = 0.25, max_backoff_s: float = 4.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be http(s)://..., got {base_url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._owns_session = session is None

    def __repr__(self) -> str:  # never the token
        return f"PrometheusClient({self.base_url!r})"

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client opened it; a session passed in stays open."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def query(self, promql: str, *, at: float | None = None) -> QueryResult:
        """An instant query, evaluated at `at` (unix seconds) or at the server's now."""
        form = {"query": promql}
        if at is not None:
            form["time"] = _timestamp(at)
        return await self._request("/api/v1/query", form, promql)

    async def query_range(self, promql: str, *, start: float, end: float,
                          step_s: float) -> QueryResult:
        """A range query: `promql` evaluated every `step_s` seconds from start to end."""
        if end < start or step_s <= 0:
            raise ValueError("need start <= end and step_s > 0")
        form = {"query": promql, "start": _timestamp(start), "end": _timestamp(end),
                "step": f"{step_s:g}"}
        return await self._request("/api/v1/query_range", form, promql)

    async def _request(self, path: str, form: dict[str, str], promql: str) -> QueryResult:
        # Prometheus stops evaluating at its own deadline too, sparing it a query we dropped.
        form = {**form, "timeout": f"{self.timeout_s:g}"}
        attempt = 0
        while True:
            try:
                body = await self._post_once(path, form, promql)
            except PrometheusError as err:
                if not err.retryable or attempt >= self.retries:
                    raise
                await asyncio.sleep(min(self.backoff_s * 2**attempt, self.max_backoff_s))
                attempt += 1
                continue
            return _parse(body, promql)

    async def _post_once(self, path: str, form: dict[str, str], promql: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self.base_url + path
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            # POST with a form body, so that queries too long for a URL still work.
            async with self._session.post(url, data=form, headers=self._headers,
                                          timeout=timeout) as response:
                status = response.status
                text = await response.text()
        except TimeoutError:
            # Before ClientConnectionError: aiohttp's timeouts subclass both.
            raise PrometheusError(ErrorKind.TIMEOUT, f"no answer from {url} within "
                                  f"{self.timeout_s:g}s", query=promql) from None
        except aiohttp.ClientConnectionError as err:
            raise PrometheusError(ErrorKind.UNREACHABLE, f"{url}: {err}", query=promql) from None
        return _decode(text, status, url, promql)


def _timestamp(unix_s: float) -> str:
    return f"{unix_s:.3f}"


def _decode(text: str, status: int, url: str, promql: str) -> dict[str, Any]:
    """The API's JSON envelope, or the PrometheusError that the status and body amount to."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict) and status == 200 and body.get("status") == "success":
        return body
    raise _error_for(status, body if isinstance(body, dict) else {}, url, promql)


def _error_for(status: int, body: Mapping[str, Any], url: str,
               promql: str) -> PrometheusError:
    # Only the API's own error field, bounded: the raw body of whatever answered is never
    # copied (it lands in status, which the endpoint's owner reads).
    detail = str(body.get("error") or "")[:200] or "not a Prometheus API error body"
    if body.get("errorType") in ("timeout", "canceled"):
        kind = ErrorKind.TIMEOUT
    elif 400 <= status < 500:
        kind = ErrorKind.BAD_QUERY
    elif status in (502, 503, 504):
        kind = ErrorKind.UNREACHABLE
    else:
        kind = ErrorKind.BAD_RESPONSE
        if status == 200:
            detail = f"not a Prometheus API answer: {detail}"
    return PrometheusError(kind, f"{url}: HTTP {status}: {detail}", status=status, query=promql)


def _parse(body: Mapping[str, Any], promql: str) -> QueryResult:
    """A success envelope's data as a QueryResult; bad_response when it is not well formed."""
    try:
        data = body["data"]
        kind = ResultType(data["resultType"])
        result = data["result"]
        warnings = tuple(str(w) for w in body.get("warnings") or ())
        if kind is ResultType.VECTOR:
            samples = tuple(Sample(labels=dict(r["metric"]), timestamp=float(r["value"][0]),
                                   value=float(r["value"][1])) for r in result)
            return QueryResult(type=kind, samples=samples, warnings=warnings)
        if kind is ResultType.SCALAR:
            sample = Sample(labels={}, timestamp=float(result[0]), value=float(result[1]))
            return QueryResult(type=kind, samples=(sample,), warnings=warnings)
        if kind is ResultType.MATRIX:
            series = tuple(
                Series(labels=dict(r["metric"]),
                       points=tuple((float(t), float(v)) for t, v in r["values"]))
                for r in result)
            return QueryResult(type=kind, series=series, warnings=warnings)
        return QueryResult(type=kind, warnings=warnings)  # a string: nothing numeric to keep
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise PrometheusError(ErrorKind.BAD_RESPONSE,
                              f"malformed query result ({type(err).__name__}: {err})",
                              query=promql) from None
