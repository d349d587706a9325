"""Drift test: every file in examples/ must still parse with today's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trilemma.optimizer import spec
from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.perf import estimate
from trilemma.optimizer.search.configs import ServingConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BASELINES = EXAMPLES / "baselines.yaml"
SPECS = sorted(p for p in EXAMPLES.glob("*.yaml") if p != BASELINES)


def test_examples_folder_holds_the_three_case_studies():
    assert {p.name for p in SPECS} == {"code-completion.yaml", "code-rewriting.yaml",
                                       "chatbot.yaml"}
    assert {p.suffix for p in EXAMPLES.iterdir() if p.is_file()} == {".yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_example_spec_parses(path):
    request = spec.load_spec(path)
    assert request.slo.ttft_ms is not None and request.slo.tpot_ms is not None
    assert path.read_text().startswith("# Case study")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_example_pool_uses_catalog_prices(path):
    for group in spec.load_spec(path).hardware.gpus:
        assert group.price_per_gpu_hour is None
        assert gpus.get_gpu(group.gpu).price_per_hour > 0


def test_every_example_has_a_baseline_that_builds_and_fits():
    baselines = yaml.safe_load(BASELINES.read_text())
    assert set(baselines) == {p.stem for p in SPECS}
    for name, entry in baselines.items():
        request = spec.load_spec(EXAMPLES / entry["spec"])
        config = ServingConfig.from_dict(entry["config"])
        assert config.model == request.model.id, name
        w = config.worker
        cfg = estimate.resolve(model=config.model, gpu=w.gpu, tp=w.tp, pp=w.pp, dp=w.dp,
                               ep=w.ep, quant=w.quant, kv_dtype=w.kv_dtype)
        prompt = request.workload.prompt_distribution().mean_tokens()
        output = request.workload.output_distribution().mean_tokens()
        cached = request.workload.expected_cached_tokens()
        result = estimate.closed_loop(cfg, concurrency=8, prompt_tokens=round(prompt),
                                      output_tokens=round(output), cached_tokens=int(cached))
        assert result.fits, name
