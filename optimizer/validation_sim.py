"""Replay a measured row's benchmark through the serving simulator (`trilemma validate`).

The closed form (perf/latency.py) prices a fixed-concurrency run as if its C clients moved in
lockstep; for SGLang, prefill-first waves. The real clients do not: InferenceMAX's
benchmark_serving draws each request's input and output lengths uniformly from
[0.8 L, L] and generates exactly that many tokens (`--ignore-eos`), so requests that start
together finish apart, their successors arrive apart, and a prefill batch holds a few
prompts, not the whole wave. The simulator, with the engine's own scheduler and the same step
model, runs that benchmark as it ran: the client (perf/data/bench_clients.yaml) says how many
requests, how their lengths were drawn and what the reported figure is.

Deterministic: each run's lengths come from a generator seeded with the client's seed.

Not the default path (`trilemma validate --simulate` selects it): on the dev set, with the
engine constants fitted to the closed form, it predicts TTFT worse for both engines. Where the
client draws fixed lengths (AIConfigurator's aiperf rows) it agrees with the SGLang waves, as
the lockstep cross-check says; on InferenceMAX's jittered rows its SGLang TTFT is 0.2-0.45x of
the measured, the shortfall growing about linearly with C (median 0.19 s at C = 4, 1.3 s at
C = 128): the measured TTFT lies between the desynchronised simulation and the waves, so some
per-request cost that grows with the clients in flight is in neither model. Its TPOT is the
better one for SGLang (the decode batch's drift is real).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import numpy as np
import yaml

from trilemma.optimizer import serving
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf.parallelism import Parallelism
from trilemma.optimizer.perf.steps import StepModel


@dataclass(frozen=True, kw_only=True)
class BenchClient:
    """How one benchmark client drove a fixed-concurrency run (bench_clients.yaml)."""

    name: str
    requests_per_concurrency: int
    range_ratio: float  # lengths uniform in [int(ratio x L), L]; 1.0 is fixed
    ignore_eos: bool
    seed: int
    match: tuple[str, ...]

    def mean_length(self, nominal: int) -> float:
        """The mean of the draw below: what the engine served on average (the closed form's
        lockstep clients take it)."""
        return (max(int(nominal * self.range_ratio), 1) + max(nominal, 1)) / 2.0

    def lengths(self, rng: np.random.Generator, mean_len: int, n: int) -> np.ndarray:
        """benchmark_serving's sample_uniform: integers in [int(L x ratio), L], both ends in."""
        low = max(int(mean_len * self.range_ratio), 1)
        return rng.integers(low, max(mean_len, low) + 1, size=n, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class Clients:
    clients: tuple[BenchClient, ...]
    default: BenchClient

    def for_source(self, source: str) -> BenchClient:
        """The client whose `match` names a substring of the row's silicon_data_source."""
        for client in self.clients:
            if any(m in source for m in client.match):
                return client
        return self.default


@functools.cache
def clients() -> Clients:
    text = resources.files("trilemma.optimizer.perf").joinpath(
        "data/bench_clients.yaml").read_text()
    doc = yaml.safe_load(text)
    out = []
    for name, c in doc["clients"].items():
        if not c["ignore_eos"]:
            # Without it the output length is the model's, which nothing here can replay.
            raise InputError("bench_clients", name, "only --ignore-eos clients can be replayed")
        out.append(BenchClient(name=name,
                               requests_per_concurrency=int(c["requests_per_concurrency"]),
                               range_ratio=float(c["range_ratio"]), ignore_eos=True,
                               seed=int(c["seed"]), match=tuple(c["match"])))
    by_name = {c.name: c for c in out}
    return Clients(clients=tuple(out), default=by_name[doc["default"]])


@dataclass(frozen=True, kw_only=True)
class SimulatedRow:
    ttft_ms: float
    tpot_ms: float


def workload(client: BenchClient, *, concurrency: int, isl: int,
             osl: int) -> serving.RequestStream:
    """The measured requests of one run, in the order the client sends them."""
    n = client.requests_per_concurrency * concurrency
    rng = np.random.default_rng(client.seed)
    # Input lengths first, then output lengths, as benchmark_serving draws them.
    prompt = client.lengths(rng, isl, n)
    output = client.lengths(rng, osl, n)
    return serving.RequestStream(prompt_tokens=prompt, output_tokens=output,
                                 prefix_id=np.full(n, -1), prefix_tokens=np.zeros(n),
                                 arrival_ms=np.zeros(n), mode=serving.LoadMode.CLOSED,
                                 concurrency=concurrency)


def simulate_row(sm: StepModel, par: Parallelism, client: BenchClient, *,
                 concurrency: int, isl: int, osl: int) -> SimulatedRow:
    """The benchmark's mean TTFT and TPOT, simulated. Every measured request counts: the
    client's warm-up ran and finished before them, so the run starts from an idle server
    (its first requests arrive together, as the real ones did)."""
    engine = serving.engine_config(sm, tp=int(par.tp), pp=int(par.pp), dp=int(par.dp),
                                   ep=bool(par.ep))
    cluster = serving.Cluster(pool=serving.Pool(engine=engine),
                              request_overhead_ms=sm.facts.request_overhead_ms)
    w = workload(client, concurrency=concurrency, isl=isl, osl=osl)
    res = serving.simulate(cluster, w, sm, np.random.default_rng(client.seed))
    summary = res.summary()
    return SimulatedRow(ttft_ms=summary.ttft_ms.mean, tpot_ms=summary.tpot_ms.mean)


def client_for(row: Mapping[str, str]) -> BenchClient:
    return clients().for_source(row.get("silicon_data_source") or "")
