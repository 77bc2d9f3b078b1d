"""Progress bars for long work (benchmarks, writing big files), on stderr, only when stderr
is a terminal: scripts and CI logs stay clean."""
import sys
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int):
    """Yields `advance(n=1)`; draws a rich progress bar when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
