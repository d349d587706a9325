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
    # operator/ is a namespace package on purpose (see operator/naming.py); the rest are
    # regular packages wherever an __init__.py is.
    found = {"trilemma.operator"}
    for folder in ("optimizer", "simfleet", "tools"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((f"trilemma.{folder}", *rel)))
    assert listed == found


def test_the_operator_folder_is_not_a_regular_package():
    assert not (ROOT / "operator" / "__init__.py").exists()


@pytest.mark.parametrize("cwd", [ROOT, Path("/")])
def test_plain_import_operator_is_the_standard_library(cwd):
    # -S skips site, which on some interpreters imports `operator` early and would hide the
    # problem; '' first on sys.path is what `python -m` and `python -c` do in the repo root.
    code = ("import sys; sys.path.insert(0, ''); import operator; print(operator.__file__); "
            "assert hasattr(operator, 'itemgetter')")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, capture_output=True,
                         text=True, check=True).stdout
    assert Path(out.strip()).name == "operator.py"
    assert "trilemma" not in out and str(ROOT) not in out


def test_the_operator_namespace_installs_as_trilemma_operator():
    from trilemma.operator import naming

    assert naming.API_VERSION == "trilemma.dev/v1alpha1"


def test_the_console_script_is_the_tools_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"trilemma": "trilemma.tools.cli:main"}


def test_kmock_is_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}

    assert "kmock" not in names(project["dependencies"])
    assert "kmock" in names(extras["demo"]) and "kmock" in names(extras["dev"])


def test_the_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "trilemma.optimizer.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("estimate", "validate", "calibrate", "calibrate-engine", "bench"):
        assert command in out


@pytest.mark.parametrize(("package", "names"), [
    (catalog, {"Engine", "Gpu", "KvDtype", "ModelArch", "QuantRecipe", "SpecConfig",
               "SpecMethod", "acceptance_rate", "all_gpus", "bundled_id", "bundled_models",
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
