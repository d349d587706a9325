"""The `trilemma` console script: the optimizer's commands plus those built on it.

The optimizer's CLI may not import the operator (import-linter forbids it), so the console
script starts here and hands the extra commands in. Each module below exposes `SUBCOMMAND` and
imports nothing optional at module level: `trilemma --help` and `trilemma optimize` must run
where the `demo` extra (KMock) is not installed, as in the operator image.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from trilemma.optimizer import cli as optimizer_cli

# Modules that add a command; each defines SUBCOMMAND: optimizer_cli.Subcommand.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "trilemma.tools.crdgen",
    "trilemma.simfleet.cli_server",
    "trilemma.simfleet.cli_loadgen",
    "trilemma.tools.demo.command",
    "trilemma.tools.devcluster",
)


def subcommands() -> list[optimizer_cli.Subcommand]:
    return [importlib.import_module(name).SUBCOMMAND for name in SUBCOMMAND_MODULES]


def main(argv: Sequence[str] | None = None) -> int:
    return optimizer_cli.main(argv, extra=subcommands())


if __name__ == "__main__":
    raise SystemExit(main())
