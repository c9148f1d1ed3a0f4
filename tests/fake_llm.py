"""A scriptable in-process LLM endpoint for pipeline and session tests.

`FakeLLM` is an async handler for `httpx.MockTransport`: it answers chat completions with the
same keyword rule as the simulator, counts requests, and can be told to fail, hang, or call a
hook after the n-th request (to stop a run at an exact point). It is the HTTP boundary and
nothing else: everything behind it (client, workers, writer, SQLite) is the real code.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx

from asyncrunner.llm.probe import PROBE_TEXT

CUES = ("boyfriend", "husband", "wife", "partner", "domestic", "abuse", "restraining order")


def answer_for(text: str) -> dict[str, object]:
    hits = [cue for cue in CUES if cue in text.lower()]
    return {"detected": bool(hits), "confidence": 0.9 if hits else 0.2,
            "indicators": hits, "rationale": "keyword rule"}


def completion(content: str, *, finish_reason: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={
        "choices": [{"message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10}})


class FakeLLM:
    """`fail(text) -> status | (status, message) | None` decides per narrative text; `hang`
    blocks every
    request until cancelled, `hang_from` every request from that number on; `after(n, hook)`
    calls `hook` when the n-th request arrives.

    The session's response-format probe (one request before the narratives, its user turn
    holding probe.PROBE_TEXT) is counted in `probes`, not in `requests`, and answered like
    any other request (the `fail` rule sees its text too); `requests`, the hooks and
    `bodies` are the narratives' requests, `probe_bodies` the probe's."""

    def __init__(self, *, fail: Callable[[str], int | tuple[int, str] | None] | None = None,
                 hang: bool = False, hang_from: int | None = None,
                 delay_s: float = 0.0) -> None:
        self.fail = fail
        self.hang = hang
        self.hang_from = hang_from
        self.delay_s = delay_s
        self.requests = 0
        self.probes = 0
        self.probe_bodies: list[dict[str, object]] = []
        self.bodies: list[dict[str, object]] = []
        self.temperatures: Counter[float] = Counter()
        self.by_status: Counter[int] = Counter()
        self._hooks: dict[int, Callable[[], None]] = {}

    def after(self, n: int, hook: Callable[[], None]) -> FakeLLM:
        self._hooks[n] = hook
        return self

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        text = body["messages"][-1]["content"]
        if PROBE_TEXT in text:
            self.probes += 1
            self.probe_bodies.append(body)
        else:
            self.requests += 1
            hook = self._hooks.pop(self.requests, None)
            if hook is not None:
                hook()
            self.bodies.append(body)
        self.temperatures[body.get("temperature")] += 1
        if self.hang or (self.hang_from is not None and self.requests >= self.hang_from):
            await anyio.sleep_forever()
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        failure = self.fail(text) if self.fail else None
        if failure is not None:
            status, message = failure if isinstance(failure, tuple) else (failure, None)
            self.by_status[status] += 1
            return httpx.Response(status, json={"error": {
                "message": message or f"scripted {status}"}})
        self.by_status[200] += 1
        return completion(json.dumps(answer_for(text)))


def result_keys(db: Path, experiment_id: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT incident_id, narrative_type FROM narrative_results WHERE experiment_id = ? "
            "ORDER BY incident_id, narrative_type", (experiment_id,)).fetchall()
    finally:
        conn.close()
    return [(str(a), str(b)) for a, b in rows]


def experiment_row(db: Path, experiment_id: str) -> dict[str, object]:
    conn = sqlite3.connect(db)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM experiments WHERE experiment_id = ?",
                           (experiment_id,)).fetchone()
        return dict(row)
    finally:
        conn.close()
