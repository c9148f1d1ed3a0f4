"""Configuration: YAML + environment + flags -> one frozen `Config`, validated once.

Precedence for every setting: command-line flag > environment variable > YAML > default.
Any scalar setting can come from the environment as ASYNCRUNNER_<SECTION>_<KEY>
(e.g. ASYNCRUNNER_RUN_WORKERS=16, ASYNCRUNNER_MODEL_API_URL=...). Secrets are never part
of the config: `model.api_key_env` names the variable that holds the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from asyncrunner.errors import ConfigError

TEXT_PLACEHOLDER = "<<TEXT>>"
DEFAULT_DB = "data/experiments.db"
PROVIDERS = ("openai", "mock")
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


@dataclass(frozen=True, slots=True)
class RunSection:
    workers: int = 4
    batch_size: int = 100
    commit_interval_s: float = 2.0
    max_narratives: int | None = None
    seed: int | None = 1024
    max_attempts: int = 3
    retry_backoff_s: float = 0.5
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    grace_period_s: float = 30.0
    parse_retry: str = "repair"         # repair | resample | off
    max_error_share: float = 0.2        # above it a finished run exits 4
    breaker_window: int = 50            # this many errors in a row stop the run (exit 4)
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


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    origin = typing.get_origin(tp) or tp
    if origin is list:
        item = _type_name(typing.get_args(tp)[0])
        return "a list of " + item.removeprefix("an ").removeprefix("a ")
    return {str: "text", int: "an integer", float: "a number", bool: "true/false",
            dict: "a mapping"}.get(origin, str(origin))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check one YAML/env value against a dataclass field type; name the key on failure."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, not empty")
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list and isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise ConfigError(f"config key '{key}[{i}]' must be text")
        return [str(item) for item in value]
    elif origin is dict and isinstance(value, Mapping):
        _, val_t = typing.get_args(tp) or (str, Any)
        if val_t is str:
            for k, v in value.items():
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    raise ConfigError(f"config key '{key}.{k}' must be text")
            return {str(k): str(v) for k, v in value.items()}
        return dict(value)
    raise ConfigError(
        f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )


def _env_value(raw: str, tp: Any) -> Any:
    """Environment values are text; parse them as YAML scalars so '16' is an int."""
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _build_section(name: str, cls: type, raw: Any, env: Mapping[str, str],
                   overrides: Mapping[str, Any]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section '{name}' must be a mapping")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key '{name}.{unknown[0]}' (known: {', '.join(sorted(hints))})"
        )
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


def _validate(cfg: Config) -> None:
    m, p, d, r = cfg.model, cfg.prompt, cfg.data, cfg.run
    if m.provider not in PROVIDERS:
        raise ConfigError(f"config key 'model.provider' must be one of {', '.join(PROVIDERS)}")
    if TEXT_PLACEHOLDER not in p.user_template:
        raise ConfigError(
            f"config key 'prompt.user_template' must contain the placeholder {TEXT_PLACEHOLDER}"
        )
    if not 0.0 <= m.temperature <= 2.0:
        raise ConfigError("config key 'model.temperature' must be between 0 and 2")
    if m.timeout_s <= 0:
        raise ConfigError("config key 'model.timeout_s' must be positive")
    if m.max_tokens < 1:
        raise ConfigError("config key 'model.max_tokens' must be at least 1")
    if m.response_format not in RESPONSE_FORMAT_SETTINGS:
        raise ConfigError("config key 'model.response_format' must be one of "
                          f"{', '.join(RESPONSE_FORMAT_SETTINGS)} (empty means none)")
    if m.max_response_bytes < 1024:
        raise ConfigError("config key 'model.max_response_bytes' must be at least 1024")
    if p.system_role not in SYSTEM_ROLES:
        raise ConfigError("config key 'prompt.system_role' must be system or user")
    if r.parse_retry not in PARSE_RETRIES:
        raise ConfigError("config key 'run.parse_retry' must be one of "
                          f"{', '.join(PARSE_RETRIES)}")
    if not 0.0 <= r.max_error_share <= 1.0:
        raise ConfigError("config key 'run.max_error_share' must be between 0 and 1")
    if r.breaker_window < 1:
        raise ConfigError("config key 'run.breaker_window' must be at least 1")
    if not d.narratives:
        raise ConfigError("config key 'data.narratives' must map at least one narrative type")
    unknown_flags = sorted(set(d.flags) - set(d.narratives))
    if unknown_flags:
        raise ConfigError(
            f"config key 'data.flags.{unknown_flags[0]}' names a narrative type "
            "missing from data.narratives"
        )
    for key, value, low in (
        ("run.workers", r.workers, 1),
        ("run.batch_size", r.batch_size, 1),
        ("run.max_attempts", r.max_attempts, 1),
    ):
        if value < low:
            raise ConfigError(f"config key '{key}' must be at least {low}")
    if r.workers > 1024:
        raise ConfigError("config key 'run.workers' must be at most 1024")
    if r.max_narratives is not None and r.max_narratives < 1:
        raise ConfigError("config key 'run.max_narratives' must be at least 1 or empty")
    if r.retry_backoff_s < 0:
        raise ConfigError("config key 'run.retry_backoff_s' must not be negative")
    if r.commit_interval_s <= 0 or r.grace_period_s < 0:
        raise ConfigError(
            "config keys 'run.commit_interval_s'/'run.grace_period_s' must be positive")
    for key, limit in (("run.requests_per_minute", r.requests_per_minute),
                       ("run.tokens_per_minute", r.tokens_per_minute)):
        if limit is not None and limit <= 0:
            raise ConfigError(f"config key '{key}' must be positive or empty")


def resolve_data_path(cfg: Config) -> Path:
    """The data file, relative paths taken from the working directory."""
    return Path(cfg.data.file).expanduser()


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
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return raw


def build_config(raw: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """Merge defaults < raw (YAML or a stored config) < environment < flags, and validate."""
    env = os.environ if env is None else env
    overrides = overrides or {}
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown config section '{unknown[0]}' (known: {', '.join(SECTIONS)})"
        )
    sections = {
        name: _build_section(name, cls, raw.get(name), env, overrides)
        for name, cls in SECTIONS.items()
    }
    model = sections["model"]
    if model.response_format in (None, ""):
        # empty was "no response_format field" before auto existed
        sections["model"] = dataclasses.replace(model, response_format="none")
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
