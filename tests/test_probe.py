"""The response-format probe over real HTTP against the simulator: fall back, accept, fail fast."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from asyncrunner.llm.answer_schema import FormatVerdict, response_format_payload
from asyncrunner.llm.client import ClientSettings, make_http_client
from asyncrunner.llm.probe import ProbeError, ProbeResult, probe
from asyncrunner.sim import FaultConfig, MockServer

SYSTEM = "Answer with a JSON object."
TEMPLATE = "Narrative:\n<<TEXT>>"


def settings(url: str, **kw: Any) -> ClientSettings:
    return ClientSettings(api_url=url, model="mock-classifier", temperature=0.0,
                          max_tokens=256, timeout_s=5, max_attempts=2, seed=7,
                          backoff_base_s=0.0, **kw)


@asynccontextmanager
async def serving(**kw: Any) -> AsyncIterator[MockServer]:
    async with MockServer(**kw) as server:
        yield server


async def run_probe(server: MockServer, setting: str | None = "auto",
                    **kw: Any) -> ProbeResult:
    async with make_http_client(1, 5.0) as http:
        return await probe(settings(server.base_url, **kw), http, SYSTEM, TEMPLATE,
                           setting=setting)


async def test_auto_takes_json_schema_and_the_schema_arrives_verbatim() -> None:
    async with serving() as server:
        result = await run_probe(server)
        stats = server.stats()
    assert result.mode == "json_schema" and result.summary() == "response_format: json_schema"
    assert [t.verdict for t in result.tries] == [FormatVerdict.ACCEPTED]
    assert result.tries[0].parsed is True
    assert stats.completion_requests == 1
    assert stats.last_response_format == response_format_payload("json_schema", 256)
    assert stats.by_response_format == {"json_schema": 1}
    assert (result.tries[0].prompt_tokens, result.tries[0].completion_tokens) == (
        stats.prompt_tokens, stats.completion_tokens)


@pytest.mark.parametrize(("rejected", "mode"), [
    (("json_schema",), "json_object"),
    (("json_schema", "json_object"), "none"),
    (("json_object",), "json_schema"),
])
async def test_auto_falls_back_when_the_endpoint_rejects_the_field(
        rejected: tuple[str, ...], mode: str) -> None:
    async with serving(reject_response_formats=rejected) as server:
        result = await run_probe(server)
        stats = server.stats()
    assert result.mode == mode
    assert [t.verdict for t in result.tries[:-1]] == [FormatVerdict.UNSUPPORTED] * (
        len(result.tries) - 1)
    assert stats.completion_requests == len(result.tries)   # a 400 is not retried
    if "json_schema" in rejected:
        assert "json_schema: unsupported, HTTP 400: JSON schema conversion failed" in (
            result.summary())
    assert stats.last_response_format == response_format_payload(mode, 256)


async def test_an_explicit_mode_the_endpoint_rejects_fails_fast() -> None:
    async with serving(reject_response_formats=("json_schema",)) as server:
        with pytest.raises(ProbeError) as info:
            await run_probe(server, setting="json_schema")
        assert server.stats().completion_requests == 1
    assert info.value.fatal and "refuses response_format json_schema" in str(info.value)


@pytest.mark.parametrize(("status", "words"), [
    (401, "API key"), (403, "access"), (404, "model"),
])
async def test_bad_key_or_model_stops_the_probe_after_one_request(status: int,
                                                                  words: str) -> None:
    async with serving(fail_status=status) as server:
        with pytest.raises(ProbeError) as info:
            await run_probe(server)
        assert server.stats().completion_requests == 1
    assert info.value.fatal and words in str(info.value)
    assert f"HTTP {status}" in str(info.value) and "\n" not in str(info.value)


async def test_a_wrong_api_key_is_a_401() -> None:
    async with serving(api_key="sk-right") as server:
        with pytest.raises(ProbeError) as info:
            await run_probe(server, api_key="sk-wrong")
        assert "API key" in str(info.value)
        assert (await run_probe(server, api_key="sk-right")).mode == "json_schema"


async def test_an_endpoint_that_only_errs_is_unavailable_not_fatal() -> None:
    async with serving(faults=FaultConfig(error_rate=1.0)) as server:
        with pytest.raises(ProbeError) as info:
            await run_probe(server)
        # every mode tried, each with the client's retries (max_attempts 2)
        assert server.stats().completion_requests == 6
    assert not info.value.fatal and "did not answer" in str(info.value)
    assert [t.verdict for t in info.value.tries] == [FormatVerdict.UNAVAILABLE] * 3


async def test_the_probe_uses_the_run_settings() -> None:
    async with serving() as server:
        result = await run_probe(server, system_role="user", setting="json_object")
        stats = server.stats()
    assert result.mode == "json_object" and stats.last_seed == 7
    assert stats.by_response_format == {"json_object": 1}
