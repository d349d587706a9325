"""A real Prometheus server on a loopback port, for the demo and the integration tests.

`PrometheusServer` runs the `prometheus` binary with a fresh TSDB in a work folder, a 1 s
scrape and evaluation interval and the given scrape jobs, waits for /-/ready, and stops it on
exit. Each `ScrapeJob` may attach target labels: the operator's closed loop selects an
endpoint's series by `namespace` and `trilemma_dev_endpoint`, which in a cluster the
PodMonitor copies from the pods, and which a static scrape of a simulated fleet must add itself.

`find_prometheus()` looks for the binary ($PROMETHEUS, then PATH). The demo reports how to
install it when there is none; the tests (tests/support/prometheus.py) skip or fail instead.

Blocking (subprocess and urllib): call `start`/`wait_for_targets` from a worker thread when an
event loop must keep running meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict

import yaml

# Names the binary explicitly; tests/tools.py reads the same variable.
PROMETHEUS_ENV = "PROMETHEUS"
INSTALL_HINT = ("install Prometheus (Debian/Ubuntu: `sudo apt-get install prometheus`, or run "
                ".ci/install-prometheus from the repository), or set PROMETHEUS=/path/to/"
                "prometheus")


class PrometheusNotFound(FileNotFoundError):
    """No `prometheus` executable: the message says how to get one."""


def find_prometheus() -> str | None:
    """The `prometheus` executable: $PROMETHEUS when set (None if it names no executable:
    whoever set it meant that binary, not another one), else the first on PATH, else None."""
    explicit = os.environ.get(PROMETHEUS_ENV)
    if explicit:
        return shutil.which(explicit)
    return shutil.which("prometheus")


def free_port() -> int:
    """A loopback port nothing listens on right now (closed again before returning)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sample(TypedDict):
    """One series of an instant query's vector result (Prometheus' HTTP API)."""

    metric: dict[str, str]  # its labels
    value: list[float | str]  # [unix seconds, the value as a string]


@dataclass(frozen=True)
class ScrapeJob:
    """One scrape target; `labels` are added to every series scraped from it."""

    name: str
    address: str  # host:port
    metrics_path: str = "/metrics"
    labels: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        target: dict[str, Any] = {"targets": [self.address]}
        if self.labels:
            target["labels"] = dict(self.labels)
        return {"job_name": self.name, "metrics_path": self.metrics_path,
                "static_configs": [target]}


class PrometheusServer:
    """A Prometheus process scraping `jobs` every `interval_s` seconds, its data in `workdir`.

    binary: the executable; None finds one at start (PrometheusNotFound when there is none).
    port: where to listen on 127.0.0.1; 0 picks a free one at start. A caller that must hand
        out the URL before the server can start (its scrape targets do not exist yet) picks
        the port itself with free_port().
    """

    def __init__(self, workdir: Path, jobs: Sequence[ScrapeJob], *, interval_s: int = 1,
                 binary: str | None = None, port: int = 0) -> None:
        self.workdir = workdir
        self.jobs = tuple(jobs)
        self.interval_s = interval_s
        self.binary = binary
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        every = f"{self.interval_s}s"
        return {
            "global": {"scrape_interval": every, "scrape_timeout": every,
                       "evaluation_interval": every},
            "scrape_configs": [job.config() for job in self.jobs],
        }

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        binary = self.binary or find_prometheus()
        if binary is None:
            raise PrometheusNotFound(f"no prometheus executable found: {INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        if not self.port:
            self.port = free_port()
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

    def query(self, promql: str) -> list[Sample]:
        """An instant query's vector result."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if body is None:
            raise RuntimeError(f"query failed: {promql}")
        return list(json.loads(body)["data"]["result"])

    def stop(self) -> None:
        """Terminate the process (killed after 10 s). Idempotent."""
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

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert self._process is not None
            if self._process.poll() is not None or time.monotonic() > deadline:
                tail = self._log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"prometheus did not {what} within {timeout_s:g}s:\n{tail}")
            time.sleep(0.1)
