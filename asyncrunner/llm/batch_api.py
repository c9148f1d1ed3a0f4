"""The HTTP client of the OpenAI Batch API: files and batches at an OpenAI-compatible endpoint.

Owns the calls (upload a file, create / get / find a batch, download a file), the /v1 base
they hang off (`api_base`, derived from model.api_url), and the translation of every answer
into a payload or a `BatchApiError` that says whether trying again may help:

    no connection, timeout, 408/409/425/429, 5xx    -> transient: retried here, then raised
    an answer that is not a JSON object, or without
    the id / status the call needs                   -> transient: raised at once
    any other status; a file above
    model.max_response_bytes                         -> permanent: raised at once

It knows nothing of experiments or the database: the run loop (pipeline.batch) decides what
a failure means for a batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from asyncrunner import __version__
from asyncrunner.llm.answer_schema import error_message
from asyncrunner.llm.client import (
    RETRYABLE_STATUS,
    ClientSettings,
    HttpSender,
    ResponseTooLarge,
    http_timeouts,
    normalize_api_url,
)

BATCH_ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})   # a batch that ended
LIST_PAGES = 20                         # GET /v1/batches pages searched for a lost batch id


def api_base(api_url: str) -> str:
    """The /v1 base of model.api_url (a base ending in /v1 or the chat-completions URL)."""
    url = normalize_api_url(api_url)
    suffix = "/chat/completions"
    return url[: -len(suffix)] if url.endswith(suffix) else url


def request_counts(batch: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(completed, failed) of a batch object; None where the provider does not say."""
    counts = batch.get("request_counts")
    if not isinstance(counts, Mapping):
        return None, None
    done, failed = counts.get("completed"), counts.get("failed")
    return (done if isinstance(done, int) else None,
            failed if isinstance(failed, int) else None)


class BatchApiError(Exception):
    """A Batch API call failed; `transient` ones may succeed later."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class BatchApi:
    """Files and batches at an OpenAI-compatible endpoint, through the session's HTTP client.
    Transient failures (no connection, timeouts, 408/409/425/429, 5xx) are retried
    `max_attempts` times with exponential backoff; anything else raises at once."""

    def __init__(self, http: HttpSender, settings: ClientSettings) -> None:
        self.http = http
        self.base = api_base(settings.api_url)
        self.attempts = max(1, settings.max_attempts)
        self.backoff_s = settings.backoff_base_s
        headers = {"Accept": "application/json", "User-Agent": f"asyncrunner/{__version__}"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self.headers = headers
        self.timeouts = http_timeouts(settings.timeout_s)

    async def upload(self, filename: str, data: bytes) -> str:
        payload = await self._call("POST", "/files", files={
            "file": (filename, data, "application/jsonl")}, data={"purpose": "batch"})
        return str(_field(payload, "id", "file upload"))

    async def create(self, input_file_id: str, window: str,
                     metadata: Mapping[str, str]) -> dict[str, Any]:
        payload = await self._call("POST", "/batches", json={
            "input_file_id": input_file_id, "endpoint": BATCH_ENDPOINT,
            "completion_window": window, "metadata": dict(metadata)})
        _field(payload, "id", "batch creation")
        return payload

    async def get(self, batch_id: str) -> dict[str, Any]:
        payload = await self._call("GET", f"/batches/{batch_id}")
        _field(payload, "status", "batch poll")
        return payload

    async def find(self, input_file_id: str) -> dict[str, Any] | None:
        """The batch made from `input_file_id`, if the provider lists one."""
        after: str | None = None
        for _ in range(LIST_PAGES):
            params = {"limit": "100"} | ({"after": after} if after else {})
            payload = await self._call("GET", "/batches", params=params)
            data = payload.get("data") if isinstance(payload, dict) else None
            if not isinstance(data, list):
                return None
            for batch in data:
                if isinstance(batch, dict) and batch.get("input_file_id") == input_file_id:
                    return batch
            if not payload.get("has_more") or not data:
                return None
            after = str(data[-1].get("id")) if isinstance(data[-1], dict) else None
        return None

    async def content(self, file_id: str) -> bytes:
        response = await self._send("GET", f"/files/{file_id}/content")
        return response.content

    async def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = await self._send(method, path, **kw)
        try:
            payload = json.loads(response.content)
        except ValueError:
            raise BatchApiError(f"{method} {path}: the answer is not JSON",
                                transient=True) from None
        if not isinstance(payload, dict):
            raise BatchApiError(f"{method} {path}: the answer is not a JSON object",
                                transient=True)
        return payload

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        last: BatchApiError | None = None
        for attempt in range(1, self.attempts + 1):
            request = httpx.Request(method, self.base + path, headers=self.headers,
                                    extensions={"timeout": self.timeouts}, **kw)
            try:
                response = await self.http.send(request)
            except ResponseTooLarge as exc:
                raise BatchApiError(
                    f"{method} {path}: {exc}; raise model.max_response_bytes (batch output "
                    "files are large) and resume", transient=False) from None
            except httpx.TimeoutException:
                last = BatchApiError(f"{method} {path}: no answer in time", transient=True)
            except httpx.TransportError as exc:
                last = BatchApiError(f"{method} {path}: {type(exc).__name__}: connection "
                                     "failed or dropped", transient=True)
            else:
                if response.status_code == 200:
                    return response
                last = _status_error(method, path, response)
                if not last.transient:
                    raise last
            if attempt < self.attempts:
                await anyio.sleep(min(30.0, self.backoff_s * 2 ** (attempt - 1)))
        assert last is not None
        raise last


def _status_error(method: str, path: str, response: httpx.Response) -> BatchApiError:
    status = response.status_code
    text = response.content.decode("utf-8", "replace")
    message, _ = error_message(text)
    detail = " ".join((message or text).split())[:200] or "empty body"
    transient = status in RETRYABLE_STATUS or status >= 500
    hint = ""
    if status in (401, 403):
        hint = "; check model.api_key_env and the key"
    elif status == 404:
        hint = "; does this endpoint have the Batch API (/v1/files, /v1/batches)?"
    return BatchApiError(f"{method} {path}: HTTP {status}: {detail}{hint}",
                         transient=transient, status=status)


def _field(payload: Mapping[str, Any], name: str, what: str) -> Any:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise BatchApiError(f"{what}: the answer has no {name!r}", transient=True)
    return value
