"""The workload a deployment must serve: request lengths, prefix reuse, arrivals, peak.

Top of the spec's data flow for traffic: the search sizes replicas for `design_rate()`, the
perf model prices prompts by their uncached tokens, and the simulator draws requests from
`sample()`. Output predictability (0 = creative writing, 0.5 = chat, 1 = rewriting code)
feeds the speculative-decoding acceptance model in catalog/speculation.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.arrivals import Arrivals, TraceArrivals
from trilemma.optimizer.spec.base import SpecModel, require_generator, rule_error
from trilemma.optimizer.spec.lengths import HistogramLengths, LengthDistribution


class PrefixReuse(SpecModel):
    """A prefix shared across requests (system prompt, repository context, chat history)."""

    shared_tokens: int = Field(
        ge=0, le=limits.MAX_TOKENS,
        description="Tokens at the start of a prompt that other requests share.")
    hit_rate: float = Field(
        ge=0, le=1, description="Share of requests whose shared prefix is in the cache, 0-1.")


@dataclass(frozen=True, kw_only=True, eq=False)
class RequestSample:
    """Sampled requests: prompt, output and prefix-cache-hit tokens, one entry per request."""

    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    cached_tokens: npt.NDArray[np.int64]  # prompt tokens served from the prefix cache


class Workload(SpecModel):
    """What arrives: lengths (or a trace), prefix reuse, arrival process, peak, predictability."""

    prompt_tokens: LengthDistribution | None = Field(
        default=None,
        description="Prompt length distribution (tokens); omit only with a trace.")
    output_tokens: LengthDistribution | None = Field(
        default=None,
        description="Output length distribution (tokens); omit only with a trace.")
    prefix: PrefixReuse | None = Field(
        default=None, description="Prefix reuse; omit for none. A trace carries its own.")
    arrivals: Arrivals = Field(description="Arrival process: poisson, gamma or trace.")
    peak_factor: float = Field(
        default=1.0, ge=1, le=100,
        description="Size for the mean rate times this (>= 1): the peak-to-mean ratio.")
    output_predictability: float = Field(
        default=0.5, ge=0, le=1,
        description="How predictable outputs are, 0-1 (0 creative, 0.5 chat, 1 rewriting); "
                    "drives speculative-decoding acceptance.")

    @model_validator(mode="after")
    def _lengths_come_from_one_place(self) -> Workload:
        if isinstance(self.arrivals, TraceArrivals):
            # One source of truth per request: a trace row already says all of these.
            for name, given in (("promptTokens", self.prompt_tokens),
                                ("outputTokens", self.output_tokens), ("prefix", self.prefix)):
                if given is not None:
                    raise rule_error(
                        f"a trace gives {name} per request; drop it here or use poisson/gamma "
                        "arrivals", field=name, value=given.model_dump(by_alias=True))
            return self
        for name, given in (("promptTokens", self.prompt_tokens),
                            ("outputTokens", self.output_tokens)):
            if given is None:
                raise rule_error(f"{name} is required unless arrivals is a trace", field=name)
        if self.prefix is not None:
            mean = self.prompt_distribution().mean_tokens()
            if self.prefix.shared_tokens > mean:
                raise rule_error(
                    f"a shared prefix longer than the mean prompt ({mean:g} tokens) cannot be "
                    "shared by most requests", field="prefix.sharedTokens",
                    value=self.prefix.shared_tokens)
        return self

    # --- lengths ---------------------------------------------------------------------------

    def prompt_distribution(self) -> LengthDistribution:
        """The prompt-length distribution; for a trace, its empirical histogram."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return _histogram(self._trace_arrivals().trace().prompt_tokens)

    def output_distribution(self) -> LengthDistribution:
        if self.output_tokens is not None:
            return self.output_tokens
        return _histogram(self._trace_arrivals().trace().output_tokens)

    def expected_cached_tokens(self) -> float:
        """Mean prompt tokens per request served from the prefix cache."""
        if isinstance(self.arrivals, TraceArrivals):
            return float(self.arrivals.trace().prefix_tokens.mean())
        if self.prefix is None:
            return 0.0
        covered = self.prompt_distribution().expected_min(self.prefix.shared_tokens)
        return self.prefix.hit_rate * covered

    def expected_uncached_prompt_tokens(self) -> float:
        """Mean prompt tokens per request that prefill must compute."""
        return self.prompt_distribution().mean_tokens() - self.expected_cached_tokens()

    def sample(self, n: int, rng: np.random.Generator) -> RequestSample:
        """n requests; the same Generator state gives the same requests.

        Synthetic workloads draw prompts, then outputs, then cache hits, independently. A
        trace is resampled by row, keeping each request's lengths together.
        """
        rng = require_generator(rng)
        if isinstance(self.arrivals, TraceArrivals):
            trace = self.arrivals.trace()
            rows = rng.integers(0, len(trace), size=n)
            return RequestSample(prompt_tokens=trace.prompt_tokens[rows],
                                 output_tokens=trace.output_tokens[rows],
                                 cached_tokens=trace.prefix_tokens[rows])
        prompt = self.prompt_distribution().sample(n, rng)
        output = self.output_distribution().sample(n, rng)
        if self.prefix is None:
            cached = np.zeros(n, dtype=np.int64)
        else:
            hit = rng.random(n) < self.prefix.hit_rate
            cached = np.where(hit, np.minimum(prompt, self.prefix.shared_tokens), 0)
        return RequestSample(prompt_tokens=prompt, output_tokens=output,
                             cached_tokens=cached.astype(np.int64))

    # --- rate ------------------------------------------------------------------------------

    def mean_rate(self) -> float:
        """Mean requests per second (a trace's: over its span)."""
        return self.arrivals.mean_rate()

    def design_rate(self) -> float:
        """Requests per second to size for: the mean rate times the peak factor."""
        return self.mean_rate() * self.peak_factor

    def _trace_arrivals(self) -> TraceArrivals:
        assert isinstance(self.arrivals, TraceArrivals), "validated: lengths or a trace"
        return self.arrivals


def _histogram(tokens: npt.NDArray[np.int64]) -> HistogramLengths:
    values, counts = np.unique(tokens, return_counts=True)
    return HistogramLengths(kind="histogram", values=values.tolist(),
                            weights=counts.astype(float).tolist())
