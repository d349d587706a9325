"""The operator image's Dockerfile, read statically (no Docker engine in CI): slim base, plain
install, non-root numeric user, nothing written outside /tmp, and the `kopf run` command the
chart relies on, with the `trilemma` CLI still reachable by replacing the command."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuation lines joined."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def stages(parsed: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(parsed) -> list[Instruction]:
    return stages(parsed)[-1]


def args_of(stage: list[Instruction], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


def test_every_stage_builds_on_python_3_11_slim(parsed):
    bases = [rest.split()[0] for kw, rest in parsed if kw == "FROM"]
    assert bases
    assert all(base == "python:3.11-slim" for base in bases), bases


def test_final_stage_runs_as_a_numeric_non_root_user(final):
    (user,) = args_of(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    assert int(uid) == 10001  # the chart's runAsUser


def test_project_is_installed_plainly_without_pip_caches(parsed):
    pip_runs = [rest for kw, rest in parsed if kw == "RUN" and "pip " in rest]
    assert pip_runs
    for run in pip_runs:
        words = shlex.split(run)
        assert "-e" not in words and "--editable" not in words, run
        assert "--no-cache-dir" in words, run


def test_default_command_is_kopf_run_of_the_operator_handlers(final):
    (cmd,) = args_of(final, "CMD")
    argv = json.loads(cmd)  # exec form: signals reach kopf, no shell in between
    assert argv[:2] == ["kopf", "run"]
    assert "--module=trilemma.operator.handlers" in argv
    assert "--liveness=http://0.0.0.0:8080/healthz" in argv
    assert "--all-namespaces" in argv


def test_no_entrypoint_so_a_given_command_such_as_the_cli_replaces_the_default(final):
    # `docker run IMAGE trilemma optimize spec.yaml` must run the CLI, not kopf with extra args.
    assert all(json.loads(e) == [] for e in args_of(final, "ENTRYPOINT"))


def test_chart_runs_the_same_kopf_module_and_liveness_endpoint(final):
    argv = json.loads(args_of(final, "CMD")[0])
    helpers = (ROOT / "charts" / "trilemma" / "templates" / "_helpers.tpl").read_text()
    for flag in argv:
        if flag.startswith(("--module=", "--liveness=")):
            assert f"- {flag}\n" in helpers, flag


def test_environment_keeps_writes_under_tmp(final):
    env = " ".join(args_of(final, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/tmp" in env


def copy_sources(parsed: list[Instruction]) -> set[str]:
    sources = set()
    for keyword, rest in parsed:
        if keyword == "COPY" and not rest.startswith("--from"):
            *srcs, _dest = shlex.split(rest)
            sources.update(s.rstrip("/") for s in srcs)
    return sources


def test_build_copies_every_package_folder_and_what_the_metadata_reads(parsed):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    needed = folders | {"pyproject.toml", project["project"]["readme"], "LICENSE", "NOTICE"}
    assert needed <= copy_sources(parsed)


def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_out_caches_and_history_but_nothing_the_build_copies(parsed):
    patterns = ignore_patterns()
    assert not [p for p in patterns if p.startswith("!")], "keep the ignore file exclusion-only"
    for must in (".git", ".venv", "**/__pycache__", "tests"):
        assert must in patterns, must
    for source in copy_sources(parsed):
        hits = [p for p in patterns
                if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.removeprefix("**/"))]
        assert not hits, f"{source} is copied but ignored by {hits}"


def test_the_image_installs_the_wheel_without_extras_so_ships_no_kmock(final):
    installs = [shlex.split(rest) for rest in args_of(final, "RUN") if "pip install" in rest]
    assert installs
    for words in installs:
        wheels = [w for w in words if w.endswith(".whl") or ".whl[" in w]
        assert wheels, words
        # An extra would read /wheels/trilemma-...whl[demo]; none may be named at all.
        assert not [w for w in words if "[" in w or "kmock" in w.lower()], words


# A Python without KMock, as in the image: a meta-path finder refuses to import it.
NO_KMOCK = """
import sys

class NoKmock:
    def find_spec(self, name, path=None, target=None):
        if name == "kmock" or name.startswith("kmock."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoKmock())
from trilemma.tools.cli import main
code = main(sys.argv[1:])
assert "kmock" not in sys.modules
raise SystemExit(code)
"""


def without_kmock(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_KMOCK, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_console_script_offers_every_command_without_kmock():
    done = without_kmock("--help")
    assert done.returncode == 0, done.stderr
    for command in ("optimize", "crds", "demo", "dev-cluster"):
        assert command in done.stdout


@pytest.mark.parametrize("argv", [["optimize", "examples/chatbot.yaml"], ["crds", "--stdout"]],
                         ids=["optimize", "crds"])
def test_optimize_and_crds_run_without_kmock(argv):
    done = without_kmock(*argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_the_demo_on_the_emulated_api_without_kmock_says_to_install_the_extra():
    done = without_kmock("demo", "--control-plane", "kmock")
    assert done.returncode == 2, done.stderr
    assert "trilemma[demo]" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout

