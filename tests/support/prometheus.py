"""The Prometheus launcher for tests, and an exporter for it to scrape.

`PrometheusServer`, `ScrapeJob` and `free_port` are the package's own
(trilemma.simfleet.prometheus_server, which the demo uses too); here the server finds its
binary the way tests find tools (tests/tools.py): where `prometheus` is missing the calling
test is skipped, or failed when TRILEMMA_REQUIRE_TOOLS=1 (CI, where a skip would hide the gap).
Install it with .ci/install-prometheus.

`MetricsExporter` serves `EngineMetrics.exposition()` over HTTP from a background thread, the
way the simulated server's /metrics does, so tests can feed metrics while Prometheus scrapes.

Import as `from tests.support.prometheus import ...` (pytest's importlib mode resolves the
`tests` folder as a package root).
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.tools import require_tool
from trilemma.simfleet import prometheus_server
from trilemma.simfleet.prometheus_server import ScrapeJob, free_port
from trilemma.simfleet.vllm_metrics import EngineMetrics

__all__ = ["MetricsExporter", "PrometheusServer", "ScrapeJob", "free_port",
           "prometheus_binary", "promtool_binary"]


def prometheus_binary() -> str:
    """The `prometheus` executable; skips the test (fails it in CI) when there is none."""
    return require_tool("prometheus")


def promtool_binary() -> str:
    """`promtool`, which the Prometheus package installs beside the server."""
    beside = Path(require_tool("prometheus")).with_name("promtool")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return require_tool("promtool")


class PrometheusServer(prometheus_server.PrometheusServer):
    """The package's launcher; without a binary given, it takes the tests' (skip or fail)."""

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        if self.binary is None:
            self.binary = prometheus_binary()
        super().start(timeout_s)
        return self

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
