"""Configuration: YAML + environment + flags -> one frozen `Config`, validated once.

Precedence for every setting: command-line flag > environment variable > YAML > default.
Any scalar setting can come from the environment as ASYNCRUNNER_<SECTION>_<KEY>
(e.g. ASYNCRUNNER_RUN_WORKERS=16, ASYNCRUNNER_MODEL_API_URL=...). Secrets are never part
of the config: `model.api_key_env` names the variable that holds the key.

Whatever the YAML or environment holds, the result is a Config or a one-line ConfigError
naming the key: numbers within NUMERIC_RANGES (never inf or nan), model.api_url an
http(s) URL the client can post to, extra_body plain JSON. `unknown_env_variables` names
the ASYNCRUNNER_* variables nothing reads (for the CLI to warn about).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from asyncrunner.errors import ConfigError

TEXT_PLACEHOLDER = "<<TEXT>>"
DEFAULT_DB = "data/experiments.db"
PROVIDERS = ("openai", "mock", "openai-batch")
RESPONSE_FORMAT_SETTINGS = ("auto", "json_schema", "json_object", "none")
SYSTEM_ROLES = ("system", "user")
PARSE_RETRIES = ("repair", "resample", "off")
# Written into a stored configuration (config_json) by the session: the mode the probe chose.
# Not a setting: dropped when a stored configuration is rebuilt.
RESPONSE_FORMAT_USED = "response_format_used"
# Cell texts that stand for "no narrative" (compared trimmed, ignoring case); a text with no
# letter or digit at all (whitespace and punctuation only) is always blank as well.
DEFAULT_PLACEHOLDERS = ("N/A", "NA", ".", "-", "none", "unknown")


@dataclass(frozen=True, slots=True)
class ExperimentSection:
    name: str = "unnamed experiment"
    author: str | None = None
    notes: str | None = None


@dataclass(frozen=True, slots=True)
class ModelSection:
    name: str = "mock-classifier"
    provider: str = "openai"
    api_url: str = "http://localhost:1234/v1/chat/completions"
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    timeout_s: float = 120.0
    # auto | json_schema | json_object | none; empty (None) means none (older configs)
    response_format: str | None = "auto"
    extra_body: dict[str, Any] | None = None
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None
    max_response_bytes: int = 8 * 1024 * 1024
    # issue #13: servers of the same model, used together ([{api_url, weight,
    # max_concurrency, api_key_env}], instead of api_url); prices per million tokens
    # ({input, output}) for plan/status/report; the Batch API's limits
    endpoints: list[dict[str, Any]] | None = None
    price_per_mtok: dict[str, Any] | None = None
    batch_max_requests: int = 50_000       # requests per batch file (the API allows 50,000)
    batch_poll_s: float = 30.0             # how often a submitted batch is polled
    batch_window: str = "24h"              # completion_window of a batch


@dataclass(frozen=True, slots=True)
class PromptSection:
    version: str = "v1"
    system_prompt: str = (
        "You classify case narratives. Answer with a JSON object "
        '{"detected": bool, "confidence": 0..1, "indicators": [str], "rationale": str}.'
    )
    user_template: str = "Narrative:\n" + TEXT_PLACEHOLDER
    system_role: str = "system"         # system | user (system prompt opens the user turn)


@dataclass(frozen=True, slots=True)
class DataSection:
    file: str = "data/sample_narratives.xlsx"
    sheet: str | None = None
    id_column: str = "IncidentID"
    narratives: dict[str, str] = field(
        default_factory=lambda: {"LE": "NarrativeLE", "CME": "NarrativeCME"}
    )
    flags: dict[str, str] = field(
        default_factory=lambda: {"LE": "ManualFlagLE", "CME": "ManualFlagCME"}
    )
    case_flag: str | None = "ManualFlag"
    # issue #10: texts that count as blank (part of the ingest key, see ingest.mapping_json)
    placeholders: list[str] = field(default_factory=lambda: list(DEFAULT_PLACEHOLDERS))
    # issue #12: {n, stratify, seed}: a seeded, stratified random sample of the narratives
    # (its keys are stored with the experiment); None: all of them (up to max_narratives)
    sample: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RunSection:
    workers: int = 4
    batch_size: int = 100
    commit_interval_s: float = 2.0
    max_narratives: int | None = None
    seed: int | None = 1024
    max_attempts: int = 3
    retry_backoff_s: float = 0.5
    max_retry_after_s: float = 300.0    # a server's longer Retry-After is cut to this (and said)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    grace_period_s: float = 30.0
    parse_retry: str = "repair"         # repair | resample | off
    max_error_share: float = 0.2        # above it a finished run exits 4
    breaker_window: int = 50            # this many errors in a row stop the run (exit 4)
    auto_workers: bool = False          # --workers auto: find the concurrency (workers = cap)
    endpoint_down_s: float = 300.0      # no endpoint answered for this long: stop (exit 4)
    output_dir: str = "benchmark_results"
    log_dir: str = "logs/experiments"


@dataclass(frozen=True, slots=True)
class Config:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    model: ModelSection = field(default_factory=ModelSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
    source_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The full configuration as stored with an experiment. Holds no secret by design:
        the key itself is only ever read from the environment variable it names."""
        out = dataclasses.asdict(self)
        out.pop("source_path", None)
        return out


SECTIONS: dict[str, type] = {
    "experiment": ExperimentSection,
    "model": ModelSection,
    "prompt": PromptSection,
    "data": DataSection,
    "run": RunSection,
}


# Numeric keys: (lowest, highest, lowest allowed itself). Every int and float field of the
# sections must be listed (a test checks): a value outside, inf or nan is a typo or a unit
# mistake, and refusing it at load time beats a run that waits a day for one answer.
# Upper bounds are far above any real use; the seed's are SQLite's INTEGER range (it is
# stored in a column).
NUMERIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "model.temperature": (0, 2, True),
    "model.max_tokens": (1, 1_000_000, True),
    "model.timeout_s": (0, 86_400, False),
    "model.price_per_1k_input": (0, 1_000, True),
    "model.price_per_1k_output": (0, 1_000, True),
    "model.max_response_bytes": (1024, 1 << 30, True),
    "model.batch_max_requests": (1, 50_000, True),
    "model.batch_poll_s": (0, 3_600, False),
    "run.endpoint_down_s": (0, 86_400, False),
    "run.workers": (1, 1024, True),
    "run.batch_size": (1, 100_000, True),
    "run.commit_interval_s": (0, 3_600, False),
    "run.max_narratives": (1, 1_000_000_000, True),
    "run.seed": (-(2**63), 2**63 - 1, True),
    "run.max_attempts": (1, 100, True),
    "run.retry_backoff_s": (0, 3_600, True),
    "run.max_retry_after_s": (0, 86_400, True),
    "run.requests_per_minute": (0, 1_000_000, False),
    "run.tokens_per_minute": (0, 1_000_000_000, False),
    "run.grace_period_s": (0, 3_600, True),
    "run.max_error_share": (0, 1, True),
    "run.breaker_window": (1, 1_000_000_000, True),
}
# Keys that end up in a file-system call and in one-line messages ("data file X ...").
PATH_KEYS = ("data.file", "run.output_dir", "run.log_dir")
# Read by code outside this module (cli.py, bin/_venv.sh); named here so that a misspelling
# of them can be told apart from them (see unknown_env_variables).
OTHER_ENV_VARIABLES = ("ASYNCRUNNER_FILE_MODE", "ASYNCRUNNER_VENV")
ENV_PREFIX = "ASYNCRUNNER_"
# YAML 1.1 reads 1e3 (no dot) as text; for a number key it is plainly meant as a number.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_SHOWN = 60
# Far deeper than any request field; deep enough nesting would overflow the stack when the
# configuration is copied (dataclasses.asdict) or encoded.
_MAX_JSON_DEPTH = 32


def _short(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _value_text(value: object) -> str:
    """A value for a message: its repr, shortened (repr escapes line breaks and controls)."""
    if isinstance(value, int) and value.bit_length() > 200:
        # repr of a huge int is long, and beyond 4300 digits Python refuses to make one.
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    try:
        return _short(repr(value))
    except (ValueError, RecursionError):  # a huge int or a deep nesting inside a list
        return "..."


def _shown(key: object) -> str:
    """A key from the YAML as one short line: escapes instead of line breaks or controls."""
    text = key if isinstance(key, str) else repr(key)
    return _short(text if text.isprintable() else text.encode("unicode_escape").decode())


def _base_type(tp: Any) -> Any:
    """`X` of `X | None`; any other type as it is."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _type_name(tp: Any) -> str:
    tp = _base_type(tp)
    origin = typing.get_origin(tp) or tp
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return "a list of " + item.removeprefix("a ")
    return {str: "text", int: "a whole number", float: "a number", bool: "true or false",
            dict: "a mapping"}.get(origin, str(origin))


def _as_float(value: int | float | str) -> float:
    try:
        return float(value)
    except OverflowError:
        # An integer beyond float range: as absurd as inf, and refused as such by the
        # range check, which names the bounds.
        return math.inf if int(value) > 0 else -math.inf


def _check_json(key: str, value: Any, depth: int = 0) -> None:
    """extra_body is sent as JSON and stored as JSON: only what JSON holds, numbers finite
    (json.dumps would write NaN, which no server parses; a YAML date would not encode)."""
    if depth > _MAX_JSON_DEPTH:
        raise ConfigError(f"config key '{key}' is nested more than {_MAX_JSON_DEPTH} deep")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:  # beyond 64 bits no server reads it exactly
            raise ConfigError(f"config key '{key}' must be a whole number that fits in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(f"{key}[{i}]", item, depth + 1)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"config key '{key}' has a key that is not text: {_shown(k)}")
            _check_json(f"{key}.{_shown(k)}", item, depth + 1)
        return
    raise ConfigError(f"config key '{key}' holds {type(value).__name__} "
                      f"{_value_text(value)}, "
                      "which JSON cannot hold (use text, numbers, true/false, lists, mappings)")


def _text(key: str, value: str | int | float) -> str:
    try:
        return str(value)
    except ValueError:  # Python makes no text of an int beyond 4300 digits
        raise ConfigError(f"config key '{key}' must be text, got {_value_text(value)}") from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check one YAML/env value against a dataclass field type; name the key on failure."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, not empty")
    tp = _base_type(tp)
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        # 8.0 or 8.5 for a count is refused rather than rounded: it is not what was meant.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _as_float(value)
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return _as_float(value.strip())
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _text(key, value)
    elif origin is list and isinstance(value, (list, tuple)):
        (item_t,) = typing.get_args(tp) or (str,)
        if (typing.get_origin(item_t) or item_t) is dict:
            # model.endpoints: mappings, checked by their own normaliser
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ConfigError(f"config key '{key}[{i}]' must be a mapping")
            return [dict(item) for item in value]
        for i, item in enumerate(value):
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise ConfigError(f"config key '{key}[{i}]' must be text")
        return [_text(f"{key}[{i}]", item) for i, item in enumerate(value)]
    elif origin is dict and isinstance(value, Mapping):
        _, val_t = typing.get_args(tp) or (str, Any)
        if val_t is str:
            for k, v in value.items():
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    raise ConfigError(f"config key '{key}.{_shown(k)}' must be text")
            return {_text(f"{key} (a name)", k): _text(f"{key}.{_shown(k)}", v)
                    for k, v in value.items()}
        _check_json(key, value)
        return dict(value)
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, "
                      f"got {type(value).__name__} {_value_text(value)}")


def _env_value(raw: str, tp: Any) -> Any:
    """Environment values are text; parse them as YAML scalars so '16' is an int. A text
    key keeps the text as written (ASYNCRUNNER_EXPERIMENT_NAME=yes is the name "yes", not
    true), except that null/~ still mean empty, as in the YAML."""
    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        # ValueError: PyYAML builds dates from anything shaped like one (2024-13-45).
        return raw
    if _base_type(tp) is str and value is not None and not isinstance(value, str):
        return raw
    return value


def _build_section(name: str, cls: type, raw: Any, env: Mapping[str, str],
                   overrides: Mapping[str, Any]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section '{name}' must be a mapping")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints), key=str)  # YAML keys need not be text
    if unknown:
        raise ConfigError(f"unknown config key '{name}.{_shown(unknown[0])}' "
                          f"(known: {', '.join(sorted(hints))})")
    values: dict[str, Any] = {}
    for fname, tp in hints.items():
        key = f"{name}.{fname}"
        env_name = f"ASYNCRUNNER_{name}_{fname}".upper()
        if key in overrides and overrides[key] is not None:
            values[fname] = _coerce(key, overrides[key], tp)
        elif env_name in env:
            values[fname] = _coerce(env_name, _env_value(env[env_name], tp), tp)
        elif fname in raw:
            values[fname] = _coerce(key, raw[fname], tp)
    return cls(**values)


def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _check_range(key: str, value: float | None, optional: bool) -> None:
    if value is None:
        return
    low, high, low_allowed = NUMERIC_RANGES[key]
    # nan fails every comparison; ints are compared exactly (float() of a huge one overflows)
    above_low = value >= low if low_allowed else value > low
    if above_low and value <= high:
        return
    lo, hi = _number_text(low), _number_text(high)
    bounds = (f"between {lo} and {hi}" if low_allowed
              else f"more than {lo} and at most {hi}")
    empty = " (or empty)" if optional else ""
    raise ConfigError(f"config key '{key}' must be {bounds}{empty}, got {_value_text(value)}")


def _numeric_fields(cls: type) -> Iterable[tuple[str, bool]]:
    """(field name, may be empty) of every int or float field of a section."""
    for fname, tp in typing.get_type_hints(cls).items():
        if _base_type(tp) in (int, float):
            yield fname, type(None) in typing.get_args(tp)


def _check_numbers(cfg: Config) -> None:
    for section, cls in SECTIONS.items():
        for fname, optional in _numeric_fields(cls):
            _check_range(f"{section}.{fname}", getattr(getattr(cfg, section), fname), optional)


def _texts(cfg: Config) -> Iterable[tuple[str, str]]:
    """(key, text) of every text a section holds, dict keys and list items included."""
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            key, value = f"{section}.{f.name}", getattr(getattr(cfg, section), f.name)
            if isinstance(value, str):
                yield key, value
            elif isinstance(value, list):
                yield from ((f"{key}[{i}]", item) for i, item in enumerate(value)
                            if isinstance(item, str))
            elif isinstance(value, dict) and f.name != "extra_body":
                for k, v in value.items():
                    yield f"{key}.{_shown(k)}", f"{k}{v}"  # the name and its value


def _check_texts(cfg: Config) -> None:
    for key, text in _texts(cfg):
        # Never meant, and file and environment calls fail on it later with a bare
        # ValueError ("embedded null byte") instead of a message naming the key.
        if "\x00" in text:
            raise ConfigError(f"config key '{key}' must not contain a NUL character")
    for key in PATH_KEYS:
        section, fname = key.split(".")
        if any(ch in getattr(getattr(cfg, section), fname) for ch in "\r\n"):
            raise ConfigError(f"config key '{key}' must be a file path on one line")
    name = cfg.model.api_key_env
    if name and not _ENV_NAME.fullmatch(name):
        # The value is not shown: it may be the key itself, pasted in by mistake.
        raise ConfigError("config key 'model.api_key_env' must be the NAME of the environment "
                          "variable that holds the key (letters, digits, _), not the key")


def _api_url_problem(url: str) -> str | None:
    """Why `url` cannot be the chat-completions endpoint, or None. The URL itself is never
    part of the answer: it may carry a password or a key in its query."""
    if not url.strip():
        return "must be an http:// or https:// URL, not empty"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must not contain spaces or control characters"
    if "#" in url:
        return "must not have a #fragment (it is never sent to the server)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (check the host and port)"
    if parts.scheme.lower() not in ("http", "https"):
        return "must start with http:// or https://"
    host = parts.hostname or ""
    if not host or not all(ch.isalnum() or ch in "-._:" for ch in host):
        return "must name a host, as in http://localhost:1234/v1"
    if port == 0:
        return "must have a port between 1 and 65535"
    # Lazy: httpx is only needed here, and the client parses the URL with it; an URL it
    # cannot parse (e.g. a malformed international host name) must fail now, not mid-run.
    import httpx

    try:
        httpx.URL(url).host  # noqa: B018 - the host is decoded (IDNA) only when read
    except (httpx.InvalidURL, ValueError):
        return "is not a valid URL (check the host and port)"
    return None


def normalize_config_api_url(url: str) -> str:
    """model.api_url, checked, with a query string kept where the client will send it.

    The client appends /chat/completions to a URL ending in /v1 (normalize_api_url). A
    query string hides that ending (http://h/v1?api-version=1 would be posted to /v1), so
    the path is completed here, before the query: .../v1/chat/completions?api-version=1.
    A full URL with a query is left as it is; the client sends the query unchanged.
    """
    problem = _api_url_problem(url)
    if problem is not None:
        raise ConfigError(f"config key 'model.api_url' {problem}")
    if "?" not in url:
        return url
    base, query = url.split("?", 1)
    if base.rstrip("/").endswith("/v1"):
        base = base.rstrip("/") + "/chat/completions"
    return f"{base}?{query}" if query else base


SAMPLE_STRATA = ("narrative_type", "manual_flag_ind", "manual_flag")
SAMPLE_KEYS = ("n", "stratify", "seed")


def _normalize_sample(sample: dict[str, Any] | None) -> dict[str, Any] | None:
    """data.sample checked and completed: {"n": int, "stratify": [..], "seed": int}."""
    if sample is None:
        return None
    unknown = sorted(set(sample) - set(SAMPLE_KEYS), key=str)
    if unknown:
        raise ConfigError(f"unknown config key 'data.sample.{_shown(unknown[0])}' "
                          f"(known: {', '.join(SAMPLE_KEYS)})")
    n, seed = sample.get("n"), sample.get("seed", 0)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1_000_000_000:
        raise ConfigError("config key 'data.sample.n' must be a whole number between 1 and "
                          f"1000000000, got {_value_text(n)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
        raise ConfigError(f"config key 'data.sample.seed' must be a whole number, "
                          f"got {_value_text(seed)}")
    stratify = sample.get("stratify") or []
    if isinstance(stratify, str):
        stratify = [stratify]
    if not isinstance(stratify, list) or not all(s in SAMPLE_STRATA for s in stratify):
        raise ConfigError("config key 'data.sample.stratify' must be a list of "
                          f"{', '.join(SAMPLE_STRATA)}, got {_value_text(stratify)}")
    return {"n": n, "stratify": list(dict.fromkeys(stratify)), "seed": seed}


ENDPOINT_KEYS = ("api_url", "weight", "max_concurrency", "api_key_env")
BATCH_WINDOWS = ("24h",)


def _normalize_endpoints(endpoints: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """model.endpoints checked and completed: [{api_url, weight, max_concurrency,
    api_key_env}], URLs as the client will post to them."""
    if endpoints is None:
        return None
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError("config key 'model.endpoints' must be a list of "
                          "{api_url, weight, max_concurrency, api_key_env} mappings")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(endpoints):
        key = f"model.endpoints[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping with an api_url")
        unknown = sorted(set(raw) - set(ENDPOINT_KEYS), key=str)
        if unknown:
            raise ConfigError(f"unknown config key '{key}.{_shown(unknown[0])}' "
                              f"(known: {', '.join(ENDPOINT_KEYS)})")
        url = raw.get("api_url")
        if not isinstance(url, str):
            raise ConfigError(f"config key '{key}.api_url' must be text")
        problem = _api_url_problem(url)
        if problem is not None:
            raise ConfigError(f"config key '{key}.api_url' {problem}")
        weight = raw.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not 0 < weight <= 1000:
            raise ConfigError(f"config key '{key}.weight' must be more than 0 and at most "
                              f"1000, got {_value_text(weight)}")
        cap = raw.get("max_concurrency")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)
                                or not 1 <= cap <= 1024):
            raise ConfigError(f"config key '{key}.max_concurrency' must be between 1 and "
                              f"1024 (or empty), got {_value_text(cap)}")
        key_env = raw.get("api_key_env")
        if key_env is not None and (not isinstance(key_env, str)
                                    or not _ENV_NAME.fullmatch(key_env)):
            raise ConfigError(f"config key '{key}.api_key_env' must be the NAME of the "
                              "environment variable that holds the key")
        out.append({"api_url": normalize_config_api_url(url), "weight": float(weight),
                    "max_concurrency": cap, "api_key_env": key_env})
    urls = [e["api_url"] for e in out]
    if len(set(urls)) != len(urls):
        raise ConfigError("config key 'model.endpoints' names the same api_url twice")
    return out


def _normalize_prices(prices: dict[str, Any] | None) -> dict[str, Any] | None:
    if prices is None:
        return None
    unknown = sorted(set(prices) - {"input", "output"}, key=str)
    if unknown:
        raise ConfigError(f"unknown config key 'model.price_per_mtok.{_shown(unknown[0])}' "
                          "(known: input, output)")
    out: dict[str, Any] = {}
    for name in ("input", "output"):
        value = prices.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 10_000:
            raise ConfigError(f"config key 'model.price_per_mtok.{name}' must be between 0 "
                              f"and 10000, got {_value_text(value)}")
        out[name] = float(value)
    return out


def _validate(cfg: Config) -> None:
    m, p, d = cfg.model, cfg.prompt, cfg.data
    if m.provider not in PROVIDERS:
        raise ConfigError(f"config key 'model.provider' must be one of {', '.join(PROVIDERS)}")
    if TEXT_PLACEHOLDER not in p.user_template:
        raise ConfigError(
            f"config key 'prompt.user_template' must contain the placeholder {TEXT_PLACEHOLDER}"
        )
    if m.batch_window not in BATCH_WINDOWS:
        raise ConfigError("config key 'model.batch_window' must be one of "
                          f"{', '.join(BATCH_WINDOWS)}")
    if m.response_format not in RESPONSE_FORMAT_SETTINGS:
        raise ConfigError("config key 'model.response_format' must be one of "
                          f"{', '.join(RESPONSE_FORMAT_SETTINGS)} (empty means none)")
    if p.system_role not in SYSTEM_ROLES:
        raise ConfigError("config key 'prompt.system_role' must be system or user")
    if cfg.run.parse_retry not in PARSE_RETRIES:
        raise ConfigError("config key 'run.parse_retry' must be one of "
                          f"{', '.join(PARSE_RETRIES)}")
    _check_numbers(cfg)
    _check_texts(cfg)
    if not d.narratives:
        raise ConfigError("config key 'data.narratives' must map at least one narrative type")
    unknown_flags = sorted(set(d.flags) - set(d.narratives))
    if unknown_flags:
        raise ConfigError(
            f"config key 'data.flags.{_shown(unknown_flags[0])}' names a narrative type "
            "missing from data.narratives"
        )


def resolve_data_path(cfg: Config) -> Path:
    """The data file, relative paths taken from the working directory."""
    try:
        return Path(cfg.data.file).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        raise ConfigError(f"config key 'data.file': cannot expand ~ in {cfg.data.file}; "
                          "give the full path") from None


def read_yaml(path: str | Path) -> Mapping[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except ValueError as exc:
        # PyYAML builds a date from anything shaped like one and fails on 2024-13-45.
        raise ConfigError(f"config file {p} holds a value YAML cannot read "
                          f"({_shown(str(exc))}); quote it to make it text") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return raw


def build_config(raw: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """Merge defaults < raw (YAML or a stored config) < environment < flags, and validate."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    unknown = sorted(set(raw) - set(SECTIONS), key=str)  # YAML keys need not be text
    if unknown:
        raise ConfigError(
            f"unknown config section '{_shown(unknown[0])}' (known: {', '.join(SECTIONS)})"
        )
    sections = {
        name: _build_section(name, cls, raw.get(name), env, overrides)
        for name, cls in SECTIONS.items()
    }
    model = sections["model"]
    if model.response_format in (None, ""):
        # empty was "no response_format field" before auto existed
        model = dataclasses.replace(model, response_format="none")
    sections["model"] = dataclasses.replace(
        model, api_url=normalize_config_api_url(model.api_url))
    sections["data"] = dataclasses.replace(
        sections["data"], sample=_normalize_sample(sections["data"].sample))
    sections["model"] = dataclasses.replace(
        sections["model"], endpoints=_normalize_endpoints(sections["model"].endpoints),
        price_per_mtok=_normalize_prices(sections["model"].price_per_mtok))
    cfg = Config(**sections, source_path=source)
    _validate(cfg)
    return cfg


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None, require_data: bool = True) -> Config:
    """Read, merge and validate a configuration file. Raises ConfigError naming the key."""
    cfg = build_config(read_yaml(path), overrides=overrides, env=env, source=str(path))
    if require_data and not resolve_data_path(cfg).is_file():
        raise ConfigError(f"config key 'data.file': data file not found: {cfg.data.file}")
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a stored configuration (the experiment record's config_json) as it was.
    The probe's chosen mode (`model.response_format_used`) is a record, not a setting:
    dropped here (the session reads it from the experiment's column)."""
    model = data.get("model")
    if isinstance(model, Mapping) and RESPONSE_FORMAT_USED in model:
        data = {**data, "model": {k: v for k, v in model.items() if k != RESPONSE_FORMAT_USED}}
    return build_config(data, overrides={}, env={})


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """RESUME=1 style switches: 1/true/yes (any case) are on."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def known_env_variables() -> frozenset[str]:
    """Every ASYNCRUNNER_* name asyncrunner reads: one per config key, and the others."""
    names = {f"{ENV_PREFIX}{section}_{f.name}".upper()
             for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    return frozenset(names | set(OTHER_ENV_VARIABLES))


def unknown_env_variables(env: Mapping[str, str], known: Iterable[str] = ()) -> list[str]:
    """One warning line per ASYNCRUNNER_* variable that nothing reads (a misspelling is
    otherwise silently ignored), with the closest known name. `known`: more names that are
    in use, e.g. a model.api_key_env that starts with ASYNCRUNNER_. Only names are used;
    values may be secrets and are never looked at."""
    names = known_env_variables() | set(known)
    # Compared without the common prefix: with it, every pair of names looks alike.
    tails = {name[len(ENV_PREFIX):]: name for name in names if name.startswith(ENV_PREFIX)}
    lines = []
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX) or name in names:
            continue
        tail = name[len(ENV_PREFIX):].upper()
        close = difflib.get_close_matches(tail, tails, n=1, cutoff=0.7)
        if tail in tails:
            hint = f"; did you mean {tails[tail]}? (names are case-sensitive)"
        elif close:
            hint = f"; did you mean {tails[close[0]]}?"
        else:
            hint = " (settings are ASYNCRUNNER_<SECTION>_<KEY>, e.g. ASYNCRUNNER_RUN_WORKERS)"
        lines.append(f"unknown environment variable {_shown(name)} is ignored{hint}")
    return lines
