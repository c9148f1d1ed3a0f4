"""How progress is shown: a live bar on a terminal, the contract's plain line elsewhere.

The view only renders snapshots the writer publishes after each commit; it never reads the
database or touches the run's state. Not on a terminal (CI, nohup, a log file) it prints one
`[PROGRESS] ...` line per commit and never a carriage return.
"""

from __future__ import annotations

from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from asyncrunner.pipeline.progress import Snapshot, progress_line


class ProgressView:
    def __init__(self, stream: IO[str], live: bool) -> None:
        self.stream = stream
        self.live = live
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @classmethod
    def for_stream(cls, stream: IO[str]) -> ProgressView:
        return cls(stream, live=stream.isatty())

    def __enter__(self) -> ProgressView:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total} ({task.percentage:>5.1f}%)"),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                console=Console(file=self.stream), transient=False, refresh_per_second=4,
            )
            self._progress.start()
        return self

    def update(self, s: Snapshot) -> None:
        if self._progress is None:
            print(progress_line(s), file=self.stream, flush=True)
            return
        if self._task is None:
            self._task = self._progress.add_task("classifying", total=s.total, detail="")
        self._progress.update(self._task, completed=s.done, total=s.total, detail=_detail(s))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()


def _detail(s: Snapshot) -> str:
    eta = s.eta.strftime("%Y-%m-%d %H:%M") if s.eta else "unknown"
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
    conc = f"{s.concurrency:.0f}" if s.concurrency is not None else "-"
    detail = (f"{s.rate:.2f}/s  ETA {eta}  errors: {errors}  concurrency {conc}  "
              f"{s.tokens_per_s:.0f} tok/s")
    if s.waiting_until is not None:
        detail = f"waiting until {s.waiting_until:%H:%M:%S}: {s.waiting_for}  " + detail
    return detail
