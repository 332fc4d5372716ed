"""What the commands write to the terminal: data on stdout (one path per line, or one JSON document with
``--json``), notes and progress on stderr, progress bars only when stderr is a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class Reporter:
    """Writes result paths (or one JSON document) to stdout and notes and progress to stderr."""

    def __init__(self, json_mode: bool, quiet: bool):
        self.json_mode, self.quiet = json_mode, quiet
        self.outputs: list[str] = []
        self._held: list[str] = []

    def output(self, path: Path) -> None:
        self._flush()
        self.outputs.append(str(path))
        if not self.json_mode:
            sys.stdout.write(f"{path}\n")
            sys.stdout.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"{message}\n")

    def note_later(self, message: str) -> None:
        """A note shown once the work starts (the loader's notes): a run refused for its arguments prints only
        its one-line error."""
        self._held.append(message)

    def _flush(self) -> None:
        held, self._held = self._held, []
        for message in held:
            self.note(message)

    def finish(self, document: dict[str, Any]) -> None:
        self._flush()
        if self.json_mode:
            write_json({"outputs": self.outputs, **document})

    def progress(self, description: str, total: int) -> "Progress":
        """A progress bar for ``total`` units of work, on when stderr is a terminal and not ``--quiet``."""
        self._flush()
        return Progress(description, total, enabled=not self.quiet and sys.stderr.isatty(), transient=True)


def write_json(document: Any) -> None:
    """One strict JSON document on stdout (``Console.print`` would wrap it; NaN/inf become null)."""
    sys.stdout.write(json.dumps(json_safe(document), indent=2, default=str, allow_nan=False) + "\n")


def json_safe(value: Any) -> Any:
    """Strict JSON: infinite or NaN floats (a PSNR of identical images) become null."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Progress:
    """A rich progress bar on stderr, or nothing when ``enabled`` is false. Use as a context manager; inside,
    ``advance(n)`` adds work done and ``update(completed=..., **fields)`` sets it (``fields`` fill the
    ``columns`` template, e.g. ``"loss {task.fields[loss]:.4f}"``)."""

    def __init__(self, description: str, total: int, enabled: bool, transient: bool = False,
                 columns: str | None = None, **fields: Any):
        self.description, self.total, self.enabled = description, total, enabled
        self.transient, self.columns, self.fields = transient, columns, fields
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            extra = [TextColumn(self.columns)] if self.columns else []
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                            TimeRemainingColumn(), console=Console(stderr=True), transient=self.transient)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, **self.fields)
        return self

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def update(self, completed: int | None = None, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, **fields)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
