"""A new configuration rolls out beside the one serving: it is sized to the room left there.

The old configuration keeps serving until the new one is available (rollout.py), so both hold
GPUs at once. The plan is made for the pool less the other endpoints; the count deployed for
the rollout is what fits beside the serving configuration, and it grows to the plan's once the
Service has moved and the old Deployment is gone.
"""

from __future__ import annotations

import copy

from tests.operator.test_reconcile import (
    ENDPOINT,
    NS,
    POOL,
    deployments,
    make_available,
    status,
    wait_phase,
)

LONG = {"kind": "lognormal", "mean": 4000, "p90": 8000}


def _pool(count: int) -> dict:
    pool = copy.deepcopy(POOL)
    pool["spec"]["gpus"][0]["count"] = count
    return pool


def _endpoint() -> dict:
    body = copy.deepcopy(ENDPOINT)
    body["spec"]["objective"] = "min_cost"
    return body


async def _shift(api, rate: float) -> None:
    """Longer prompts at a higher rate (generation 2): a new layout needing more replicas."""
    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"metadata": {"generation": 2},
                     "spec": {"workload": {**ENDPOINT["spec"]["workload"], "promptTokens": LONG,
                                           "arrivals": {"kind": "poisson",
                                                        "requestsPerSecond": rate}}}})


async def _serving(api, rate: float, pool: int) -> tuple[str, int]:
    """An endpoint at `rate` on a pool of `pool` GPUs, Ready: its hash and GPUs held."""
    await api.create(_pool(pool))
    body = _endpoint()
    body["spec"]["workload"]["arrivals"]["requestsPerSecond"] = rate
    await api.create(body)
    first = await wait_phase(api, "Deploying")
    old = first["activeConfiguration"]["hash"]
    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{old}"))
    await wait_phase(api, "Ready")
    return old, first["allocatedGpus"]["h100_sxm"]


def _selected(api) -> str:
    return api.get("v1", "Service", NS, "chat")["spec"]["selector"]["trilemma.dev/config-hash"]


async def test_a_rollout_is_sized_to_the_room_beside_the_serving_configuration(
        api, operator_factory):
    await operator_factory()
    old, held = await _serving(api, 40.0, pool=6)
    assert held == 2

    await _shift(api, 40.0)
    rolling = await api.wait(lambda: (status(api).get("rollout") or {}).get("state")
                             == "Progressing" and status(api), what="a rollout")
    new = rolling["rollout"]["toHash"]
    scaling = rolling["scaling"]
    # The plan (made for the whole pool) and the carried-over count want more than the 4 GPUs
    # left beside the 2 still serving: the rollout starts with 4, and the pool is not overdrawn.
    assert scaling["replicas"] == 4 and scaling["layoutHash"] == new
    assert f"4 fit beside configuration {old}" in scaling["message"]
    assert rolling["allocatedGpus"] == {"h100_sxm": 6}
    assert api.get("apps/v1", "Deployment", NS, f"chat-{new}")["spec"]["replicas"] == 4
    assert _selected(api) == old

    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{new}"))
    await api.wait(lambda: [d["metadata"]["name"] for d in deployments(api)] == [f"chat-{new}"],
                   what="the old Deployment removed")
    assert _selected(api) == new
    # Alone now, the configuration grows to the plan's count in place (same Deployment).
    grown = await api.wait(
        lambda: (n := api.get("apps/v1", "Deployment", NS, f"chat-{new}")["spec"]["replicas"])
        > 4 and n, timeout=90, what="the count grown after the cutover")
    st = await api.wait(lambda: (s := status(api))["scaling"]["replicas"] == grown and s,
                        what="the status of the grown count")
    assert grown <= 6 and "heldBackBeside" not in st["scaling"]
    assert st["allocatedGpus"] == {"h100_sxm": grown}
    assert st["servingHash"] == new


async def test_with_no_room_beside_it_the_rollout_says_so_and_the_old_one_serves(
        api, operator_factory):
    await operator_factory()
    old, held = await _serving(api, 40.0, pool=2)
    assert held == 2  # the whole pool

    # A lighter load of longer prompts: a new layout that fits the pool but not beside.
    await _shift(api, 5.0)
    rolling = await api.wait(lambda: (status(api).get("rollout") or {}).get("state")
                             == "Progressing" and status(api), what="a rollout")
    scaling = rolling["scaling"]
    # Sized as if the old configuration were gone (nothing fits beside it), said in status;
    # not "held back", so nothing regrows after it.
    assert f"not one replica fits beside configuration {old} (2 h100_sxm)" in scaling["message"]
    assert "heldBackBeside" not in scaling
    assert _selected(api) == old and rolling["servingHash"] == old
