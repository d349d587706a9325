"""Discrete-event serving simulator: replicas running vLLM's or SGLang's continuous batching.

Data flow: a `RequestStream` (requests.py) and a `Cluster` (cluster.py) go into `simulate`
(simulating.py), which runs one engine per attention DP rank (engine.py, checked against the
scheduler core of scheduler.py and its KV model blockpool.py, which reference.py drives and
the sim-server runs too; each engine's scheduling policy is policy.py's), prices every step
with the perf layer's step model (steptable.py), and returns a `SimResult` (results.py).

    wl = serving.sample_requests(rng, requests=2000,
                                 prompt_tokens=serving.Lognormal(mean=1000, p90=1800),
                                 output_tokens=serving.Fixed(tokens=200),
                                 arrivals=serving.Poisson(rate_per_s=4.0))
    res = serving.simulate(serving.Cluster(pool=serving.Pool(engine=cfg)), wl, step_model, rng)
    res.summary().ttft_ms.p99
"""

from trilemma.optimizer.serving.cluster import (
    Balancer,
    Cluster,
    EngineConfig,
    KvTransfer,
    Pool,
    Speculation,
    engine_config,
    kv_transfer,
)
from trilemma.optimizer.serving.requests import (
    ClosedLoop,
    Fixed,
    Gamma,
    Histogram,
    LoadMode,
    Lognormal,
    Offline,
    Poisson,
    RequestStream,
    SharedPrefixes,
    Timestamps,
    sample_requests,
)
from trilemma.optimizer.serving.results import SimResult, Stats, Summary
from trilemma.optimizer.serving.simulating import Method, simulate
from trilemma.optimizer.serving.steptable import StepCost, StepTable

__all__ = [
    "Balancer",
    "ClosedLoop",
    "Cluster",
    "EngineConfig",
    "Fixed",
    "Gamma",
    "Histogram",
    "KvTransfer",
    "LoadMode",
    "Lognormal",
    "Method",
    "Offline",
    "Poisson",
    "Pool",
    "RequestStream",
    "SharedPrefixes",
    "SimResult",
    "Speculation",
    "Stats",
    "StepCost",
    "StepTable",
    "Summary",
    "Timestamps",
    "engine_config",
    "kv_transfer",
    "sample_requests",
    "simulate",
]
