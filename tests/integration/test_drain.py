"""No dropped requests: sim-server replicas behind a round-robin proxy, drained under load.

Each replica is a `trilemma sim-server` process started with a rendered vLLM Deployment's
argv; the proxy plays the Service (its rotation is the EndpointSlice). Removing a replica from
the rotation, running the rendered preStop command against it, then sending SIGTERM is what
Kubernetes does on a scale-down or a rollout (optimizer/render/drain.py); every request the
clients sent must complete. The controls send SIGTERM or SIGKILL without the drain and must
lose requests, so the test can fail.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from trilemma.optimizer import render
from trilemma.optimizer.catalog import QuantRecipe
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig

CONFIG = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(
    gpu="h100_sxm", quant=QuantRecipe.FP8, max_num_seqs=64, max_model_len=4096))
CLIENTS = 12
MAX_TOKENS = 200     # ~0.5 s per request at time scale 1: several in flight on each replica
PRESTOP_SLEEP_S = 0.2  # the rendered 15 s, shortened: the proxy's rotation changes at once

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_args(*, shutdown_timeout: bool) -> list[str]:
    """The rendered vLLM argv; without its --shutdown-timeout for an engine that has none
    (vLLM before 0.18, or a user's older image): SIGTERM then aborts what is in flight."""
    args = render.engine_args(CONFIG, "vllm")
    if shutdown_timeout:
        return args
    at = args.index("--shutdown-timeout")
    return args[:at] + args[at + 2:]


class Replica:
    def __init__(self, *, shutdown_timeout: bool = True) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trilemma.tools.cli", "sim-server", "--gpu", "h100_sxm",
             "--host", "127.0.0.1", "--port", str(self.port), "--",
             *_engine_args(shutdown_timeout=shutdown_timeout)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("sim-server did not become healthy")

    def pre_stop(self) -> list[str]:
        """The rendered preStop command, pointed at this replica, its sleep shortened."""
        (pod,) = [o for o in render.manifests(CONFIG, name="chat", engine="vllm")
                  if o["kind"] == "Deployment"]
        command = list(pod["spec"]["template"]["spec"]["containers"][0]
                       ["lifecycle"]["preStop"]["exec"]["command"])
        assert command[:2] == ["python3", "-c"] and command[5] == "8000"
        command[0], command[3], command[5] = sys.executable, str(PRESTOP_SLEEP_S), str(self.port)
        return command

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@dataclass
class Proxy:
    """The Service: round-robin over `rotation`; counts what it forwarded and how it ended."""

    rotation: list[str]
    outcomes: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    _turn: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self._turn += 1
        backend = self.rotation[self._turn % len(self.rotation)]
        body = await request.read()
        self.in_flight[backend] += 1
        try:
            async with self.session.post(backend + request.path, data=body, headers={
                    "Content-Type": "application/json"}) as resp:
                payload = await resp.read()
                status = resp.status
        except aiohttp.ClientError as err:
            self.outcomes[type(err).__name__] += 1
            return web.Response(status=502)
        finally:
            self.in_flight[backend] -= 1
        self.outcomes[str(status)] += 1
        if status == 200:
            self.served[backend] += 1
        return web.Response(status=status, body=payload)

    async def start(self) -> str:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()


async def _clients(url: str, stop: asyncio.Event, statuses: Counter[int]) -> None:
    async def user(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(url + "/v1/completions", json={
                    "model": CONFIG.model, "prompt": "drain me", "max_tokens": MAX_TOKENS}) as r:
                await r.read()
                statuses[r.status] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(user(session) for _ in range(CLIENTS)))


async def _terminate(replica: Replica, how: str) -> None:
    """What the kubelet does to a pod already out of the rotation."""
    if how == "prestop":
        hook = await asyncio.create_subprocess_exec(*replica.pre_stop())
        assert await hook.wait() == 0
    replica.proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    await asyncio.to_thread(replica.proc.wait, 30)


async def _run(replicas: list[Replica],
               change: Callable[[Proxy], Awaitable[None]]) -> tuple[Counter[int], Proxy]:
    """Load through the proxy over `replicas`; `change(proxy)` runs after 0.8 s of it."""
    proxy = Proxy(rotation=[r.url for r in replicas])
    url = await proxy.start()
    stop, statuses = asyncio.Event(), Counter[int]()
    load = asyncio.create_task(_clients(url, stop, statuses))
    try:
        await asyncio.sleep(0.8)
        await change(proxy)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await load
        await proxy.stop()
    return statuses, proxy


def _start(*replicas: Replica) -> None:
    for r in replicas:
        r.wait_healthy()


@pytest.mark.parametrize(("how", "shutdown_timeout", "drops"), [
    ("prestop", False, False),  # the rendered preStop alone (an engine without the flag)
    ("sigterm", True, False),   # the rendered --shutdown-timeout alone (a preStop that failed)
    ("sigterm", False, True),   # control: SIGTERM without either
    ("sigkill", True, True),    # control: the grace period ran out
])
def test_a_scale_down_under_load_completes_every_request(how, shutdown_timeout, drops):
    keep, victim = Replica(), Replica(shutdown_timeout=shutdown_timeout)
    try:
        _start(keep, victim)
        busy_at_removal = []

        async def scale_down(proxy: Proxy) -> None:
            proxy.rotation.remove(victim.url)  # the endpoint controller's part
            busy_at_removal.append(proxy.in_flight[victim.url])
            await _terminate(victim, how)

        statuses, proxy = asyncio.run(_run([keep, victim], scale_down))
    finally:
        keep.close()
        victim.close()
    assert busy_at_removal[0] > 0, "nothing was in flight: the test would prove nothing"
    assert proxy.served[keep.url] > 0
    assert sum(statuses.values()) == sum(proxy.outcomes.values())  # every request answered
    failed = sum(n for status, n in statuses.items() if status != 200)
    if drops:
        assert failed > 0, proxy.outcomes
    else:
        assert failed == 0, proxy.outcomes
        assert proxy.served[victim.url] >= busy_at_removal[0]  # they finished there
        assert victim.proc.returncode == 0


def test_a_rollout_under_load_moves_traffic_then_drains_the_old_replicas():
    old = [Replica(), Replica()]
    new = Replica()
    try:
        _start(*old, new)

        async def rollout(proxy: Proxy) -> None:
            proxy.rotation[:] = [new.url]  # the Service selects the new configuration hash
            await asyncio.gather(*(_terminate(r, "prestop") for r in old))

        statuses, proxy = asyncio.run(_run(old, rollout))
    finally:
        for r in (*old, new):
            r.close()
    assert set(statuses) == {200}, proxy.outcomes
    assert all(proxy.served[r.url] > 0 for r in (*old, new))
    assert all(r.proc.returncode == 0 for r in old)
