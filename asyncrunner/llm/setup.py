"""The client side of a configuration: the endpoints a run sends to and its client
settings, built once here for the run (session) and for `plan`'s probe (estimate)."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from asyncrunner.config import Config
from asyncrunner.errors import ConfigError
from asyncrunner.llm.client import ClientSettings, endpoint_settings
from asyncrunner.llm.router import EndpointSettings


def endpoints_from(cfg: Config, env: Mapping[str, str]) -> tuple[EndpointSettings, ...]:
    """model.endpoints, or model.api_url alone; each key read from its endpoint's
    api_key_env, else model.api_key_env (never stored or logged)."""
    m = cfg.model

    def key(name: str | None) -> str | None:
        return (env.get(name) if name else None) or None

    found: tuple[EndpointSettings, ...]
    if not m.endpoints:
        found = (endpoint_settings(m.api_url, api_key=key(m.api_key_env)),)
    else:
        found = tuple(endpoint_settings(e["api_url"], weight=float(e.get("weight") or 1.0),
                                        max_concurrency=e.get("max_concurrency"),
                                        api_key=key(e.get("api_key_env") or m.api_key_env))
                      for e in m.endpoints)
    for i, endpoint in enumerate(found):
        if endpoint.api_key and httpx.URL(endpoint.api_url).userinfo:
            # Basic auth from the URL and a bearer key cannot both go in one request.
            where = f"model.endpoints[{i}].api_url" if m.endpoints else "model.api_url"
            raise ConfigError(f"config key '{where}' carries user:password and an API key is "
                              "set too; use one of them (api_key_env: null keeps the URL's)")
    return found


def client_settings(cfg: Config, env: Mapping[str, str]) -> ClientSettings:
    """The run's client settings; api_url and api_key are the first endpoint's (the pool
    itself is built from endpoints_from)."""
    m, r = cfg.model, cfg.run
    first = endpoints_from(cfg, env)[0]
    return ClientSettings(
        api_url=first.api_url, model=m.name, temperature=m.temperature,
        max_tokens=m.max_tokens, timeout_s=m.timeout_s, max_attempts=r.max_attempts,
        seed=r.seed, api_key=first.api_key,
        # the setting (auto...) until the probe has chosen the mode actually sent
        response_format=None if m.response_format in (None, "none") else m.response_format,
        extra_body=dict(m.extra_body or {}), backoff_base_s=r.retry_backoff_s,
        max_retry_after_s=r.max_retry_after_s, system_role=cfg.prompt.system_role,
    )
