"""Progress bars on stderr for every step that takes more than a few seconds.

A bar is shown whatever `--json` or `quiet` say: it goes to stderr, so stdout keeps nothing but the
JSON, and `quiet` silences the log lines and tables only. It is shown only when stderr is a terminal
(nothing is drawn into a log file or a CI log) and it is transient: it disappears when its step ends.
Library callers turn bars off per call (`progress=False` where a function takes it) or for the whole
process with `set_enabled(False)`.

Bars never refresh from a background thread: they redraw when the work advances, at most ten times a
second and outside any timed call, so they cannot disturb the latencies the tools measure. A bar opened
while another is showing becomes a second line of the same display (rich allows one live display).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_enabled = True
_live: Progress | None = None  # the display bars are added to while one is showing
_busy = False  # a display that takes no other bars (the training epoch bar) is showing

REFRESH_S = 0.1


def set_enabled(on: bool) -> None:
    """Show progress bars in this process (the default) or never."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    """Whether this process shows progress bars (see `set_enabled`)."""
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No progress bars inside the block; the process's setting is restored after it."""
    was = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(was)


def images_in(loader) -> int | None:
    """How many images a data loader yields (a bar's total), or None when it cannot say."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _console(console: Console | None) -> Console:
    if console is not None:
        return console
    from sdtool.report import err

    return err


class Bar:
    """A step's bar; every method is a no-op when the bar is not shown (`shown` is False)."""

    shown = False

    def advance(self, n: int = 1) -> None:
        """`n` more units of the step are done."""

    def update(self, completed: int | None = None, total: int | None = None, **fields: float) -> None:
        """Set how much is done (and the total, and a custom bar's fields)."""


class _Shown(Bar):
    shown = True

    def __init__(self, progress: Progress, task: TaskID):
        self.progress, self.task, self._drawn = progress, task, 0.0

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)
        self._refresh()

    def update(self, completed: int | None = None, total: int | None = None, **fields: float) -> None:
        self.progress.update(self.task, completed=completed, total=total, **fields)  # type: ignore[arg-type]
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._drawn >= REFRESH_S:
            self._drawn = now
            self.progress.refresh()


def _columns() -> tuple:
    return (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


@contextlib.contextmanager
def progress(
    description: str, total: int | None = None, enabled: bool = True, console: Console | None = None
) -> Iterator[Bar]:
    """A transient bar "description  [bar]  M/N  elapsed" on stderr while the block runs; `total` None
    = not known in advance. A no-op `Bar` when not `enabled`, disabled for the process, or stderr (or
    `console`) is not a terminal."""
    global _live
    con = _console(console)
    if not (enabled and _enabled and con.is_terminal) or _busy:
        yield Bar()
        return
    if _live is not None:  # nested: one more line of the display that is showing
        outer = _live
        task = outer.add_task(description, total=total)
        try:
            yield _Shown(outer, task)
        finally:
            outer.remove_task(task)
        return
    display = Progress(*_columns(), console=con, transient=True, auto_refresh=False)
    _live = display
    try:
        with display:
            task = display.add_task(description, total=total)
            yield _Shown(display, task)
    finally:
        _live = None


@contextlib.contextmanager
def epoch_progress(epoch: int, epochs: int, steps: int, quiet: bool) -> Iterator[Bar]:
    """Training's bar for one epoch (steps, loss, accuracy, images/s). `quiet` hides it: training sets it
    on every process but the first of a distributed run, not for --json."""
    global _busy
    con = _console(None)
    if quiet or not _enabled or not con.is_terminal or _live is not None or _busy:
        yield Bar()
        return
    display = Progress(
        TextColumn(f"epoch {epoch + 1}/{epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2f}%  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=con,
        transient=True,
    )
    _busy = True
    try:
        with display:
            task = display.add_task("train", total=steps, loss=0.0, acc=0.0, ips=0.0)
            yield _Shown(display, task)
    finally:
        _busy = False
