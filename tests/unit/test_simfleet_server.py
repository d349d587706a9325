"""The sim-server: OpenAI shapes, token counts, vLLM metrics, timing against the perf model,
the scheduler (chunking, preemption, prefix cache, speculation) and vLLM flag parsing."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trilemma.optimizer import catalog, render
from trilemma.optimizer.catalog import KvDtype, QuantRecipe, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import estimate as perf_estimate
from trilemma.optimizer.search.configs import Mode, ServingConfig, WorkerConfig
from trilemma.optimizer.serving.blockpool import BlockPool, block_hashes
from trilemma.simfleet import cli_server, engine_flags, prompts
from trilemma.simfleet.engine_model import EngineModel
from trilemma.simfleet.scheduling import Engine, SimRequest
from trilemma.simfleet.server import SimServer

LLAMA = ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(gpu="h100_sxm"))
EAGLE = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(
    gpu="h100_sxm", spec_method=SpecMethod.EAGLE3, spec_k=3))


@pytest.fixture(scope="module")
def llama() -> EngineModel:
    return EngineModel(LLAMA)


@asynccontextmanager
async def serving(model: EngineModel, **kw: Any) -> AsyncIterator[tuple[str, SimServer]]:
    server = SimServer(model, served_model_name="sim", **kw)
    url = await server.start()
    try:
        yield url, server
    finally:
        await server.stop()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels other than finished_reason dropped)."""
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            reason = s.labels.get("finished_reason")
            out[s.name + (f"[{reason}]" if reason else "")] = s.value
    return out


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 path: str = "/v1/completions") -> tuple[list[Any], float, float]:
    """The SSE payloads of one streamed request, its TTFT and end-to-end time (s)."""
    t0 = time.perf_counter()
    first = None
    out: list[Any] = []
    async with session.post(url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if not line.strip():
                continue
            assert line.startswith(b"data: ")
            data = line[6:].strip()
            if data == b"[DONE]":
                out.append("[DONE]")
                continue
            doc = json.loads(data)
            choice = (doc["choices"] or [{}])[0]
            if first is None and (choice.get("text") or choice.get("delta", {}).get("content")):
                first = time.perf_counter() - t0
            out.append(doc)
    assert first is not None
    return out, first, time.perf_counter() - t0


# ---- OpenAI shapes and token counts -------------------------------------------------------


async def test_completion_with_token_ids_has_openai_shape_and_exact_usage(llama):
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        resp = await s.post(url + "/v1/completions", json={
            "model": "sim", "prompt": list(range(100, 400)), "max_tokens": 7,
            "ignore_eos": True})
        doc = await resp.json()
    assert resp.status == 200
    assert doc["id"].startswith("cmpl-") and doc["object"] == "text_completion"
    assert isinstance(doc["created"], int) and doc["model"] == "sim"
    [choice] = doc["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(prompts.text_tokens(choice["text"])) == 7
    assert doc["usage"] == {"prompt_tokens": 300, "completion_tokens": 7, "total_tokens": 307,
                            "prompt_tokens_details": {"cached_tokens": 0}}


async def test_streamed_completion_sends_chunks_then_usage_then_done(llama):
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        events, _, _ = await stream(s, url, {"prompt": "Say hello, world.", "max_tokens": 5,
                                             "stream_options": {"include_usage": True}})
    *chunks, usage, done = events
    assert done == "[DONE]"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"]
               for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    assert sum(len(prompts.text_tokens(c["choices"][0]["text"])) for c in chunks) == 5
    # "Say hello, world." is 5 pieces: Say / hello / , / world / .
    assert usage["choices"] == []
    assert usage["usage"]["prompt_tokens"] == 5 and usage["usage"]["completion_tokens"] == 5


async def test_chat_completion_whole_and_streamed_have_chat_shapes(llama):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    # begin + 2 x (start, role, end, blank, end-of-turn) + "Be brief." 3 + "Hi there" 2
    # + the assistant header 4
    expected_prompt = 1 + 2 * 5 + 3 + 2 + 4
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        resp = await s.post(url + "/v1/chat/completions",
                            json={"model": "sim", "messages": messages, "max_tokens": 3})
        whole = await resp.json()
        events, _, _ = await stream(s, url, {"messages": messages, "max_completion_tokens": 3},
                                    path="/v1/chat/completions")
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    [choice] = whole["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(prompts.text_tokens(choice["message"]["content"])) == 3
    assert whole["usage"]["prompt_tokens"] == expected_prompt
    assert whole["usage"]["completion_tokens"] == 3
    *chunks, done = events
    assert done == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]  # same seed and prompt: same filler
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_bad_requests_get_openai_errors(llama):
    limit = llama.max_model_len
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        cases = [
            ({"model": "other", "prompt": "x"}, 404, "model"),
            ({"prompt": [1, 2], "max_tokens": limit}, 400, "max_tokens"),
            ({"prompt": [[1], [2]]}, 400, "prompt"),
            ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
            ({"prompt": "x", "n": 2}, 400, "n"),
        ]
        for body, status, param in cases:
            resp = await s.post(url + "/v1/completions", json=body)
            doc = await resp.json()
            assert resp.status == status, body
            assert doc["error"]["param"] == param and doc["error"]["code"] == status
            assert doc["error"]["message"]


async def test_refusals_are_counted_by_status_class_as_vllms_server_does(llama):
    # A prompt past max_model_len is a 400 that reaches no engine metric: only the HTTP
    # counter (vLLM's prometheus-fastapi-instrumentator) shows it, as status "4xx".
    limit = llama.max_model_len
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        too_long = await s.post(url + "/v1/completions",
                                json={"prompt": list(range(limit + 1)), "max_tokens": 1})
        assert too_long.status == 400
        await stream(s, url, {"prompt": [1, 2, 3], "max_tokens": 2})
        await s.post(url + "/v1/chat/completions", json={"model": "sim", "messages": []})
        async with s.get(url + "/metrics") as resp:
            text = await resp.text()
        m = await metrics(s, url)
    counted = {(x.labels["handler"], x.labels["status"]): x.value
               for f in text_string_to_metric_families(text) if f.name == "http_requests"
               for x in f.samples if x.name == "http_requests_total"}
    assert counted == {("/v1/completions", "4xx"): 1, ("/v1/completions", "2xx"): 1,
                       ("/v1/chat/completions", "4xx"): 1}
    # The refusals finished no request: only the served one is in vLLM's own counter.
    assert sum(v for k, v in m.items() if k.startswith("vllm:request_success_total")) == 1


async def test_models_health_and_version(llama):
    async with serving(llama) as (url, _), aiohttp.ClientSession() as s:
        models = await (await s.get(url + "/v1/models")).json()
        health = await s.get(url + "/health")
        version = await (await s.get(url + "/version")).json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "sim"
    assert models["data"][0]["max_model_len"] == llama.max_model_len
    assert health.status == 200
    assert version["version"].startswith("trilemma-sim") and version["engine"] == "vllm"


async def test_metrics_use_vllm_names_and_count_what_was_sent(llama):
    sent_prompt = [50, 120, 700]
    sent_output = [3, 9, 4]
    async with serving(llama, time_scale=0.05) as (url, _), aiohttp.ClientSession() as s:
        for p, o in zip(sent_prompt, sent_output, strict=True):
            await stream(s, url, {"prompt": list(range(1000, 1000 + p)), "max_tokens": o,
                                  "ignore_eos": True})
        m = await metrics(s, url)
    assert m["vllm:prompt_tokens_total"] == sum(sent_prompt)
    assert m["vllm:generation_tokens_total"] == sum(sent_output)
    assert m["vllm:request_success_total[length]"] == 3
    assert m["vllm:time_to_first_token_seconds_count"] == 3
    assert m["vllm:e2e_request_latency_seconds_count"] == 3
    assert m["vllm:inter_token_latency_seconds_count"] == sum(sent_output) - 3
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


async def test_client_that_disconnects_aborts_its_request(llama):
    async with serving(llama, time_scale=0.1) as (url, server), aiohttp.ClientSession() as s:
        resp = await s.post(url + "/v1/completions", json={
            "prompt": list(range(500)), "max_tokens": 2000, "stream": True})
        await resp.content.readline()  # the first token is out: the request is running
        assert sum(len(e.running) for e in server.replica.engines) == 1
        resp.close()
        for _ in range(100):
            if not any(e.running or e.waiting for e in server.replica.engines):
                break
            await asyncio.sleep(0.02)
        m = await metrics(s, url)
    engine = server.replica.engines[0]
    assert not engine.running and engine.pool.usage == 0.0
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:request_success_total[length]"] == 0  # not recorded as served


async def test_shutdown_with_a_timeout_answers_503_while_requests_in_flight_finish(llama):
    """vLLM >= 0.18 with --shutdown-timeout: /metrics still answers, everything else is 503."""
    server = SimServer(llama, served_model_name="sim", time_scale=0.1, shutdown_timeout_s=30)
    url = await server.start()
    async with aiohttp.ClientSession() as s:
        body = {"prompt": list(range(100)), "max_tokens": 400}
        in_flight = asyncio.create_task(s.post(url + "/v1/completions", json=body))
        while not any(e.running for e in server.replica.engines):
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.05)
        assert not stopping.done()
        late = await s.post(url + "/v1/completions", json=body)
        assert late.status == 503
        assert (await s.get(url + "/health")).status == 503
        assert (await s.get(url + "/metrics")).status == 200
        finished = await in_flight
        assert finished.status == 200
        assert (await finished.json())["usage"]["completion_tokens"] == 400
        await asyncio.wait_for(stopping, 10)
        with pytest.raises(aiohttp.ClientConnectionError):  # the listener is closed
            await s.get(url + "/health")


async def test_shutdown_without_a_timeout_aborts_the_requests_in_flight(llama):
    """vLLM's default (and its only behaviour before 0.18): in-flight requests are lost."""
    server = SimServer(llama, served_model_name="sim", time_scale=0.1)
    url = await server.start()
    async with aiohttp.ClientSession() as s:
        in_flight = asyncio.create_task(s.post(url + "/v1/completions", json={
            "prompt": list(range(100)), "max_tokens": 400}))
        while not any(e.running for e in server.replica.engines):
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.shutdown(), 5)
        with pytest.raises(aiohttp.ClientError):
            await in_flight


# ---- timing --------------------------------------------------------------------------------


async def test_unloaded_request_takes_the_perf_models_prefill_and_decode_steps(llama):
    """Tolerance: the step table interpolates the perf model within ~1% (serving's own
    tests); steps are slept against a deadline so timer lateness does not add up and only the
    last wake-up (~1 ms) plus loopback HTTP (~1 ms) come on top. 5% + 10 ms leaves room for
    a busy shared machine; a missing or doubled step (7 ms) or a wrong prefill (45 ms) fails."""
    prompt, output = 2000, 16
    cfg = llama.perf_config
    prefill = perf_estimate.prefill_ms(cfg, batch=1, prompt_tokens=prompt)
    decodes = sum(perf_estimate.decode_step_ms(cfg, batch=1, kv_len=prompt + i)
                  for i in range(1, output))
    overhead = llama.request_overhead_ms
    async with serving(llama, time_scale=1.0) as (url, _), aiohttp.ClientSession() as s:
        await stream(s, url, {"prompt": [7] * 16, "max_tokens": 2})  # warm the connection
        _, ttft, e2e = await stream(s, url, {"prompt": list(range(prompt)),
                                             "max_tokens": output})
    for measured, predicted in ((ttft, overhead + prefill),
                                (e2e, overhead + prefill + decodes)):
        predicted /= 1e3
        assert 0.98 * predicted <= measured <= 1.05 * predicted + 0.010, (measured, predicted)


async def test_ttft_grows_with_prompt_length(llama):
    async with serving(llama, time_scale=0.5) as (url, _), aiohttp.ClientSession() as s:
        ttfts = [(await stream(s, url, {"prompt": list(range(n)), "max_tokens": 1}))[1]
                 for n in (256, 4000, 16000)]
    assert ttfts[0] < ttfts[1] < ttfts[2]
    # 16k tokens take two chunks of the 8192-token budget: far more than one short prompt.
    assert ttfts[2] > ttfts[0] + 0.5 * 0.1


async def test_ttft_grows_with_load_as_prefills_queue(llama):
    async with serving(llama, time_scale=0.3, seed=0) as (url, _), \
            aiohttp.ClientSession() as s:
        alone = (await stream(s, url, {"prompt": list(range(6000)), "max_tokens": 2}))[1]
        # Eight 6000-token prompts at once: one budget of 8192 tokens per step, so they
        # prefill about one step apart and the last waits for the ones before it.
        burst = await asyncio.gather(*(
            stream(s, url, {"prompt": [i + 1] * 6000, "max_tokens": 2}) for i in range(8)))
    ttfts = sorted(t for _, t, _ in burst)
    # 48k prompt tokens over 8192-token steps: the last first token comes ~6 steps in.
    assert ttfts[-1] > 4 * alone
    assert ttfts[0] < ttfts[-1] / 2  # a queue, not a uniform slowdown


async def test_cached_prefix_cuts_ttft_and_is_reported(llama):
    shared = list(range(5000, 9000))  # 4000 tokens = 250 blocks
    async with serving(llama, time_scale=0.5) as (url, _), aiohttp.ClientSession() as s:
        cold, cold_ttft, _ = await stream(s, url, {
            "prompt": [*shared, 1, 2, 3], "max_tokens": 2,
            "stream_options": {"include_usage": True}})
        warm, warm_ttft, _ = await stream(s, url, {
            "prompt": [*shared, 4, 5, 6], "max_tokens": 2,
            "stream_options": {"include_usage": True}})
        m = await metrics(s, url)
    assert cold[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 4000
    assert m["vllm:prefix_cache_hits_total"] == 4000
    assert m["vllm:prefix_cache_queries_total"] == 2 * 4003
    # Overhead (18 ms scaled) is the same for both; the prefill of 4000 tokens is not.
    assert warm_ttft < cold_ttft - 0.5 * 0.05


# ---- the scheduler, on a virtual clock -----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.finished: list[dict[str, Any]] = []
        self.spec = np.zeros(3, dtype=np.int64)
        self.loads: list[dict[str, Any]] = []

    def request_finished(self, **kw: Any) -> None:
        self.finished.append(kw)

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        self.spec += (drafts, draft_tokens, accepted_tokens)

    def set_load(self, **kw: Any) -> None:
        self.loads.append(kw)


def request(tokens: list[int], max_tokens: int, block: int = 16) -> SimRequest:
    return SimRequest(prompt_tokens=len(tokens), block_hashes=block_hashes(tokens, block),
                      max_tokens=max_tokens, arrival=0.0)


def drive(engine: Engine, reqs: list[SimRequest],
          each: Callable[[Any, float], None] | None = None) -> float:
    """Run the engine to idle on a virtual clock (no sleeping); the end time (s)."""
    now = 0.0
    for r in reqs:
        engine.submit(r, now)
    while (step := engine.plan(now)) is not None:
        if each:
            each(step, now)
        now += engine.duration_s(step)
        engine.complete(step, now)
    return now


def test_long_prompt_prefills_in_budget_sized_chunks(llama):
    engine = Engine(llama, Recorder(), rng=np.random.default_rng(0))
    chunks: list[int] = []
    r = request(list(range(20_000)), 2)
    drive(engine, [r], lambda step, _: chunks.extend(n for s, n in step.work if not s.decoding))
    assert chunks == [8192, 8192, 20_000 - 2 * 8192]
    assert r.generated == 2 and len(r.emissions) == 2


def test_small_kv_cache_preempts_yet_every_request_finishes_exactly():
    model = EngineModel(LLAMA, kv_blocks=40, request_overhead_ms=0.0)  # 640 tokens
    sink = Recorder()
    engine = Engine(model, sink, rng=np.random.default_rng(0))
    reqs = [request(list(range(i * 1000, i * 1000 + 200)), 100) for i in range(4)]
    drive(engine, reqs)
    assert sum(r.preemptions for r in reqs) > 0
    assert all(r.finished and r.generated == 100 for r in reqs)
    assert sorted(f["output_tokens"] for f in sink.finished) == [100] * 4
    # Nothing leaks: every block is free or an idle cached prefix block.
    assert engine.pool.free + engine.pool.evictable == engine.pool.total
    assert engine.pool.usage == 0.0


def test_prefix_cache_serves_shared_blocks_and_evicts_prefix_tails_first():
    pool = BlockPool(6)
    a = block_hashes(list(range(64)), 16)  # 4 blocks
    assert pool.allocate(4)
    for h in a:
        assert pool.register(h)
    pool.release(a)  # a finished: its blocks stay cached, idle
    assert pool.lookup(a) == 4 and pool.usage == 0.0
    assert pool.allocate(4)  # 2 free + 2 evicted, the tail of a first
    assert pool.lookup(a) == 2 and pool.evictions == 2
    assert not pool.allocate(3)  # 2 idle left: refused, nothing changed
    assert pool.lookup(a) == 2
    pool.acquire(a[:2])
    assert not pool.allocate(1)  # pinned blocks are not evicted


def test_concurrent_identical_prompts_share_registered_blocks(llama):
    sink = Recorder()
    engine = Engine(llama, sink, rng=np.random.default_rng(0))
    tokens = list(range(320))  # 20 blocks
    first, second = request(tokens, 2), request(tokens, 2)
    drive(engine, [first, second])
    later = request(tokens, 2)
    drive(engine, [later])
    assert first.cached_tokens == second.cached_tokens == 0  # prefilled in the same step
    assert later.cached_tokens == 19 * 16  # the last token is always recomputed
    assert engine.pool.cached == 20


def test_speculative_decoding_emits_up_to_k_plus_one_tokens_per_step():
    model = EngineModel(EAGLE, request_overhead_ms=0.0)
    sink = Recorder()
    engine = Engine(model, sink, rng=np.random.default_rng(3))
    r = request(list(range(500)), 200)
    drive(engine, [r])
    steps = len(r.emissions) - 1  # verify steps after the prefill's token
    drafts, draft_tokens, accepted = sink.spec.tolist()
    assert r.generated == 200
    assert drafts == steps and draft_tokens == 3 * steps
    assert accepted == 199 - steps  # each step yields 1 + its accepted drafts
    # Tokens per verify step follow the catalog's acceptance model (~80 steps: the mean's
    # sampling error is about 5%).
    a = float(catalog.acceptance_rate(SpecMethod.EAGLE3, 0.5))
    expected = float(catalog.expected_tokens_per_step(a, 3))
    assert 199 / steps == pytest.approx(expected, rel=0.15)
    assert len(sink.finished[0]["inter_token_s"]) == 199


# ---- vLLM flags ----------------------------------------------------------------------------


ROUND_TRIP = [
    ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(
        gpu="h100_sxm", tp=2, quant=QuantRecipe.FP8, kv_dtype=KvDtype.FP8,
        spec_method=SpecMethod.EAGLE3, spec_k=3,
        max_num_seqs=128, max_num_batched_tokens=4096, max_model_len=8192)),
    ServingConfig(model="meta-llama/Llama-3.1-70B", worker=WorkerConfig(
        gpu="h100_sxm", tp=4, spec_method=SpecMethod.DRAFT, spec_k=4,
        draft_model="meta-llama/Llama-3.1-8B", prefix_caching=False,
        gpu_memory_utilization=0.85)),
    ServingConfig(model="Qwen/Qwen3-30B-A3B", worker=WorkerConfig(
        gpu="h100_sxm", dp=2, ep=True, spec_method=SpecMethod.NGRAM, spec_k=4)),
    ServingConfig(model="nvidia/Llama-3.1-70B-Instruct-FP8", worker=WorkerConfig(
        gpu="h200_sxm", tp=2, pp=2, quant=QuantRecipe.FP8)),
    ServingConfig(model="deepseek-ai/DeepSeek-V3", worker=WorkerConfig(
        gpu="h200_sxm", tp=8, ep=True, quant=QuantRecipe.FP8, spec_method=SpecMethod.MTP,
        spec_k=1)),
    ServingConfig(model="deepseek-ai/DeepSeek-V3", worker=WorkerConfig(
        gpu="h200_sxm", tp=8, quant=QuantRecipe.FP8, cp=4)),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: c.worker.summary())
def test_rendered_vllm_flags_parse_back_to_the_same_worker(config):
    argv = render.engine_args(config, "vllm")
    parsed = engine_flags.parse_vllm_args(argv, gpu=config.worker.gpu)
    assert parsed.config.model == config.model
    assert parsed.config.worker == config.worker
    assert parsed.port == 8000 and parsed.ignored == ()


def test_unknown_vllm_flags_are_listed_and_defaults_are_vllms():
    parsed = engine_flags.parse_vllm_args(
        ["vllm", "serve", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--dtype", "auto",
         "--trust-remote-code", "--served-model-name", "chat", "--kv-cache-dtype", "auto"],
        gpu="l40s")
    w = parsed.config.worker
    assert parsed.ignored == ("--dtype", "auto", "--trust-remote-code")
    assert parsed.served_model_name == "chat"
    # vLLM's own defaults for a < 70 GiB GPU, not WorkerConfig's.
    assert (w.max_num_seqs, w.max_num_batched_tokens, w.prefix_caching) == (256, 2048, True)
    assert (w.quant, w.kv_dtype, w.spec_method) == ("bf16", "bf16", "none")
    assert parsed.shutdown_timeout is None


def test_vllms_shutdown_timeout_flag_is_read_back():
    parsed = engine_flags.parse_vllm_args(
        ["meta-llama/Llama-3.1-8B-Instruct", "--shutdown-timeout", "30"], gpu="l40s")
    assert parsed.shutdown_timeout == 30.0 and parsed.ignored == ()


@pytest.mark.parametrize("argv, field", [
    (["--tensor-parallel-size", "2"], "model"),
    (["meta-llama/Llama-3.1-8B", "--speculative-config", "{not json"], "--speculative-config"),
    (["meta-llama/Llama-3.1-8B", "--speculative-config", '{"method": "medusa", '
      '"num_speculative_tokens": 2}'], "--speculative-config"),
    (["meta-llama/Llama-3.1-8B", "--kv-cache-dtype", "int4"], "--kv-cache-dtype"),
    (["meta-llama/Llama-3.1-8B", "--max-num-seqs", "many"], "engine_args"),
])
def test_bad_vllm_flags_name_the_field(argv, field):
    with pytest.raises(InputError) as err:
        engine_flags.parse_vllm_args(argv, gpu="h100_sxm")
    assert err.value.field == field


def test_explicit_max_model_len_beyond_the_kv_cache_is_refused_like_vllm():
    config = ServingConfig(model="meta-llama/Llama-3.1-8B", worker=WorkerConfig(
        gpu="h100_sxm", max_model_len=131072))
    with pytest.raises(InputError) as err:
        EngineModel(config, kv_blocks=1000)
    assert err.value.field == "max_model_len"
    capped = EngineModel(LLAMA, kv_blocks=1000)
    assert capped.max_model_len == 16_000 and capped.notes


def test_plan_file_serves_one_aggregated_replica_of_its_recommendation(tmp_path, capsys):
    decode = WorkerConfig(gpu="h100_sxm", tp=2, max_num_seqs=64)
    config = ServingConfig(model="meta-llama/Llama-3.1-70B", mode=Mode.DISAGGREGATED,
                           worker=decode, replicas=3,
                           prefill=WorkerConfig(gpu="h100_sxm", tp=4), prefill_replicas=2)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"recommended": {"config": config.to_dict()}}))
    served = cli_server._from_plan(argparse.Namespace(plan=plan, gpu="h200_sxm", engine=None))
    assert served.worker == dataclasses.replace(decode, gpu="h200_sxm")
    assert (served.mode, served.replicas, served.prefill) == (Mode.AGGREGATED, 1, None)
    assert "disaggregated" in capsys.readouterr().err


def test_the_old_predictability_flag_still_sets_output_predictability():
    parser = argparse.ArgumentParser()
    cli_server.add_arguments(parser)
    assert parser.parse_args([]).output_predictability == 0.5
    assert parser.parse_args(["--predictability", "0.8"]).output_predictability == 0.8
    assert parser.parse_args(["--output-predictability", "0.2"]).output_predictability == 0.2
    assert "--predictability" not in parser.format_help()
