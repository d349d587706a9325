"""How fast the simulator runs: `python -m trilemma.optimizer.serving.bench`.

Prints simulated requests per second of wall time (one core) for a typical chat workload on
one replica, for each Method: the fast path with a fresh step table (what a single run
pays), with a table shared from an earlier run (what a search sweeping rates pays), and the
one-call-per-step paths on a shorter run. Steps are priced by the calibrated Llama-3.1-8B /
H100 step model when the kernel tables are installed, else by the roofline stand-in (said so).
`--engine sglang` runs SGLang's scheduler (prefill-first, policy.py) with SGLang's constants.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.perf.engine import Engine, engine_facts
from trilemma.optimizer.serving import cluster, requests, simulating, toy
from trilemma.optimizer.serving.steptable import StepTable

if TYPE_CHECKING:
    from trilemma.optimizer.perf.steps import StepModel

MODEL = "meta-llama/Llama-3.1-8B"
GPU = "h100_sxm"


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    label: str
    requests: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


def step_model(engine: Engine = Engine.VLLM) -> tuple[StepModel | toy.RooflineStepModel, str]:
    """The calibrated step model if its kernel tables load, else the roofline stand-in."""
    try:
        from trilemma.optimizer.perf import estimate
        return (estimate.step_model(estimate.resolve(model=MODEL, gpu=GPU, engine=engine.value)),
                "calibrated")
    except (AttributeError, ImportError, FileNotFoundError, KeyError) as e:
        sm = toy.RooflineStepModel(models.load_model(MODEL), gpus.get_gpu(GPU),
                                   engine_facts(engine))
        return sm, f"roofline stand-in ({type(e).__name__}: calibrated kernels unavailable)"


def _best(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def bench(*, requests_n: int = 2000, prompt_tokens: float = 1000.0, output_tokens: float = 200.0,
          max_num_seqs: int = 64, slow_requests: int = 200, repeats: int = 3,
          seed: int = 0, server: Engine = Engine.VLLM) -> tuple[list[BenchResult], str]:
    sm, source = step_model(server)
    engine = cluster.engine_config(sm, max_num_seqs=max_num_seqs)
    endpoint = cluster.Cluster(pool=cluster.Pool(engine=engine))
    out: list[BenchResult] = []
    for label, arrivals in (("closed loop C=64", requests.ClosedLoop(concurrency=64)),
                            ("Poisson 12 req/s", requests.Poisson(rate_per_s=12.0))):
        def workload(n: int, arrivals: requests.Arrivals = arrivals) -> requests.RequestStream:
            return requests.sample_requests(
                np.random.default_rng(seed), requests=n,
                prompt_tokens=requests.Lognormal(mean=prompt_tokens, p90=1.6 * prompt_tokens),
                output_tokens=requests.Lognormal(mean=output_tokens, p90=1.6 * output_tokens),
                arrivals=arrivals)
        full, short = workload(requests_n), workload(slow_requests)

        def run(w: requests.RequestStream, method: simulating.Method,
                tables: dict[cluster.EngineConfig, StepTable] | None = None) -> None:
            simulating.simulate(endpoint, w, sm, np.random.default_rng(seed), method=method,
                              tables=tables)

        shared: dict[cluster.EngineConfig, StepTable] = {}
        run(full, simulating.Method.FAST, shared)
        cases = (("fast, fresh step table", full, simulating.Method.FAST, None),
                 ("fast, shared step table", full, simulating.Method.FAST, shared),
                 ("exact (fast engine, direct calls)", short, simulating.Method.EXACT, None),
                 ("reference", short, simulating.Method.REFERENCE, None))
        for name, w, method, tables in cases:
            seconds = _best(functools.partial(run, w, method, tables), repeats)
            out.append(BenchResult(label=f"{label}: {name}", requests=len(w), seconds=seconds))
    return out, source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", choices=[e.value for e in Engine], default="vllm")
    args = parser.parse_args(argv)
    results, source = bench(requests_n=args.requests, repeats=args.repeats,
                            server=Engine(args.engine))
    print(f"step model: {source}; {args.engine}; ISL ~1000, OSL ~200, one replica, "
          "max_num_seqs 64")
    for r in results:
        print(f"{r.label:<60} {r.requests:>6} requests  {r.requests_per_s:>10,.0f} req/s")


if __name__ == "__main__":
    main()
