"""Rich progress bars that degrade to nothing when output is not a terminal (CI logs)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)

    def note(self, text: str) -> None:
        """A line above the bar (or on stderr when there is no terminal)."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def progress_bar(description: str, total: int | None):
    if not sys.stderr.isatty():
        print(f"{description} ...", file=sys.stderr, flush=True)
        yield _Bar(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))
