"""Progress bars for long work (rich), switchable off for tests and notebooks."""

from collections.abc import Iterator
from contextlib import contextmanager

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator:
    """Yield `advance(n=1)`; shows a rich bar with count, rate-friendly ETA, when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task_id, n)


def progress_line(text: str, enabled: bool = True) -> None:
    """Print one line of progress (e.g. an epoch's figures) with the bars, when enabled: on
    the console the bars draw on, so a live bar stays below it instead of being garbled."""
    if enabled:
        get_console().print(text, markup=False, highlight=False, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. frames/s during extraction."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "", style="cyan")


@contextmanager
def progress_counters(totals: dict[str, int], enabled: bool = True) -> Iterator:
    """Several bars at once (e.g. videos and frames) with rates; yield `advance(name, n=1)`."""
    if not enabled:
        yield lambda name, n=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description:>7}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        task_ids = {name: progress.add_task(name, total=total) for name, total in totals.items()}
        yield lambda name, n=1: progress.advance(task_ids[name], n)
