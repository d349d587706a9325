"""The Prometheus launcher's pure parts: scrape configuration and finding the binary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trilemma.simfleet.prometheus_server import (
    PrometheusNotFound,
    PrometheusServer,
    ScrapeJob,
    find_prometheus,
)


def test_scrape_jobs_carry_their_target_labels(tmp_path: Path):
    jobs = [ScrapeJob("a", "127.0.0.1:1"),
            ScrapeJob("b", "127.0.0.1:2", "/m", labels={"namespace": "ns",
                                                        "trilemma_dev_endpoint": "chat"})]
    config = PrometheusServer(tmp_path, jobs, interval_s=2).config()
    assert config["global"]["scrape_interval"] == "2s"
    a, b = config["scrape_configs"]
    assert a == {"job_name": "a", "metrics_path": "/metrics",
                 "static_configs": [{"targets": ["127.0.0.1:1"]}]}
    assert b["static_configs"] == [{"targets": ["127.0.0.1:2"],
                                    "labels": {"namespace": "ns",
                                               "trilemma_dev_endpoint": "chat"}}]


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_find_prometheus_prefers_the_variable_then_path(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    on_path = _executable(tmp_path / "prometheus")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("PROMETHEUS", raising=False)
    assert find_prometheus() == str(on_path)
    named = _executable(tmp_path / "my-prometheus")
    monkeypatch.setenv("PROMETHEUS", str(named))
    assert find_prometheus() == str(named)
    # A variable naming nothing runnable is not silently replaced by another binary.
    monkeypatch.setenv("PROMETHEUS", str(tmp_path / "missing"))
    assert find_prometheus() is None


def test_start_without_a_binary_says_how_to_install_one(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROMETHEUS", str(tmp_path / "missing"))
    with pytest.raises(PrometheusNotFound, match="apt-get install prometheus"):
        PrometheusServer(tmp_path / "work", [ScrapeJob("a", "127.0.0.1:1")]).start()
