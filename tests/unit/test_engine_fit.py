import dataclasses
from pathlib import Path

import pytest

from trilemma.optimizer import engine_fit
from trilemma.optimizer.perf.engine import Engine, engine_facts

DEV_CSV = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "validation"
           / "aic_silicon_sample_dev.csv")


def test_write_replaces_only_the_fitted_values(tmp_path):
    src = engine_fit.default_engine_yaml().read_text()
    path = tmp_path / "engine.yaml"
    path.write_text(src)
    fitted = engine_fit.EngineFit(engine=Engine.SGLANG, loss=0.1, rows=1, values={
        "step_overhead_ms": 9.5, "request_overhead_ms": 7.25,
        "benchmark_requests_per_concurrency": 3.0})
    release = engine_fit.Release(version="9.8.7", image="lmsysorg/sglang:v9.8.7-cu130")
    engine_fit.write(fitted, release, path)
    new = path.read_text()
    vllm_part = new[:new.index("\nsglang:")]
    assert vllm_part == src[:src.index("\nsglang:")]
    assert "value: 9.5" in new and "value: 7.25" in new and "value: 3.0" in new
    assert 'version: "9.8.7"' in new and 'image: "lmsysorg/sglang:v9.8.7-cu130"' in new
    assert len(new.splitlines()) == len(src.splitlines())


def test_shipped_engine_constants_are_within_their_search_bounds():
    facts = engine_facts(Engine.VLLM)
    for key in engine_fit.FITTED:
        lo, hi = engine_fit._BOUNDS[key]
        assert lo <= getattr(facts, key) <= hi


@pytest.mark.slow
@pytest.mark.skipif(not DEV_CSV.exists(), reason="needs ../shared/data/validation")
def test_the_engine_calibration_reproduces_the_shipped_vllm_constants():
    fitted, _ = engine_fit.main(DEV_CSV, Engine.VLLM)
    shipped = engine_facts(Engine.VLLM)
    for key, value in fitted.values.items():
        assert value == pytest.approx(getattr(shipped, key), rel=0.02, abs=0.05), key


def test_a_worse_constant_gives_a_larger_loss():
    # The loss the fit minimises must respond to the constants, or the fit is meaningless.
    if not DEV_CSV.exists():
        pytest.skip("needs ../shared/data/validation")
    import csv

    with DEV_CSV.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["backend"] == "vllm" and r["mode"] == "agg"]
    rows = rows[::10]
    base = engine_facts(Engine.VLLM)
    worse = dataclasses.replace(base, request_overhead_ms=base.request_overhead_ms + 200.0)
    assert engine_fit._loss(rows, worse) > engine_fit._loss(rows, base)


def _row(engine: str, version: str, image: str = "") -> dict[str, str]:
    source = f"db-dump; config_id=1; image={image}" if image else "db-dump; config_id=1"
    return {"backend": engine, "mode": "agg", "backend_version": version,
            "silicon_data_source": source}


def test_the_calibrated_release_is_the_released_version_most_rows_ran():
    rows = [_row("sglang", "0.5.9", "lmsysorg/sglang:v0.5.9-cu130"),
            _row("sglang", "0.5.9", "lmsysorg/sglang:v0.5.9-cu130-amd64"),
            _row("sglang", "0.5.8.post1", "lmsysorg/sglang:v0.5.8.post1-cu130"),
            _row("sglang", "nightly-dev"), _row("sglang", "nightly-dev"),
            _row("sglang", "nightly-dev"), _row("vllm", "0.19.0", "vllm/vllm-openai:v0.19.0")]
    release = engine_fit.calibrated_release(rows, Engine.SGLANG)
    # Nightly builds cannot be pinned; the -amd64 tag is one arch of the multi-arch image.
    assert release == engine_fit.Release(version="0.5.9", image="lmsysorg/sglang:v0.5.9-cu130")
    tie = engine_fit.calibrated_release(rows[2:] + rows[:1], Engine.SGLANG)
    assert tie.version == "0.5.9"   # one row each: the newer release


@pytest.mark.skipif(not DEV_CSV.exists(), reason="needs ../shared/data/validation")
def test_the_shipped_release_is_the_one_the_rows_give():
    # engine.yaml's calibrated_release is written by `trilemma calibrate-engine`: rerunning
    # it on the shipped rows must give the same record.
    from trilemma.optimizer import validation

    rows = validation.read_rows(DEV_CSV)
    for engine in Engine:
        release = engine_fit.calibrated_release(rows, engine)
        shipped = engine_facts(engine).calibrated_release
        assert (release.version, release.image) == shipped, engine


def test_a_prefill_first_engine_fits_no_first_wave_weight():
    # SGLang's closed loop runs in waves: the first-wave weight enters none of its means.
    assert "benchmark_requests_per_concurrency" not in engine_fit.fitted_keys(
        engine_facts(Engine.SGLANG))
    assert engine_fit.fitted_keys(engine_facts(Engine.VLLM)) == engine_fit.FITTED
