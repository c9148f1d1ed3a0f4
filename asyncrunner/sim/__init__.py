"""The built-in simulated LLM: an OpenAI-compatible chat-completions server with faults.

    model.py    the deterministic keyword "model" and its answer JSON (per model name,
                temperature and seed for models other than the reference one)
    faults.py   FaultConfig, the seeded fault draws, what each fault looks like, the
                refusals of a whole endpoint (response_format, 401/403/404)
    api.py      the chat-completions JSON: request body in (model, sampling, response_format,
                repair turns), completion and errors out
    http.py     the HTTP/1.1 wire layer (asyncio.Protocol), connection counts
    server.py   MockServer, routing, capacity queue, statistics, `serve_forever`
    batch.py    the Batch API (/v1/files, /v1/batches): batches on a clock, partial
                failures, expiry, output and error files, counters
    synth.py    synthetic sample data (`python -m asyncrunner.sim.synth`), not imported here

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

from .batch import BatchOptions, BatchStats
from .faults import FaultConfig
from .model import (
    IPV_CUES,
    NOISE_PERCENT,
    REFERENCE_MODEL,
    Classification,
    classify_text,
    find_cues,
)
from .server import MockServer, ServerStats, serve_forever

__all__ = [
    "IPV_CUES",
    "NOISE_PERCENT",
    "REFERENCE_MODEL",
    "BatchOptions",
    "BatchStats",
    "Classification",
    "FaultConfig",
    "MockServer",
    "ServerStats",
    "classify_text",
    "find_cues",
    "serve_forever",
]
