"""The simulator's Batch API: files in, batches that run on a clock, output and error files out.

    POST /v1/files                  multipart form (purpose=batch, file=JSONL) -> file object
    GET  /v1/files/{id}             the file object
    GET  /v1/files/{id}/content     the file's bytes
    POST /v1/batches                {input_file_id, endpoint, completion_window} -> batch
    GET  /v1/batches                every batch, newest first (no paging: has_more false)
    GET  /v1/batches/{id}           the batch as of now
    POST /v1/batches/{id}/cancel    cancelled now, with the lines answered so far

A batch's life runs on the clock from its creation, by the `BatchOptions` in force then:
`validating` for the first tenth of `delay_s`, `in_progress` until `delay_s` (its lines
answered evenly over that time, as `request_counts` shows), then `completed`. With
`expire_after_s` below `delay_s` it ends `expired` at that age instead, holding the lines
answered by then; every other line is an error line with code `batch_expired` (a cancel:
`batch_cancelled`). An input file that is not batch JSONL (a line that is not a JSON object,
a missing or repeated custom_id, another method or url) fails the batch at validation:
status `failed` with `errors`, no files.

Every line is answered on creation by `answer` (server.py: the chat endpoint's own model,
faults and refusals): a 200 goes to the output file, any other status to the error file,
and `None` (a request the model never answered) to the error file as `request_timeout`.
The line formats are OpenAI's, which `vllm run-batch` writes too:

    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
    {"id", "custom_id", "response": null, "error": {"code", "message"}}

Counters (`BatchStats`) let tests assert how many files and batches a client made. Pure
bookkeeping on the server's event loop: no I/O, no tasks, no timers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .api import error_response, json_response
from .http import HttpResponse

BATCH_ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOWS = frozenset({"24h"})
VALIDATING_SHARE = 0.1            # of delay_s spent validating
WINDOW_S = 24 * 3600

# A batch line's answer: (HTTP status, decoded body), or None for no answer at all.
Answer = Callable[[Any], tuple[int, Any] | None]

TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How the batches created from now on behave."""

    delay_s: float = 0.0                   # creation -> completed
    expire_after_s: float | None = None    # expire at this age instead (if below delay_s)

    def __post_init__(self) -> None:
        if self.delay_s < 0 or (self.expire_after_s is not None and self.expire_after_s < 0):
            raise ValueError("batch delay_s and expire_after_s must be >= 0")


@dataclass(frozen=True, slots=True)
class BatchStats:
    files_uploaded: int = 0
    batches_created: int = 0
    batch_polls: int = 0           # GET /v1/batches/{id}
    file_downloads: int = 0        # GET /v1/files/{id}/content
    batch_lines: int = 0           # request lines of the batches created


@dataclass(slots=True)
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose}


@dataclass(slots=True)
class _Line:
    custom_id: str
    answer: tuple[int, Any] | None


@dataclass(slots=True)
class _Batch:
    id: str
    input_file_id: str
    window: str
    options: BatchOptions
    started: float                  # time.monotonic() at creation
    created_at: int
    lines: list[_Line]
    metadata: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    status: str | None = None       # once ended; before that it follows the clock
    answered: int = 0               # lines answered when it ended
    ended_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None


class BatchApi:
    """The files and batches of one simulated server (see the module docstring)."""

    def __init__(self, answer: Answer, options: BatchOptions | None = None) -> None:
        self.answer = answer
        self.options = options or BatchOptions()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = 0
        self._stats: dict[str, int] = {}

    def stats(self) -> BatchStats:
        return BatchStats(**self._stats)

    def reset_stats(self) -> None:
        self._stats.clear()

    def _count(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + n

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-mock-{self._ids}"

    # -- routing -------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[str, HttpResponse]:
        """(outcome name for the server's counters, the answer) of one request whose path
        starts with /v1/files or /v1/batches (or the same without /v1)."""
        parts = [p for p in path.split("/") if p]
        if parts and parts[0] == "v1":
            parts = parts[1:]
        route = (method, parts[0] if parts else "", len(parts), parts[-1] if parts else "")
        if route[:3] == ("POST", "files", 1):
            return "file_upload", self._upload(headers, body)
        if route[:3] == ("GET", "files", 2):
            return "file", self._file(parts[1])
        if route[:3] == ("GET", "files", 3) and route[3] == "content":
            return "file_content", self._content(parts[1])
        if route[:3] == ("POST", "batches", 1):
            return "batch_create", self._create(body)
        if route[:3] == ("GET", "batches", 1):
            return "batch_list", json_response(200, {
                "object": "list", "has_more": False,
                "data": [self._view(b) for b in reversed(self._batches.values())]})
        if route[:3] == ("GET", "batches", 2):
            return "batch_poll", self._poll(parts[1])
        if route[:3] == ("POST", "batches", 3) and route[3] == "cancel":
            return "batch_cancel", self._cancel(parts[1])
        return "not_found", error_response(404, f"no route for {method} {path[:100]}",
                                           "invalid_request_error")

    # -- files ---------------------------------------------------------------------------

    def _upload(self, headers: Mapping[str, str], body: bytes) -> HttpResponse:
        try:
            form = parse_multipart(headers.get("content-type", ""), body)
        except ValueError as exc:
            return _bad_request(str(exc))
        purpose = form.get("purpose")
        upload = form.get("file")
        if upload is None:
            return _bad_request("missing form field 'file'")
        if purpose is None or purpose[1].decode("utf-8", "replace") != "batch":
            return _bad_request("form field 'purpose' must be 'batch'")
        f = _File(self._new_id("file"), upload[0] or "upload.jsonl", "batch", upload[1],
                  int(time.time()))
        self._files[f.id] = f
        self._count("files_uploaded")
        return json_response(200, f.to_json())

    def _file(self, file_id: str) -> HttpResponse:
        f = self._files.get(file_id)
        if f is None:
            return _not_found(f"no such file: {file_id[:100]}")
        return json_response(200, f.to_json())

    def _content(self, file_id: str) -> HttpResponse:
        f = self._files.get(file_id)
        if f is None:
            return _not_found(f"no such file: {file_id[:100]}")
        self._count("file_downloads")
        return HttpResponse(200, f.data, "application/octet-stream")

    def _store(self, filename: str, data: bytes, purpose: str) -> str:
        f = _File(self._new_id("file"), filename, purpose, data, int(time.time()))
        self._files[f.id] = f
        return f.id

    # -- batches -------------------------------------------------------------------------

    def _create(self, body: bytes) -> HttpResponse:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _bad_request("request body is not valid JSON")
        if not isinstance(request, dict):
            return _bad_request("request body must be a JSON object")
        input_file_id = request.get("input_file_id")
        f = self._files.get(input_file_id) if isinstance(input_file_id, str) else None
        if f is None:
            return _bad_request(f"input_file_id {str(input_file_id)[:100]!r} is not a file")
        if request.get("endpoint") != BATCH_ENDPOINT:
            return _bad_request(f"endpoint must be {BATCH_ENDPOINT}")
        window = request.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            return _bad_request("completion_window must be one of "
                                + ", ".join(sorted(COMPLETION_WINDOWS)))
        lines, errors = _read_input(f.data)
        batch = _Batch(self._new_id("batch"), f.id, str(window), self.options,
                       time.monotonic(), int(time.time()), [], request.get("metadata"),
                       errors)
        if not errors:
            batch.lines = [_Line(custom_id, self.answer(body)) for custom_id, body in lines]
        self._batches[batch.id] = batch
        self._count("batches_created")
        self._count("batch_lines", len(lines))
        return json_response(200, self._view(batch))

    def _poll(self, batch_id: str) -> HttpResponse:
        batch = self._batches.get(batch_id)
        if batch is None:
            return _not_found(f"no such batch: {batch_id[:100]}")
        self._count("batch_polls")
        return json_response(200, self._view(batch))

    def _cancel(self, batch_id: str) -> HttpResponse:
        batch = self._batches.get(batch_id)
        if batch is None:
            return _not_found(f"no such batch: {batch_id[:100]}")
        self._advance(batch, time.monotonic())
        if batch.status is None:
            self._end(batch, "cancelled",
                      self._answered_by(batch, time.monotonic() - batch.started))
        return json_response(200, self._view(batch))

    def _answered_by(self, batch: _Batch, age: float) -> int:
        """Lines answered at this age: a share of them, the batch's age over its delay.
        An age, not a clock reading: (started + expire_after) - started need not be
        expire_after in floating point, and one line more or less must not depend on it."""
        delay = batch.options.delay_s
        if age >= delay:
            return len(batch.lines)
        return int(len(batch.lines) * age / delay)

    def _advance(self, batch: _Batch, now: float) -> str:
        """The batch's status now; ends it (files written) when its time has come."""
        if batch.status is not None:
            return batch.status
        if batch.errors:
            batch.status, batch.ended_at = "failed", int(time.time())
            return batch.status
        opts = batch.options
        age = now - batch.started
        if opts.expire_after_s is not None and opts.expire_after_s < opts.delay_s \
                and age >= opts.expire_after_s:
            self._end(batch, "expired", self._answered_by(batch, opts.expire_after_s))
        elif age >= opts.delay_s:
            self._end(batch, "completed", len(batch.lines))
        else:
            return ("validating" if age < opts.delay_s * VALIDATING_SHARE
                    else "in_progress")
        assert batch.status is not None
        return batch.status

    def _end(self, batch: _Batch, status: str, answered: int) -> None:
        out: list[bytes] = []
        err: list[bytes] = []
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for i, line in enumerate(batch.lines):
            if i >= answered:
                err.append(_error_line(self._new_id("batch_req"), line.custom_id, code or "",
                                       f"the batch was {status} before this request ran"))
            elif line.answer is None:
                err.append(_error_line(self._new_id("batch_req"), line.custom_id,
                                       "request_timeout", "the model did not answer in time"))
            else:
                status_code, body = line.answer
                target = out if status_code == 200 else err
                target.append(_response_line(self._new_id("batch_req"), line.custom_id,
                                             status_code, body))
        batch.status, batch.answered, batch.ended_at = status, answered, int(time.time())
        if out:
            batch.output_file_id = self._store(f"{batch.id}_output.jsonl", b"".join(out),
                                               "batch_output")
        if err:
            batch.error_file_id = self._store(f"{batch.id}_error.jsonl", b"".join(err),
                                              "batch_output")

    def _view(self, batch: _Batch) -> dict[str, Any]:
        now = time.monotonic()
        status = self._advance(batch, now)
        answered = (batch.answered if batch.status is not None
                    else self._answered_by(batch, now - batch.started))
        done = batch.lines[:answered]
        ok = sum(1 for line in done if line.answer is not None and line.answer[0] == 200)
        failed = len(done) - ok
        view: dict[str, Any] = {
            "id": batch.id, "object": "batch", "endpoint": BATCH_ENDPOINT,
            "errors": ({"object": "list", "data": batch.errors} if batch.errors else None),
            "input_file_id": batch.input_file_id, "completion_window": batch.window,
            "status": status, "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id, "created_at": batch.created_at,
            "expires_at": batch.created_at + WINDOW_S,
            "request_counts": {"total": len(batch.lines), "completed": ok,
                               "failed": failed},
            "metadata": batch.metadata,
        }
        if batch.ended_at is not None:
            view[f"{status}_at"] = batch.ended_at
        return view


def _read_input(data: bytes) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
    """(custom_id, body) per request line, or the validation errors (OpenAI's shape)."""
    lines: list[tuple[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        problem = None
        try:
            item = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            item, problem = None, "line is not valid JSON"
        if problem is None and not isinstance(item, dict):
            problem = "line is not a JSON object"
        elif problem is None and isinstance(item, dict):
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                problem = "custom_id is missing"
            elif custom_id in seen:
                problem = f"custom_id {custom_id[:100]!r} is repeated"
            elif item.get("method") != "POST" or item.get("url") != BATCH_ENDPOINT:
                problem = f"method must be POST and url {BATCH_ENDPOINT}"
            elif not isinstance(item.get("body"), dict):
                problem = "body must be a JSON object"
            else:
                seen.add(custom_id)
                lines.append((custom_id, item["body"]))
        if problem is not None:
            errors.append({"code": "invalid_request", "message": problem, "line": number,
                           "param": None})
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file holds no requests",
                       "line": None, "param": None})
    return lines, errors


def _response_line(line_id: str, custom_id: str, status: int, body: Any) -> bytes:
    return (json.dumps({"id": line_id, "custom_id": custom_id,
                        "response": {"status_code": status, "request_id": f"req-{line_id}",
                                     "body": body},
                        "error": None}) + "\n").encode()


def _error_line(line_id: str, custom_id: str, code: str, message: str) -> bytes:
    return (json.dumps({"id": line_id, "custom_id": custom_id, "response": None,
                        "error": {"code": code, "message": message}}) + "\n").encode()


def _bad_request(message: str) -> HttpResponse:
    return error_response(400, message, "invalid_request_error")


def _not_found(message: str) -> HttpResponse:
    return error_response(404, message, "invalid_request_error")


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (filename or None, value bytes)}, or
    ValueError saying what is wrong with it."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise ValueError("upload must be multipart/form-data")
    boundary = None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError("multipart/form-data without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    form: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("malformed multipart part")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        field_name, filename = _disposition(head.decode("latin-1"))
        if field_name is not None:
            form[field_name] = (filename, content)
    return form


def _disposition(head: str) -> tuple[str | None, str | None]:
    """(name, filename) from a part's Content-Disposition header."""
    for line in head.split("\r\n"):
        header, _, value = line.partition(":")
        if header.strip().lower() != "content-disposition":
            continue
        fields: dict[str, str] = {}
        for item in value.split(";")[1:]:
            key, _, text = item.strip().partition("=")
            fields[key.lower()] = text.strip().strip('"')
        return fields.get("name"), fields.get("filename")
    return None, None
