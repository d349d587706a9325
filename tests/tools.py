"""Finding the external programs some tests drive (helm), and skipping or failing without them.

Tests that need a binary call `require_tool(name)`. On a developer's machine a missing binary
skips the test with the command that fetches it; in CI, which sets TRILEMMA_REQUIRE_TOOLS=1,
it fails instead, so a broken fetch step cannot turn into silently skipped chart tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Environment variables that name a binary explicitly, per tool.
TOOL_ENV_VARS: dict[str, str] = {"helm": "HELM", "prometheus": "PROMETHEUS", "lua5.1": "LUA"}

# Per tool, the repository script that installs it (into tools_dir() or onto PATH).
FETCH_SCRIPTS: dict[str, str] = {"helm": ".ci/fetch-helm", "prometheus": ".ci/install-prometheus",
                                 "lua5.1": ".ci/install-lua"}


def tools_dir() -> Path:
    """Where .ci/fetch-* scripts cache binaries (the scripts use the same default)."""
    configured = os.environ.get("TRILEMMA_TOOLS_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "trilemma" / "tools"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_tool(name: str) -> str | None:
    """The path of an executable `name`: its env var (HELM for helm), then tools_dir(), then
    PATH. None when none of them has one. An env var naming a missing file is an error, not a
    fallthrough, because whoever set it expects that binary to be tested."""
    env_var = TOOL_ENV_VARS.get(name)
    explicit = os.environ.get(env_var) if env_var else None
    if explicit:
        resolved = shutil.which(explicit)
        if resolved is None:
            raise FileNotFoundError(f"{env_var}={explicit!r} is not an executable")
        return resolved
    cached = tools_dir() / name
    if _executable(cached):
        return str(cached)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """The path of `name` for a test; skips the test without it (fails when
    TRILEMMA_REQUIRE_TOOLS=1, as in CI)."""
    path = find_tool(name)
    if path is not None:
        return path
    fetch = FETCH_SCRIPTS.get(name)
    how = f"run {fetch}" if fetch else f"install {name}"
    env_var = TOOL_ENV_VARS.get(name)
    where = f" or set {env_var}" if env_var else ""
    message = f"{name} not found in {tools_dir()} or on PATH: {how}{where}"
    if os.environ.get("TRILEMMA_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
