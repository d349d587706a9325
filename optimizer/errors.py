"""Errors the optimizer raises for bad input, so every caller can report field, value and why."""

from __future__ import annotations


class TrilemmaError(Exception):
    """Base class of every error the optimizer raises on purpose."""


class InputError(TrilemmaError, ValueError):
    """A user-supplied value is wrong: names the field, the value and the rule it breaks.

    The CLI turns it into exit code 2; the operator into a status condition.
    """

    def __init__(self, field: str, value: object, why: str) -> None:
        self.field = field
        self.value = value
        self.why = why
        super().__init__(f"{field}={value!r}: {why}")


class UnknownModelError(InputError):
    """A model id that is not bundled: says how to pass a config.json instead."""
