"""Shared fixtures: a real mock LLM server on 127.0.0.1, config files, CLI runners."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml

from asyncrunner.sim import FaultConfig, MockServer

ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """A MockServer on its own event loop in a thread, so sync tests can drive the CLI."""

    def __init__(self, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = MockServer(**kwargs)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> MockServer:
        self.thread.start()
        fut: Future[int] = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        fut.result(timeout=10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """The console log lines of in-process runs (logs.configure), restored afterwards."""
    from asyncrunner import logs

    sink = io.StringIO()
    logs.configure(console=sink)
    yield sink
    logs.configure()


@pytest.fixture
def mock_server() -> Iterator[MockServer]:
    with ServerThread() as server:
        yield server


@pytest.fixture
def server_factory() -> Iterator[Any]:
    started: list[ServerThread] = []

    def make(**kwargs: Any) -> MockServer:
        st = ServerThread(**kwargs)
        started.append(st)
        return st.__enter__()

    yield make
    for st in started:
        st.__exit__()


# Narratives whose mock answers are known: the mock's keyword rule flags IPV cues.
FIXTURE_ROWS = [
    # IncidentID, LE text, CME text, LE flag, CME flag, case flag
    ("00101", "Her boyfriend was arrested after a domestic argument.", "Decedent found at home.",
     "1", "0", "yes"),
    ("00102", "Found in the garage by a neighbour.", "No notes were found at the scene.",
     "0", "0", "no"),
    ("103", "History of abuse by her husband per the family.", "", "1", "", "1"),
    ("104", "The decedent lived alone and had lost his job.", "Husband reported prior abuse.",
     "0", "0", "0"),
    ("105", "Ex-wife obtained a restraining order last month.", "Toxicology pending.",
     "no", "yes", "yes"),
]


def write_fixture_csv(path: Path, rows: list[tuple[str, ...]] = FIXTURE_ROWS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE",
                    "ManualFlagCME", "ManualFlag"])
        w.writerows(rows)
    return path


def write_config(tmp_path: Path, data_file: Path, api_url: str, *, name: str = "cfg.yaml",
                 model: dict[str, Any] | None = None, **run: Any) -> Path:
    cfg = {
        "experiment": {"name": "test"},
        "model": {"name": "mock-classifier", "provider": "openai", "api_url": api_url,
                  "api_key_env": "ASYNCRUNNER_TEST_KEY", "temperature": 0.0,
                  "timeout_s": 5} | (model or {}),
        "data": {"file": str(data_file)},
        "run": {"workers": 4, "batch_size": 5, "output_dir": str(tmp_path / "out"),
                "log_dir": str(tmp_path / "logs"), "retry_backoff_s": 0.01} | run,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RESUME", "EXPERIMENT_ID", "RETRY_ERRORS_ONLY", "EXPERIMENTS_DB")
           and not k.startswith("ASYNCRUNNER_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command in a real process, as an operator's script runs it."""
    return subprocess.run([sys.executable, "-m", "asyncrunner", *args], capture_output=True,
                          text=True, env=env or cli_env(), cwd=cwd or ROOT, timeout=timeout)


def experiment_id_from(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("experiment_id: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no experiment_id line in output:\n{stdout}")


__all__ = [
    "FIXTURE_ROWS",
    "FaultConfig",
    "ServerThread",
    "cli_env",
    "experiment_id_from",
    "run_cli",
    "write_config",
    "write_fixture_csv",
]
