"""The hand-out between the producer and its consumers: the rows of the pages read so far
that no consumer has taken yet, each given out as a `Narrative` when it is taken.

The producer puts a page in and waits until the rows left are down to `low`, then puts the
next page (which it has been reading meanwhile). A consumer takes the next row without a
trip round the event loop while there is one; only on an empty hand-out does it wait. With
`low` at the number of workers, the next page is in before any worker finds it empty.

A row not taken has not been started, exactly like a row of a page the producer still
holds: when the producer is stopped or fails, `end(drop=True)` discards what is left and
every consumer leaves at its next take. On a normal end the consumers take what is left and
then see `EndOfStream`. A consumer side that goes away (`close`) fails the producer's next
put or wait with `BrokenResourceError`, so a producer never waits for takers that are gone.

An anyio memory stream did this before, unbuffered: every narrative then cost both sides a
checkpoint, an event and a wake-up, a visible share of a run's CPU at 0 ms latency (#9).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio

from asyncrunner.pipeline.messages import Narrative

Row = Sequence[Any]   # narrative_id, incident_id, narrative_type, text, manual_flag_ind, flag


class Handout:
    def __init__(self, low: int = 0) -> None:
        if low < 0:
            raise ValueError("low must be >= 0")
        self.low = low
        self._rows: deque[Row] = deque()
        self._ended = False
        self._closed = False
        self._arrived: anyio.Event | None = None     # consumers wait for rows
        self._ran_low: anyio.Event | None = None     # the producer waits for room

    # --- the producer's side

    def put(self, rows: Sequence[Row]) -> None:
        self._check_open()
        if self._ended:
            raise anyio.ClosedResourceError
        self._rows.extend(rows)
        if rows:
            self._wake_consumers()

    async def wait_low(self) -> None:
        """Until at most `low` rows are left."""
        while len(self._rows) > self.low:
            self._check_open()
            if self._ran_low is None:
                self._ran_low = anyio.Event()
            await self._ran_low.wait()
        self._check_open()

    def end(self, *, drop: bool = False) -> None:
        """No more rows will come: consumers take what is left, then see EndOfStream.
        `drop`: the producer was stopped or failed: what is left is not taken either."""
        self._ended = True
        if drop:
            self._rows.clear()
        self._wake_consumers()

    # --- the consumers' side

    def take_nowait(self) -> Narrative | None:
        """The next narrative; None when there is none yet. EndOfStream once the producer
        has ended and nothing is left."""
        rows = self._rows
        if rows:
            row = rows.popleft()
            if self._ran_low is not None and len(rows) <= self.low:
                self._ran_low.set()
                self._ran_low = None
            return Narrative(row[0], row[1], row[2], row[3] or "", row[4], row[5])
        if self._ended or self._closed:
            raise anyio.EndOfStream
        return None

    async def take(self) -> Narrative:
        while True:
            narrative = self.take_nowait()
            if narrative is not None:
                return narrative
            if self._arrived is None:
                self._arrived = anyio.Event()
            await self._arrived.wait()

    def close(self) -> None:
        """The consumers are gone: the producer's next put or wait fails."""
        self._closed = True
        self._rows.clear()
        if self._ran_low is not None:
            self._ran_low.set()
            self._ran_low = None
        self._wake_consumers()

    def __aiter__(self) -> Handout:
        return self

    async def __anext__(self) -> Narrative:
        try:
            return await self.take()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Handout:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    # ---

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.BrokenResourceError

    def _wake_consumers(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None
