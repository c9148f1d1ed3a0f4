"""The pipeline's side of a data file loaded beside it (db/loading.py).

`LoadFeed` says how far the committed narratives go: the producer reads no row past
`bound` and, when a page comes back short before the load is `complete`, waits for the next
step instead of ending; the writer takes `total` as the experiment's size so far.
`keep_loading` runs the load's steps on a worker thread, one transaction each, and moves
the feed on after each. Cancelled (a signal, a halt), it stops after the step in hand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio

from asyncrunner.db.ingest import IngestReport
from asyncrunner.db.loading import BackgroundLoad, Progress


class LoadFeed:
    """How far a background load has committed, as the event loop last heard."""

    def __init__(self, progress: Progress, max_narratives: int | None) -> None:
        self.limit = max_narratives
        self.progress = progress
        self.version = 0
        self._changed: anyio.Event | None = None

    @property
    def finished(self) -> bool:
        return self.progress.finished

    @property
    def total(self) -> int:
        """Narratives in the experiment so far (final once `complete`)."""
        n = self.progress.n_narratives
        return n if self.limit is None else min(n, self.limit)

    @property
    def complete(self) -> bool:
        """No narrative of the experiment is still to come."""
        return self.progress.finished or self.progress.cutoff is not None

    @property
    def bound(self) -> int:
        """The highest narrative_id of the experiment the producer may read now."""
        p = self.progress
        return p.cutoff if p.cutoff is not None else p.upto

    def advance(self, progress: Progress) -> None:
        self.progress = progress
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_past(self, version: int) -> None:
        """Until the feed has moved on from `version`."""
        while self.version == version:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()


async def keep_loading(load: BackgroundLoad, feed: LoadFeed, db_path: str | Path,
                       on_loaded: Callable[[IngestReport], None] | None = None) -> None:
    """Commit the rest of the load, step by step (a load stopped halfway is closed by the
    session that began it). `on_loaded`: the final report."""
    while not feed.finished:
        # Not abandoned on cancel: the step in hand commits or rolls back whole first.
        feed.advance(await anyio.to_thread.run_sync(load.step, db_path))
    if on_loaded is not None:
        on_loaded(load.report)
