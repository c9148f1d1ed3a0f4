"""The error vocabulary of asyncrunner.

Only the CLI turns these into exit codes; everything below it raises them.

    AsyncRunnerError                 base; never raised itself
    ├── UsageError          exit 2   bad flags, bad config, bad input file
    │   ├── ConfigError              a YAML key, type or value is wrong
    │   └── InputError               the data file is missing, unreadable or lacks columns
    ├── RefusedError        exit 3   a guard said no: lock held, checksum mismatch,
    │                                completed experiment, unknown or malformed id
    ├── RunFailed           exit 1   the run stopped on an unexpected error (status 'failed')
    ├── EndpointCannotServe exit 4   the endpoint cannot serve the run (401/403/404, a refused
    │                                request field, the circuit breaker): status 'interrupted',
    │                                everything received is stored, resumable
    ├── DiskFull            exit 1   the disk filled up during a run: status 'interrupted',
    │                                every committed result kept, resumable once space is freed
    ├── TooManyErrors       exit 4   the run completed, but its error share is above
    │                                run.max_error_share (raised after the report is written)
    └── Stopped             130/143  SIGINT / SIGTERM after a clean checkpoint

Request failures never become exceptions that leave a worker: the client turns them into
`RequestFailure` values (see client.py) that are stored as error rows.
"""

from __future__ import annotations

import signal


class AsyncRunnerError(Exception):
    """Base of every error the CLI knows how to report in one line."""

    exit_code = 1


class UsageError(AsyncRunnerError):
    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown, mistyped or invalid; the message names it."""


class InputError(UsageError):
    """The data file cannot be used; the message names the file or column."""


class RefusedError(AsyncRunnerError):
    """A guard refused to let the command go on; the message says what to do."""

    exit_code = 3


class RunFailed(AsyncRunnerError):
    exit_code = 1


class EndpointCannotServe(AsyncRunnerError):
    """The endpoint cannot serve this run; the message says what it said and what to check."""

    exit_code = 4


class DiskFull(AsyncRunnerError):
    """A write failed for lack of disk space; the message says how much is free where."""

    exit_code = 1


class TooManyErrors(AsyncRunnerError):
    """The run completed with more errors than run.max_error_share allows. `summary` is what
    the session returns otherwise (its RunSummary), for the CLI to report as usual."""

    exit_code = 4

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class Stopped(AsyncRunnerError):
    """The run stopped on a signal after committing everything it had."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; progress is committed, resume to continue")

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum
