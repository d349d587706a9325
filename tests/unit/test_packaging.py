"""The distribution's shape: renamed folders, no stdlib shadowing, pinned public facades."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from trilemma.optimizer import catalog, perf

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, name in (("optimizer", "trilemma.optimizer"), ("operator", "trilemma.operator")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert listed == found


@pytest.mark.parametrize("cwd", [ROOT, Path("/")])
def test_plain_import_operator_is_the_standard_library(cwd):
    code = "import operator, sys; print(operator.__file__); import trilemma.operator"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         check=True).stdout
    assert "trilemma" not in out
    assert Path(out.strip()).name == "operator.py"


def test_the_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "trilemma.optimizer.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("estimate", "validate", "calibrate", "calibrate-engine", "bench"):
        assert command in out


@pytest.mark.parametrize(("package", "names"), [
    (catalog, {"Engine", "Gpu", "KvDtype", "ModelArch", "QuantRecipe", "SpecConfig",
               "SpecMethod", "acceptance_rate", "all_gpus", "bundled_models",
               "expected_tokens_per_step", "get_gpu", "load_model", "parse_recipe",
               "parse_spec", "quality_delta"}),
    (perf, {"ClosedLoopResult", "Config", "EngineFacts", "Estimate", "MemoryBreakdown",
            "Parallelism", "StepModel", "StepTime", "closed_loop", "engine_facts", "resolve"}),
])
def test_facades_export_exactly_the_supported_names(package, names):
    assert set(package.__all__) == names
    assert all(hasattr(package, n) for n in names)


def test_notice_credits_nvidia_aiconfigurator_for_derived_data():
    notice = (ROOT / "NOTICE").read_text()
    assert "AIConfigurator" in notice and "Apache License" in notice
    assert "calibration.json" in notice and "gpus.yaml" in notice
