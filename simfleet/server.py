"""The sim-server: an OpenAI-compatible HTTP front end over one simulated replica.

Stands in for a `vllm serve` process: POST /v1/completions and /v1/chat/completions
(streaming as server-sent events, or one JSON body), GET /v1/models, /health, /version and
/metrics (vLLM's metric names, vllm_metrics.py). Requests are parsed by prompts.py, timed by
the replica's schedulers (scheduling.py) and answered with filler text as their tokens come
out of the engine, so clients measure TTFT and inter-token gaps as they would against vLLM.

Every request runs to its `max_tokens` (default 16): there is no end-of-sequence token, so
vLLM's `ignore_eos` changes nothing and `min_tokens` is always met; finish_reason is
"length". A client that disconnects aborts its request, which then frees its KV blocks and
is not recorded in the metrics.

Shutdown (`shutdown`, what the CLI does on SIGTERM or SIGINT) is vLLM's API server's: with
`shutdown_timeout_s` 0, vLLM's default and its only behaviour before v0.18, the listener
closes (new connections are refused) and the requests in flight are aborted, their
connections closed without an answer. With a positive timeout (vLLM >= 0.18's
`--shutdown-timeout`, vllm-project/vllm#34730), every request but /live and /metrics is
answered 503 (vLLM's ServiceUnavailableMiddleware, /health included) while the requests in
flight finish, for at most that many wall-clock seconds (not scaled by time_scale); then the
same stop. Either way no request in flight survives the stop, so a pod must drain before
SIGTERM (optimizer/render/drain.py) unless the engine drains itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import metadata
from typing import Any, TypedDict

from aiohttp import web

from trilemma.optimizer.serving.blockpool import block_hashes
from trilemma.simfleet import prompts
from trilemma.simfleet.engine_model import EngineModel
from trilemma.simfleet.prompts import ApiError, Prompt
from trilemma.simfleet.scheduling import FINISHED_REASON, Replica, SimRequest
from trilemma.simfleet.vllm_metrics import EngineMetrics

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# On stop, requests in flight get this long (s) to finish before their handlers are cancelled.
SHUTDOWN_S = 2.0
# Paths vLLM keeps answering while it drains (ServiceUnavailableMiddleware's _EXEMPT_PATHS).
_DRAIN_EXEMPT = frozenset({"/live", "/metrics"})
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})
_DRAIN_POLL_S = 0.01


def _version() -> str:
    try:
        return metadata.version("trilemma")
    except metadata.PackageNotFoundError:
        return "unknown"


class SimServer:
    """One simulated replica of `model`'s configuration behind an aiohttp application.

    served_model_name: the name clients send as `model` (default: the config's model id).
    seed: fixes the filler text and the speculative acceptance draws.
    time_scale: multiplies every step and the request overhead (0.1 runs ten times faster);
        all times the server reports are measured, hence scaled too.
    shutdown_timeout_s: vLLM's --shutdown-timeout, the longest `shutdown` drains (0: abort).
    """

    def __init__(self, model: EngineModel, *, served_model_name: str | None = None,
                 seed: int = 0, time_scale: float = 1.0,
                 shutdown_timeout_s: float = 0.0) -> None:
        self.model = model
        self.served_model_name = served_model_name or model.config.model
        self.seed = seed
        self.metrics = EngineMetrics(model_name=self.served_model_name,
                                     engine=model.config.engine,
                                     max_model_len=model.max_model_len)
        self.replica = Replica(model, self.metrics, seed=seed, time_scale=time_scale)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._draining = False
        self._in_flight: set[asyncio.Task[Any]] = set()
        self.app = web.Application(middlewares=[self._count_http,
                                                self._reject_while_draining])
        self.app.add_routes([
            web.post("/v1/completions", self._completions),
            web.post("/v1/chat/completions", self._chat_completions),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
            web.get("/version", self._version),
            web.get("/metrics", self._metrics),
        ])
        self._runner: web.AppRunner | None = None
        self._requests = 0
        self.url = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: an ephemeral port); returns the base URL."""
        self.replica.start()
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.replica.stop()

    async def shutdown(self) -> None:
        """SIGTERM, as vLLM's API server handles it (module docstring): drain for up to
        shutdown_timeout_s, answering 503 meanwhile, then stop and abort what is left."""
        self._draining = True
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout_s
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        for task in list(self._in_flight):
            task.cancel()  # vLLM exits with them unanswered: their connections just close
        await self.stop()

    @web.middleware
    async def _reject_while_draining(self, request: web.Request,
                                     handler: Any) -> web.StreamResponse:
        if self._draining and request.path not in _DRAIN_EXEMPT:
            return web.json_response(
                {"error": "Server is unavailable. Please try again later."}, status=503)
        response: web.StreamResponse = await handler(request)
        return response

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0

    # ---- handlers ----------------------------------------------------------------------------

    @web.middleware
    async def _count_http(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # The generation routes' answers by status, as vLLM's instrumented server counts them:
        # how refusals (a prompt past max_model_len is a 400) reach Prometheus.
        response: web.StreamResponse = await handler(request)
        if request.path in GENERATION_ROUTES:
            self.metrics.http_request(request.path, request.method, response.status)
        return response

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                raise ApiError(400, "the request body is not JSON") from None
            prompt = prompts.parse(body, chat=chat, served_model=self.served_model_name,
                                   max_model_len=self.model.max_model_len)
            self._check_fits(prompt)
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        self._requests += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.seed}-{self._requests}"
        req = SimRequest(prompt_tokens=len(prompt.tokens),
                         block_hashes=block_hashes(prompt.tokens, self.model.block_size),
                         max_tokens=prompt.max_tokens,
                         arrival=asyncio.get_running_loop().time())
        self.replica.submit(req)
        reply = _Reply(rid=rid, model=self.served_model_name, chat=chat,
                       start=prompts.first_filler(self.seed, prompt.tokens))
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs every handler in a task of its own
        self._in_flight.add(task)
        try:
            if prompt.stream:
                return await self._stream(request, req, prompt, reply)
            return await self._whole(req, reply)
        except ConnectionResetError:
            # The client went away mid-stream; its request is aborted below.
            return web.Response(status=499)
        finally:
            self._in_flight.discard(task)
            if not req.finished:
                self.replica.abort(req)

    def _check_fits(self, prompt: Prompt) -> None:
        # A request larger than an engine's whole KV cache would be preempted forever.
        tokens = len(prompt.tokens) + prompt.max_tokens + self.model.tokens_per_decode
        if -(-tokens // self.model.block_size) > self.model.kv_blocks:
            raise ApiError(400, f"the request needs {tokens} tokens of KV cache; an engine "
                                f"holds {self.model.kv_blocks * self.model.block_size}",
                           param="max_tokens")

    async def _whole(self, req: SimRequest, reply: _Reply) -> web.Response:
        pieces = []
        while (n := await req.events.get()) is not None:
            pieces.append(reply.text(n))
        return web.json_response(reply.whole("".join(pieces), _usage(req)))

    async def _stream(self, request: web.Request, req: SimRequest, prompt: Prompt,
                      reply: _Reply) -> web.StreamResponse:
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        if reply.chat:  # the role comes first, in a chunk of its own (as vLLM sends it)
            await _send(resp, reply.chunk({"role": "assistant", "content": ""}, None))
        sent = 0
        while (n := await req.events.get()) is not None:
            sent += n
            done = FINISHED_REASON if sent >= req.max_tokens else None
            text = reply.text(n)
            await _send(resp, reply.chunk({"content": text} if reply.chat else text, done))
        if prompt.include_usage:
            await _send(resp, reply.usage_chunk(_usage(req)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": self.model.config.engine, "root": self.model.config.model,
            "parent": None, "max_model_len": self.model.max_model_len}]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": f"trilemma-sim {_version()}",
                                  "engine": self.model.config.engine})

    async def _metrics(self, _: web.Request) -> web.Response:
        body, content_type = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})


class CachedTokens(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    """OpenAI's `usage` object, with vLLM's prompt cache hits."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


def _usage(req: SimRequest) -> Usage:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.generated,
            "total_tokens": req.prompt_tokens + req.generated,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


async def _send(resp: web.StreamResponse, doc: dict[str, Any]) -> None:
    await resp.write(b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n")


class _Reply:
    """OpenAI's response shapes for one request (completion or chat, whole or chunked)."""

    def __init__(self, *, rid: str, model: str, chat: bool, start: int) -> None:
        self.rid = rid
        self.model = model
        self.chat = chat
        self.created = int(time.time())
        self._next = start  # position in the filler list

    def text(self, tokens: int) -> str:
        out = prompts.filler_text(self._next, tokens)
        self._next += tokens
        return out

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, piece: str | dict[str, str], finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": piece, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}

    def whole(self, text: str, usage: Usage) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": text},
                                      "logprobs": None, "finish_reason": FINISHED_REASON}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISHED_REASON}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}
