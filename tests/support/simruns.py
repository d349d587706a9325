"""The simulator's fast path against its reference: one assertion for every scheduler test."""

import numpy as np

from trilemma.optimizer import serving

# What a run records per request and per engine; the two paths must agree on all of it.
FIELDS = ("arrival_ms", "first_scheduled_ms", "first_token_ms", "finish_ms", "preemptions",
          "cached_tokens", "engine", "occupancy_ms", "occupancy", "engine_steps")


def assert_fast_matches_reference(cluster: serving.Cluster, workload: serving.RequestStream,
                                  perf_model: serving.StepCost, seed: int = 11) -> None:
    """The fast engine (one perf-model call per step) takes the reference engine's every
    decision: every recorded time and count identical."""
    ref = serving.simulate(cluster, workload, perf_model, np.random.default_rng(seed),
                           method=serving.Method.REFERENCE)
    fast = serving.simulate(cluster, workload, perf_model, np.random.default_rng(seed),
                            method=serving.Method.EXACT)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(fast, field), getattr(ref, field), err_msg=field)
