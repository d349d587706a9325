"""The load generator: what it plans (seeded, realized shapes), phases files, and what it
reports against what the sim-servers counted."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig
from trilemma.simfleet import loadgen
from trilemma.simfleet.engine_model import EngineModel
from trilemma.simfleet.fleet import SimFleet
from trilemma.simfleet.loadgen import Arrival, LoadStage
from trilemma.simfleet.server import SimServer

LLAMA = ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(gpu="h100_sxm"))
FAST = 0.1  # time scale of the servers: ten times faster than the modelled GPU


@pytest.fixture(scope="module")
def llama() -> EngineModel:
    return EngineModel(LLAMA)


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("finished_reason") in
            (None, "length")}


# ---- planning ------------------------------------------------------------------------------


def test_same_seed_plans_the_same_requests_and_another_seed_does_not():
    phase = LoadStage(duration_s=5, rate=10, prompt_mean=300, prompt_p90=600, output_mean=20,
                      output_p90=40, prefix_share=0.5, prefix_tokens=64, prefixes=2)
    a = loadgen.plan_open_loop(phase, 0, seed=7)
    b = loadgen.plan_open_loop(phase, 0, seed=7)
    c = loadgen.plan_open_loop(phase, 0, seed=8)
    assert a == b
    assert [p.tokens for _, p in a] != [p.tokens for _, p in c]
    assert all(0 <= t < 5 for t, _ in a)


@pytest.mark.parametrize("arrivals, cv", [(Arrival.POISSON, 1.0), (Arrival.GAMMA, 2.0),
                                          (Arrival.GAMMA, 0.5)])
def test_arrivals_realize_their_rate_and_burstiness(arrivals, cv):
    phase = LoadStage(duration_s=100, rate=100, arrivals=arrivals, cv=cv)
    t = loadgen.arrival_offsets(phase, 0, seed=1)
    gaps = np.diff(t)
    # 10,000 gaps: the CV's sampling error is a few percent even for the bursty gamma.
    assert len(t) == pytest.approx(10_000, rel=0.05 * cv)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_prefix_reuse_realizes_its_shares_with_shared_token_ids():
    phase = LoadStage(duration_s=1, prompt_mean=400, output_mean=5, prefix_share=0.4,
                      prefix_tokens=100, prefixes=3)
    contents = loadgen.Contents(phase, 0, seed=3)
    reqs = [contents.next() for _ in range(3000)]
    with_prefix = [r for r in reqs if r.prefix >= 0]
    assert len(with_prefix) / len(reqs) == pytest.approx(0.4, abs=0.03)
    assert all(r.shared_tokens == 100 and len(r.tokens) == 400 for r in with_prefix)
    by_prefix = {r.prefix: r.tokens[:100] for r in with_prefix}
    assert sorted(by_prefix) == [0, 1, 2]
    assert all(r.tokens[:100] == by_prefix[r.prefix] for r in with_prefix)
    assert len(set(by_prefix.values())) == 3
    # The next phase, even with another shape, shares the same prefixes (a warm cache).
    later = loadgen.Contents(dataclasses.replace(phase, prompt_mean=800), 1, seed=3)
    again = next(r for r in iter(later.next, None) if r.prefix >= 0)
    assert again.tokens[:100] == by_prefix[again.prefix]


def test_short_prompts_are_all_prefix():
    phase = LoadStage(duration_s=1, prompt_mean=50, output_mean=5, prefix_share=1.0,
                      prefix_tokens=80)
    r = loadgen.Contents(phase, 0, seed=0).next()
    assert r.shared_tokens == len(r.tokens) == 50


def test_phases_file_changes_only_what_it_names_and_null_resets():
    base = LoadStage(duration_s=9, rate=2, prompt_mean=1000, prompt_p90=2000, concurrency=4)
    phases = loadgen.parse_phases({"phases": [
        {"duration_s": 3, "name": "warm"},
        {"duration_s": 4, "rate": 8, "prompt_p90": None, "concurrency": None},
    ]}, base)
    assert [p.duration_s for p in phases] == [3, 4]
    assert phases[0] == dataclasses.replace(base, duration_s=3, name="warm")
    assert (phases[1].rate, phases[1].prompt_mean, phases[1].prompt_p90) == (8, 1000, None)
    assert not phases[1].closed and phases[1].label(1) == "phase 1"


@pytest.mark.parametrize("doc, field", [
    ([{"duration_s": 1, "rpm": 3}], "phases.0.rpm"),
    ({"phases": []}, "phases"),
    ([{"duration_s": 1, "prompt_p90": 10}], "phases.0.prompt_p90"),  # p90 below the mean
    ([{"duration_s": 1}, {"duration_s": 1, "prefix_share": 1.5}], "phases.1.prefix_share"),
])
def test_bad_phases_name_the_field(doc, field):
    with pytest.raises(InputError) as err:
        loadgen.parse_phases(doc, LoadStage(duration_s=1))
    assert err.value.field == field


# ---- against servers -----------------------------------------------------------------------


async def test_report_tells_the_truth_the_server_counted_and_shows_the_phase_change(llama):
    phases = [
        LoadStage(duration_s=0.8, rate=10, prompt_mean=300, prompt_p90=500, output_mean=8,
                  output_p90=14, prefix_share=0.5, prefix_tokens=128, prefixes=2),
        LoadStage(duration_s=0.8, rate=40, prompt_mean=1500, output_mean=8, prefix_share=0.5,
                  prefix_tokens=128, prefixes=2),
    ]
    server = SimServer(llama, served_model_name="sim", time_scale=FAST)
    url = await server.start()
    try:
        report = await loadgen.run_load(url, phases, seed=5)
        m = await scrape(url)
    finally:
        await server.stop()
    o = report.overall
    assert o.failed == 0 and o.completed == o.sent == len(report.requests) > 20
    assert m["vllm:request_success_total"] == o.sent
    assert m["vllm:prompt_tokens_total"] == o.prompt_tokens_total == o.server_prompt_tokens
    assert m["vllm:generation_tokens_total"] == o.output_tokens_total
    assert o.output_tokens_total == o.server_completion_tokens
    assert m["vllm:prefix_cache_hits_total"] == o.server_cached_tokens > 0
    first, second = report.phases
    assert first.sent + second.sent == o.sent
    assert second.prompt_tokens.mean == 1500 and first.prompt_tokens.mean < 600
    assert second.rate_per_s > 2 * first.rate_per_s
    shared = sum(r.shared_tokens for r in report.requests)
    assert o.prefix_token_share == pytest.approx(shared / o.prompt_tokens_total)
    assert o.ttft_ms.p50 is not None and o.itl_ms.n == o.output_tokens_total - o.sent
    doc = report.to_dict()
    assert doc["phases"][1]["parameters"]["rate"] == 40 and "overall" in doc
    assert "TTFT ms p50/p90/p99" in report.table()


async def test_same_seed_sends_the_same_request_sequence(llama):
    phases = [LoadStage(duration_s=0.5, rate=20, prompt_mean=200, prompt_p90=300, output_mean=4,
                        prefix_share=0.3, prefix_tokens=32)]
    server = SimServer(llama, served_model_name="sim", time_scale=FAST)
    url = await server.start()
    try:
        runs = [await loadgen.run_load(url, phases, seed=s, model="sim") for s in (1, 1, 2)]
    finally:
        await server.stop()
    keys = [[r.key() for r in run.requests] for run in runs]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    # Sent on the same schedule, to timer precision.
    lag = [abs(a.sent_s - b.sent_s) for a, b in zip(*(r.requests for r in runs[:2]),
                                                     strict=True)]
    assert max(lag) < 0.05


async def test_closed_loop_keeps_at_most_concurrency_requests_in_flight(llama):
    phases = [LoadStage(duration_s=1.0, concurrency=3, prompt_mean=400, output_mean=20)]
    server = SimServer(llama, served_model_name="sim", time_scale=FAST)
    url = await server.start()
    try:
        report = await loadgen.run_load(url, phases, seed=0, model="sim")
    finally:
        await server.stop()
    spans = [(r.sent_s, r.sent_s + r.e2e_s) for r in report.requests if r.ok]
    assert report.overall.failed == 0 and len(spans) > 10
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    in_flight = np.cumsum([d for _, d in edges])
    assert in_flight.max() == 3
    # Busy most of the time: the users send again as soon as an answer is complete.
    busy = sum(b - a for a, b in spans)
    assert busy > 0.7 * 3 * (spans[-1][1] - spans[0][0])


async def test_fleet_serves_several_urls_round_robin():
    phases = [LoadStage(duration_s=0.6, rate=20, prompt_mean=100, output_mean=3)]
    async with SimFleet(LLAMA, replicas=2, served_model_name="sim", time_scale=FAST) as fleet:
        assert len(set(fleet.urls)) == 2
        assert all(a.startswith("127.0.0.1:") for a in fleet.addresses)
        report = await loadgen.run_load(fleet.urls, phases, seed=4)
        counts = [(await scrape(u))["vllm:request_success_total"] for u in fleet.urls]
    assert report.model == "sim"
    assert sum(counts) == report.overall.completed == report.overall.sent
    assert abs(counts[0] - counts[1]) <= 1
    assert [r.target for r in report.requests] == [i % 2 for i in range(report.overall.sent)]


async def test_stop_ends_the_running_phase_and_skips_the_rest():
    phases = [LoadStage(duration_s=30, rate=20, prompt_mean=100, output_mean=3),
              LoadStage(duration_s=30, rate=20, prompt_mean=100, output_mean=3, concurrency=2)]
    stop = asyncio.Event()
    async with SimFleet(LLAMA, served_model_name="sim", time_scale=FAST) as fleet:
        asyncio.get_running_loop().call_later(0.5, stop.set)
        report = await loadgen.run_load(fleet.urls, phases, seed=2, stop=stop)
    first, second = report.phases
    assert first.duration_s == pytest.approx(0.5, abs=0.2)
    assert first.sent > 0 and first.completed == first.sent
    assert first.rate_per_s == pytest.approx(first.sent / first.duration_s)
    assert second.sent == 0 and second.duration_s == 0
    assert report.overall.duration_s == first.duration_s


async def test_a_cancelled_run_takes_its_requests_in_flight_with_it():
    # Long answers (slowed servers): requests are in flight when the run is cancelled.
    phases = [LoadStage(duration_s=30, rate=20, prompt_mean=100, output_mean=500)]
    async with SimFleet(LLAMA, served_model_name="sim", time_scale=1.0) as fleet:
        before = asyncio.all_tasks()
        load = asyncio.create_task(loadgen.run_load(fleet.urls, phases, seed=2, model="sim"))
        await asyncio.sleep(0.5)
        # The requests, each its own task (the servers' tasks are not the run's).
        sending = {t for t in asyncio.all_tasks() - before
                   if getattr(t.get_coro(), "__qualname__", "") == "_Run.send"}
        assert sending
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        assert all(task.done() for task in sending)


async def test_unreachable_server_counts_as_failed_requests():
    phases = [LoadStage(duration_s=0.3, rate=20, prompt_mean=10, output_mean=2)]
    report = await loadgen.run_load("http://127.0.0.1:9", phases, seed=0, model="x")
    assert report.overall.sent > 0 and report.overall.completed == 0
    assert report.overall.failed == report.overall.sent
    assert all("Connect" in e for e in report.overall.errors)
