"""A real Prometheus server on a loopback port, and an exporter for it to scrape.

`PrometheusServer` runs the `prometheus` binary (install it with .ci/install-prometheus) with
a fresh TSDB in a temporary folder, a 1 s scrape and evaluation interval and the given scrape
jobs, waits for /-/ready, and stops it on exit. The binary is found by tests/tools.py: where it
is missing the calling test is skipped, or failed when TRILEMMA_REQUIRE_TOOLS=1 (CI, where a
skip would hide the gap).

`MetricsExporter` serves `EngineMetrics.exposition()` over HTTP from a background thread, the
way the simulated server's /metrics does, so tests can feed metrics while Prometheus scrapes.

Import as `from tests.support.prometheus import ...` (pytest's importlib mode resolves the
`tests` folder as a package root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.tools import require_tool
from trilemma.simfleet.vllm_metrics import EngineMetrics


def prometheus_binary() -> str:
    """The `prometheus` executable; skips the test (fails it in CI) when there is none."""
    return require_tool("prometheus")


def promtool_binary() -> str:
    """`promtool`, which the Prometheus package installs beside the server."""
    beside = Path(require_tool("prometheus")).with_name("promtool")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool("promtool")


def free_port() -> int:
    """A loopback port nothing listens on right now (closed again before returning)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    address: str  # host:port
    metrics_path: str = "/metrics"


class MetricsExporter:
    """Serves each EngineMetrics' exposition at its path on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, routes: Mapping[str, EngineMetrics]) -> None:
        self._routes = dict(routes)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> MetricsExporter:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                metrics = routes.get(urllib.parse.urlsplit(self.path).path)
                if metrics is None:
                    self.send_error(404)
                    return
                body, content_type = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape would drown the test output

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port, so that scrapes fail from now on. Idempotent."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class PrometheusServer:
    """A Prometheus process scraping `jobs` every `interval_s` seconds, its data in `workdir`."""

    def __init__(self, workdir: Path, jobs: Sequence[ScrapeJob], *, interval_s: int = 1) -> None:
        self.workdir = workdir
        self.jobs = tuple(jobs)
        self.interval_s = interval_s
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        every = f"{self.interval_s}s"
        return {
            "global": {"scrape_interval": every, "scrape_timeout": every,
                       "evaluation_interval": every},
            "scrape_configs": [
                {"job_name": job.name, "metrics_path": job.metrics_path,
                 "static_configs": [{"targets": [job.address]}]} for job in self.jobs],
        }

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        self._log = self.workdir / "prometheus.log"
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: self._get("/-/ready") is not None, timeout_s, "become ready")
        return self

    def wait_for_targets(self, timeout_s: float = 15.0) -> None:
        """Until every job has been scraped successfully once (so counters start at zero)."""
        def all_up() -> bool:
            result = self.query("up")
            up = {s["metric"]["job"] for s in result if s["value"][1] == "1"}
            return up >= {job.name for job in self.jobs}
        self._wait(all_up, timeout_s, "scrape every target")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector result, for the test's own checks."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if body is None:
            raise RuntimeError(f"query failed: {promql}")
        return json.loads(body)["data"]["result"]

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.read() if response.status == 200 else None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def _wait(self, done: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert self._process is not None
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self._log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"prometheus did not {what} within {timeout_s:g}s:\n{tail}")
            time.sleep(0.1)
