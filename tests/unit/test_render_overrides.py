"""Extra arguments are read the way vLLM and SGLang parse argv before the "does it override the
plan" check (optimizer/render/overrides.py; the spellings come from the engines' parsers)."""

from __future__ import annotations

import pytest

from trilemma.optimizer import render
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig

CONFIG = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(gpu="h100_sxm", tp=2))
VLLM = render.decided_flags(CONFIG, "vllm")
SGLANG = render.decided_flags(CONFIG, "sglang")


def test_the_decided_flags_include_those_left_at_the_engine_default_on_purpose():
    assert {"--tensor-parallel-size", "--max-num-seqs", "--speculative-config",
            "--kv-cache-dtype", "--enable-prefix-caching", "model"} <= VLLM
    assert {"--tp-size", "--tensor-parallel-size", "--max-running-requests",
            "--model-path", "--model"} <= SGLANG


@pytest.mark.parametrize(("token", "flag"), [
    ("--tensor-parallel-size", "--tensor-parallel-size"),
    ("--tensor-parallel-size=8", "--tensor-parallel-size"),
    ("--tensor_parallel_size=8", "--tensor-parallel-size"),
    ("--tensor-parallel_size", "--tensor-parallel-size"),
    ("-tp", "--tensor-parallel-size"),
    ("-tp=8", "--tensor-parallel-size"),
    ("-t", "--tensor-parallel-size"),            # single-dash prefix of -tp
    ("--tensor", "--tensor-parallel-size"),      # allow_abbrev
    ("--te=4", "--tensor-parallel-size"),
    ("--max-num-seqs=8", "--max-num-seqs"),
    ("--no-enable-prefix-caching", "--enable-prefix-caching"),
    ("--no_enable_prefix_caching", "--enable-prefix-caching"),
    ("--enable-prefix", "--enable-prefix-caching"),
    ("--speculative-config.method=ngram", "--speculative-config"),
    ("--speculative_config.num_speculative_tokens", "--speculative-config"),
    ("-sc", "--speculative-config"),
    ("--spec-method", "--speculative-config"),
    ("--kv-cache-dtype=fp8", "--kv-cache-dtype"),
    ("--gpu-memory-utilization=0.99", "--gpu-memory-utilization"),
    ("--device-memory-utilization=0.99", "--gpu-memory-utilization"),
    ("--model", "model"),
    ("--config", "--config"),
    ("--config=x.yaml", "--config"),
])
def test_vllm_spellings_of_a_planned_flag_are_caught(token, flag):
    assert render.overridden_flag("vllm", token, VLLM) == flag


@pytest.mark.parametrize("token", [
    "--disable-log-requests", "--served-model-name", "chat", "--trust-remote-code",
    "--max-log-len=100", "-1", "8", "--enable-auto-tool-choice", "--tool-call-parser=hermes",
    "--uvicorn-log-level", "--api-key", "--config-format", "--download-dir=/models",
])
def test_vllm_arguments_that_set_nothing_planned_pass(token):
    assert render.overridden_flag("vllm", token, VLLM) is None


@pytest.mark.parametrize(("token", "flag"), [
    ("--tp-size=4", "--tensor-parallel-size"),
    ("--tensor-parallel-size", "--tensor-parallel-size"),
    ("--tp", "--tensor-parallel-size"),          # a prefix of --tp-size
    ("--mem-frac=0.5", "--mem-fraction-static"),
    ("--context-len=4096", "--context-length"),
    ("--model=x", "--model-path"),
    ("--conf", "--config"),
    ("--max-running-requests=1", "--max-running-requests"),
])
def test_sglang_spellings_of_a_planned_flag_are_caught(token, flag):
    assert render.overridden_flag("sglang", token, SGLANG) == flag


@pytest.mark.parametrize("token", ["--log-requests", "--log-level=info", "--trust-remote-code",
                                   "-tp"])
def test_sglang_arguments_that_set_nothing_planned_pass(token):
    # (-tp is no SGLang option at all: the engine itself refuses it.)
    assert render.overridden_flag("sglang", token, SGLANG) is None
