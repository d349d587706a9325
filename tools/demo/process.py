"""What the demo does to its own process while it runs, and undoes: environment variables for
the in-process operator, its log kept for the summary, Ctrl-C and SIGTERM cancelling the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables, restoring them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Problems(logging.Handler):
    """Keeps the operator's warnings and errors for the summary, instead of printing them
    between the timeline's lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        first = message.splitlines()[0] if message else ""
        self.records.append(f"{record.name}: {first}"[:300])


@contextlib.contextmanager
def capture_logging(verbose: bool) -> Iterator[Problems]:
    root = logging.getLogger()
    problems = Problems()
    added: list[logging.Handler] = [problems]
    level = root.level
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        stream.setLevel(logging.INFO)
        added.append(stream)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    for handler in added:
        root.addHandler(handler)
    try:
        yield problems
    finally:
        for handler in added:
            root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM cancel the demo (which then cleans up). Kopf, running in this loop,
    installs handlers that would stop only the operator; these replace them."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if task is not None:
                loop.add_signal_handler(sig, task.cancel)
                installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
