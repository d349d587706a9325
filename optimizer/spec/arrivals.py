"""Request arrivals: a Poisson process, a gamma renewal process with a burstiness CV, or a trace.

Part of the workload spec. The search sizes a deployment for the mean rate times the
workload's peak factor; the simulator draws inter-arrival gaps from here. A trace is a CSV
file whose rows are `timestamp,prompt,output[,prefix]` (seconds, tokens, tokens, tokens of the
prompt a shared prefix covers); a relative path is resolved against the spec file's folder.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, ValidationInfo, field_validator

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.base import SpecModel, require_generator, rule_error

TRACE_COLUMNS = ("timestamp", "prompt", "output", "prefix")
_REQUIRED_COLUMNS = TRACE_COLUMNS[:3]


class PoissonArrivals(SpecModel):
    """Independent arrivals at a constant mean rate (exponential gaps)."""

    kind: Literal["poisson"] = Field(description="Arrival process: Poisson.")
    requests_per_second: float = Field(gt=0, le=limits.MAX_RATE_RPS,
                                       description="Mean arrival rate, requests/s.")

    def mean_rate(self) -> float:
        """Mean requests per second."""
        return self.requests_per_second

    def sample_gaps(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        """n inter-arrival gaps in seconds."""
        return require_generator(rng).exponential(1 / self.requests_per_second, n)


class GammaArrivals(SpecModel):
    """Renewal arrivals with gamma gaps: `cv` > 1 is burstier than Poisson, < 1 smoother."""

    kind: Literal["gamma"] = Field(description="Arrival process: gamma-distributed gaps.")
    requests_per_second: float = Field(gt=0, le=limits.MAX_RATE_RPS,
                                       description="Mean arrival rate, requests/s.")
    cv: float = Field(
        gt=0, le=10,
        description="Burstiness: coefficient of variation of the gaps (std/mean); 1 = Poisson.")

    def mean_rate(self) -> float:
        return self.requests_per_second

    def sample_gaps(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        shape = 1 / self.cv**2
        return require_generator(rng).gamma(shape, 1 / (self.requests_per_second * shape), n)


@dataclass(frozen=True, kw_only=True, eq=False)
class Trace:
    """A parsed trace: one entry per request, in file order (timestamps non-decreasing)."""

    path: str
    timestamps_s: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    prefix_tokens: npt.NDArray[np.int64]  # zeros where the file has no prefix column

    def __len__(self) -> int:
        return len(self.timestamps_s)

    def mean_rate(self) -> float:
        """Requests per second over the trace's span: (n - 1) gaps in (last - first) seconds."""
        return (len(self) - 1) / float(self.timestamps_s[-1] - self.timestamps_s[0])

    def gaps(self) -> npt.NDArray[np.float64]:
        return np.diff(self.timestamps_s)


class TraceArrivals(SpecModel):
    """Arrivals (and lengths, and prefix hits) replayed from a CSV trace."""

    kind: Literal["trace"] = Field(description="Arrival process: replay a CSV trace.")
    path: str = Field(
        min_length=1,
        description="CSV with header timestamp,prompt,output[,prefix] (s, tokens, tokens, "
                    "tokens); relative paths resolve against the spec file's folder.")

    @field_validator("path")
    @classmethod
    def _resolve_and_parse(cls, path: str, info: ValidationInfo) -> str:
        resolved = Path(path).expanduser()
        base = (info.context or {}).get("base_dir")
        if not resolved.is_absolute() and base is not None:
            resolved = Path(base) / resolved
        try:
            load_trace(resolved)
        except InputError as err:
            shown = "" if err.value is None else f" ({err.value!r})"
            raise rule_error(f"{err.field}{shown}: {err.why}") from None
        # Keep the resolved path so later readers need not know where the spec file was.
        return str(resolved.resolve())

    def trace(self) -> Trace:
        return load_trace(self.path)

    def mean_rate(self) -> float:
        return self.trace().mean_rate()

    def sample_gaps(self, n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        """n gaps resampled from the trace's own gaps (the replay itself is the simulator's)."""
        return require_generator(rng).choice(self.trace().gaps(), size=n)


Arrivals = Annotated[
    PoissonArrivals | GammaArrivals | TraceArrivals, Field(discriminator="kind")]
"""An arrival process, told apart by `kind`."""

ARRIVAL_KINDS = ("poisson", "gamma", "trace")


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Parse a trace CSV; InputError(field=path) naming the line and column of a bad row.

    Cached per file version (path, size, mtime), so validating a spec and using it parse once.
    """
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as err:
        raise InputError(str(path), None, f"trace file not readable: {err.strerror}") from None
    if not p.is_file():
        raise InputError(str(path), None, "trace path is not a file")
    return _load_trace(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_trace(path: str, _size: int, _mtime_ns: int) -> Trace:
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = [h.strip().lower() for h in next(rows, [])]
        if tuple(header) not in (_REQUIRED_COLUMNS, TRACE_COLUMNS):
            raise InputError(path, header, "trace header must be timestamp,prompt,output"
                                           "[,prefix]")
        cols: list[list[float]] = [[] for _ in header]
        for line, row in enumerate(rows, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines, e.g. a trailing newline
            if len(row) != len(header):
                raise InputError(f"{path}:{line}", row, f"expected {len(header)} columns")
            for i, (name, cell) in enumerate(zip(header, row, strict=True)):
                cols[i].append(_cell(path, line, name, cell))
    if len(cols[0]) < 2:
        raise InputError(path, len(cols[0]), "a trace needs at least 2 requests for a rate")
    t = np.asarray(cols[0], dtype=float)
    prompt, output = (np.asarray(c, dtype=np.int64) for c in cols[1:3])
    prefix = np.asarray(cols[3], dtype=np.int64) if len(cols) == 4 else np.zeros_like(prompt)
    _check_rows(path, t, prompt, prefix)
    return Trace(path=path, timestamps_s=t, prompt_tokens=prompt, output_tokens=output,
                 prefix_tokens=prefix)


def _cell(path: str, line: int, name: str, cell: str) -> float:
    where = f"{path}:{line}"
    try:
        value = float(cell)
    except ValueError:
        raise InputError(where, cell, f"{name} must be a number") from None
    if not math.isfinite(value):
        raise InputError(where, cell, f"{name} must be finite")
    if name == "timestamp":
        return value
    if value != int(value):
        raise InputError(where, cell, f"{name} must be a whole number of tokens")
    low = 0 if name == "prefix" else 1
    if value < low:
        raise InputError(where, cell, f"{name} must be >= {low} tokens")
    return value


def _check_rows(path: str, t: npt.NDArray[np.float64], prompt: npt.NDArray[np.int64],
                prefix: npt.NDArray[np.int64]) -> None:
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size:
        line = int(back[0]) + 3  # +1 for diff, +1 for the header, +1 for 1-based lines
        raise InputError(f"{path}:{line}", float(t[back[0] + 1]),
                         "timestamps must not decrease")
    if t[-1] <= t[0]:
        raise InputError(path, float(t[0]), "all timestamps equal: no rate can be derived")
    over = np.flatnonzero(prefix > prompt)
    if over.size:
        raise InputError(f"{path}:{int(over[0]) + 2}", int(prefix[over[0]]),
                         "prefix must not exceed the prompt")
