"""The default engine images pin the releases the calibration was measured on (issue #13
item 5): never `:latest`, never a tag typed apart from the calibration data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trilemma.optimizer.perf import releases
from trilemma.optimizer.perf.engine import Engine, engine_facts
from trilemma.optimizer.perf.kernels import calibration
from trilemma.optimizer.render import DEFAULT_IMAGES

AIC = Path(os.environ.get("TRILEMMA_AIC_DATA")
           or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "aic")


@pytest.mark.parametrize("engine", list(Engine))
def test_no_default_image_floats_and_each_tag_is_the_calibrated_release(engine):
    image = DEFAULT_IMAGES[engine]
    tag = image.rsplit(":", 1)[1]
    assert tag != "latest" and "nightly" not in tag
    version = releases.calibrated_version(engine)
    # vLLM tags a release `v<version>`; SGLang `v<version>-cu<cuda>`.
    assert tag == f"v{version}" or tag.startswith(f"v{version}-cu"), (tag, version)


def test_the_vllm_image_is_the_release_of_the_kernel_tables():
    per_gpu = {gpu: tuple(entry["engine_versions"])
               for gpu, entry in calibration()["gpus"].items()}
    assert releases.kernel_versions() == dict(sorted(per_gpu.items()))
    version = releases.calibrated_version(Engine.VLLM)
    measured_on = [gpu for gpu, versions in per_gpu.items() if version in versions]
    assert len(measured_on) * 2 > len(per_gpu)   # most calibrated GPUs
    assert DEFAULT_IMAGES[Engine.VLLM] == f"vllm/vllm-openai:v{version}"


def test_the_sglang_image_is_the_release_its_overheads_were_fitted_on():
    version, image = engine_facts(Engine.SGLANG).calibrated_release
    assert releases.calibrated_version(Engine.SGLANG) == version
    assert DEFAULT_IMAGES[Engine.SGLANG] == image
    assert image.startswith(f"lmsysorg/sglang:v{version}")


@pytest.mark.skipif(not (AIC / "profiles").is_dir(), reason=f"no AIConfigurator tables at {AIC}")
def test_the_recorded_kernel_releases_are_the_measured_tables_folders():
    # fitting.py records each GPU's versions from the tables' `<family>/vllm/<version>/`
    # folders; the shipped file must say what the tables say.
    for gpu, versions in releases.kernel_versions().items():
        folders = {p.name for p in (AIC / "profiles" / gpu).glob("*/vllm/*") if p.is_dir()}
        assert set(versions) == folders, gpu


def test_a_version_key_orders_releases_numerically():
    ordered = sorted(["0.5.10", "0.5.9", "0.5.8.post1", "0.5.8"], key=releases.version_key)
    assert ordered == ["0.5.8", "0.5.8.post1", "0.5.9", "0.5.10"]


def test_the_readme_names_the_default_images():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for image in DEFAULT_IMAGES.values():
        assert f"`{image}`" in readme, image
