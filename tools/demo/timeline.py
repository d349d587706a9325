"""The demo's timeline: each event as it happens, printed for people and kept for the JSON
report."""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, NotRequired, TextIO, TypedDict

Obj = dict[str, Any]


class EventDict(TypedDict):
    t: float
    kind: str
    message: str
    data: NotRequired[Obj]  # left out when the event carries none


@dataclass(frozen=True)
class Event:
    t: float  # seconds since the demo started
    kind: str
    message: str
    data: Obj = field(default_factory=dict)

    def to_dict(self) -> EventDict:
        out: EventDict = {"t": round(self.t, 2), "kind": self.kind, "message": self.message}
        if self.data:
            out["data"] = self.data
        return out


class Timeline:
    """Events as they happen: printed to `out` (if any) and kept for the JSON report."""

    WIDTH = 100

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.start = time.time()
        self.events: list[Event] = []

    def at(self, unix_s: float) -> float:
        return unix_s - self.start

    def add(self, kind: str, message: str, *, when: float | None = None, **data: Any) -> Event:
        event = Event(t=self.at(time.time() if when is None else when), kind=kind,
                      message=message, data=data)
        self.events.append(event)
        self._print(f"[{event.t:6.1f}s] {kind:<9} ", message)
        return event

    def say(self, text: str = "") -> None:
        """A line that is not an event (headings, the summary)."""
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def _print(self, head: str, message: str) -> None:
        if self.out is None:
            return
        lines = textwrap.wrap(message, width=self.WIDTH - len(head),
                              break_on_hyphens=False) or [""]
        print(head + lines[0], file=self.out)
        for line in lines[1:]:
            print(" " * len(head) + line, file=self.out)
        self.out.flush()
