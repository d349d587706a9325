"""`trilemma sim-server` started as a vLLM container would be, driven by `trilemma loadgen`.

The server runs in its own process with the exact argv the renderer gives a vLLM Deployment;
the load generator's JSON report (the truth it sent) is compared with the server's /metrics,
as Prometheus would scrape it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trilemma.optimizer import render
from trilemma.optimizer.catalog import QuantRecipe, SpecMethod
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig
from trilemma.tools import cli

CONFIG = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(
    gpu="h100_sxm", quant=QuantRecipe.FP8, spec_method=SpecMethod.EAGLE3, spec_k=3, max_num_seqs=64,
    max_model_len=16384))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read()


def _wait_healthy(url: str, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sim-server exited: {proc.communicate()[1]}")
        try:
            _get(url + "/health")
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("sim-server did not become healthy")


@pytest.mark.slow  # ~3 s: a subprocess start plus 1.6 s of load
def test_sim_server_with_rendered_vllm_flags_counts_what_loadgen_sent(tmp_path: Path):
    argv = render.engine_args(CONFIG, "vllm")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trilemma.tools.cli", "sim-server", "--gpu", "h100_sxm",
         "--time-scale", "0.1", "--host", "127.0.0.1", "--port", str(port), "--",
         *argv, "--dtype", "auto"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(url, proc)
        phases = tmp_path / "phases.yaml"
        phases.write_text("phases:\n"
                          "  - {duration_s: 0.8, rate: 10}\n"
                          "  - {duration_s: 0.8, rate: 30, prompt_mean: 2000, prompt_p90: null,"
                          " arrivals: gamma, cv: 2}\n")
        out = tmp_path / "report.json"
        rc = cli.main(["loadgen", "--url", url, "--phases", str(phases), "--prompt-mean", "300",
                       "--prompt-p90", "500", "--output-mean", "12", "--prefix-share", "0.5",
                       "--prefix-tokens", "128", "--prefixes", "2", "--seed", "3",
                       "--json", str(out)])
        metrics = {s.name: s.value for f in text_string_to_metric_families(
            _get(url + "/metrics").decode()) for s in f.samples
            if s.labels.get("finished_reason") in (None, "length")}
        models = json.loads(_get(url + "/v1/models"))
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    assert rc == 0
    assert proc.returncode == 0, stderr  # SIGTERM shuts down cleanly, as in a pod
    assert "--dtype" in stderr and "listening on 127.0.0.1:" in stdout
    assert models["data"][0]["id"] == "Qwen/Qwen3-8B"
    assert models["data"][0]["max_model_len"] == 16384
    report = json.loads(out.read_text())
    overall = report["overall"]
    assert overall["failed"] == 0 and overall["sent"] > 10
    assert metrics["vllm:request_success_total"] == overall["sent"]
    assert metrics["vllm:prompt_tokens_total"] == overall["prompt_tokens_total"]
    assert metrics["vllm:generation_tokens_total"] == overall["output_tokens_total"]
    assert metrics["vllm:prefix_cache_hits_total"] == overall["server_cached_tokens"]
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert report["phases"][1]["prompt_tokens"]["mean"] == 2000
    assert report["phases"][1]["parameters"]["arrivals"] == "gamma"


@pytest.mark.parametrize("args, message", [
    (["sim-server"], "--plan FILE or vLLM's serve flags"),
    (["sim-server", "--", "meta-llama/Llama-3.1-8B", "--kv-cache-dtype", "int3"],
     "--kv-cache-dtype"),
])
def test_sim_server_without_a_configuration_exits_2(args, message, capsys):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
