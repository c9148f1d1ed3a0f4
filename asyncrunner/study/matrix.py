"""A sweep's grid: matrix -> cells, a cell -> its configuration. Pure: no file, no database.

    matrix (dotted config path -> values, in the file's key order)
        --expand()-->       cells: the cartesian product, first key varying slowest
        --cell_config()-->  one validated Config per cell x repeat

A dotted path names a real configuration key: a section (`prompt`), a key of one
(`model.temperature`), or an entry of a mapping key (`model.extra_body.top_p`). A mapping
value merges into the mapping already there (nested mappings merge too), anything else
replaces it. Repeat r of a cell runs with run.seed = the cell's seed + (r - 1).

Precedence: the base configuration is resolved with the environment when the study starts
(as `run` resolves its YAML); a cell's own values are the point of the sweep and win over
it; flags (`--workers`) and the environment's session keys (where the server is, timeouts,
workers: keys that cannot change an answer, see settings.py) apply to each session.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asyncrunner.config import ENV_PREFIX, SECTIONS, Config, build_config
from asyncrunner.errors import ConfigError
from asyncrunner.llm.client import (
    normalize_api_url,
    redact_endpoint_urls,
    redact_model_urls,
    redact_url,
)
from asyncrunner.settings import SESSION_KEYS, Kind, flatten, kind

BASE_LABEL = "(base)"
# A cell label shows each value shortened to this (the full values are in the spec).
LABEL_VALUE_CHARS = 40
# Far beyond any study an endpoint can serve; a product of long lists must not exhaust
# memory before it is refused.
MAX_EXPERIMENTS = 10_000
MAX_REPEATS = 1_000


@dataclass(frozen=True, slots=True)
class Cell:
    label: str                                  # "model.name=a, model.temperature=0.7"
    overrides: tuple[tuple[str, Any], ...]      # (dotted path, value), matrix key order


@dataclass(frozen=True, slots=True)
class Sweep:
    """A resolved sweep, before any id is given out."""

    base: Mapping[str, Any]                     # Config.to_dict() of the base
    matrix: tuple[tuple[str, tuple[Any, ...]], ...]
    cells: tuple[Cell, ...]
    repeats: int
    name: str | None = None

    @property
    def n_experiments(self) -> int:
        return len(self.cells) * self.repeats


# --------------------------------------------------------------------------- paths


def _mapping_type(tp: Any) -> bool:
    """Whether a section field holds a mapping (`dict[...]` or `dict[...] | None`)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return any((typing.get_origin(a) or a) is dict for a in args)


def check_path(path: object) -> str:
    """The path if it names a configuration key, else a ConfigError naming it."""
    if not isinstance(path, str):
        raise ConfigError(f"sweep matrix key {path!r} must be a dotted config path such as "
                          "model.temperature")
    parts = path.split(".")
    cls = SECTIONS.get(parts[0])
    if cls is None or not all(parts):
        raise ConfigError(f"sweep matrix key '{_one_line(path)}' is not a config key "
                          f"(sections: {', '.join(SECTIONS)})")
    if len(parts) == 1:
        return path
    hints = typing.get_type_hints(cls)
    if parts[1] not in hints:
        raise ConfigError(f"sweep matrix key '{_one_line(path)}' is not a config key "
                          f"(known in {parts[0]}: {', '.join(sorted(hints))})")
    if len(parts) > 2 and not _mapping_type(hints[parts[1]]):
        raise ConfigError(f"sweep matrix key '{_one_line(path)}' is not a config key: "
                          f"{parts[0]}.{parts[1]} is not a mapping")
    return path


# --------------------------------------------------------------------------- cells


def expand(matrix: Mapping[Any, Any]) -> tuple[Cell, ...]:
    """The cells of a matrix: every combination of its values, first key slowest.
    No matrix at all is one cell: the base."""
    axes = [(check_path(path), _values(path, values)) for path, values in matrix.items()]
    size = 1
    for _, values in axes:
        size *= len(values)
        if size > MAX_EXPERIMENTS:
            raise ConfigError(f"sweep matrix has more than {MAX_EXPERIMENTS} cells")
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*(values for _, values in axes)):
        overrides = tuple((path, value) for (path, _), value in zip(axes, combo, strict=True))
        label = cell_label(overrides)
        if label in seen:   # values that differ only beyond what a label shows
            label = f"{label} (cell {len(cells) + 1})"
        seen.add(label)
        cells.append(Cell(label, overrides))
    return tuple(cells)


def _values(path: str, values: object) -> tuple[Any, ...]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep matrix key '{path}' must be a non-empty list of values, "
                          f"as in {path}: [a, b]")
    if "." not in path and not all(isinstance(v, Mapping) for v in values):
        raise ConfigError(f"sweep matrix key '{path}' names a config section: each of its "
                          f"values must be a mapping of {path} keys")
    texts = [canonical(v) for v in values]
    for i, text in enumerate(texts):
        if text in texts[:i]:
            raise ConfigError(f"sweep matrix key '{path}' lists the value "
                              f"{_shown(values[i])} twice")
    return tuple(values)


def stored_value(path: str, value: Any) -> Any:
    """A matrix value as stored and shown: a URL (or a mapping holding URLs) redacted."""
    if path == "model" and isinstance(value, Mapping):
        return redact_model_urls(value)
    if path == "model.api_url" and isinstance(value, str):
        return redact_url(normalize_api_url(value))
    if path == "model.endpoints":
        return redact_endpoint_urls(value)
    return value


def cell_label(overrides: Sequence[tuple[str, Any]]) -> str:
    """`model.name=a, model.temperature=0.7`; a mapping value shows each of its entries
    (URLs redacted: the label is stored with the experiment and printed)."""
    parts: list[str] = []
    for path, raw in overrides:
        value = stored_value(path, raw)
        if isinstance(value, Mapping) and flatten(value):
            parts.extend(f"{path}.{k}={_shown(v)}" for k, v in flatten(value).items())
        else:
            parts.append(f"{path}={_shown(value)}")
    return ", ".join(parts) or BASE_LABEL


def _shown(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, Mapping) and not value:
        text = "{}"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    text = _one_line(text)
    return text if len(text) <= LABEL_VALUE_CHARS else text[:LABEL_VALUE_CHARS - 3] + "..."


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------- configs


def apply_overrides(base: Mapping[str, Any],
                    overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of `base` (nested dicts) with each override set: mappings merge, the rest
    replaces."""
    raw: dict[str, Any] = copy.deepcopy(dict(base))
    for path, value in overrides:
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _merged(node.get(leaf), value)
    return raw


def _merged(current: Any, value: Any) -> Any:
    if not (isinstance(current, Mapping) and isinstance(value, Mapping)):
        return copy.deepcopy(value)
    out = dict(current)
    for key, item in value.items():
        out[key] = _merged(current.get(key), item)
    return out


def session_env(env: Mapping[str, str]) -> dict[str, str]:
    """The ASYNCRUNNER_* variables of session keys only: the spec decides every other key
    (the environment's answer keys were taken into the base when the study started)."""
    names = {f"{ENV_PREFIX}{key.replace('.', '_')}".upper() for key in SESSION_KEYS}
    return {k: v for k, v in env.items() if k in names}


def cell_config(sweep: Sweep, cell: Cell, repeat: int, *, workers: int | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """The validated configuration of one cell x repeat; a ConfigError names the cell."""
    raw = apply_overrides(sweep.base, cell.overrides)
    where = f"sweep cell {cell.label}" + (f", repeat {repeat}" if sweep.repeats > 1 else "")
    run = raw.setdefault("run", {})
    seed = run.get("seed") if isinstance(run, dict) else None
    if sweep.repeats > 1 and seed is None:
        raise ConfigError(f"{where}: run.seed is empty, but repeats use seed, seed+1, ...; "
                          "set run.seed")
    experiment = raw.setdefault("experiment", {})
    try:
        if isinstance(seed, int) and not isinstance(seed, bool):
            run["seed"] = seed + repeat - 1
        if isinstance(experiment, dict):
            name = experiment.get("name") or "unnamed experiment"
            experiment["name"] = f"{name} [{cell.label}] repeat {repeat}"
        return build_config(raw, overrides={"run.workers": workers},
                            env=session_env(env or {}))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def configs(sweep: Sweep, *, workers: int | None = None,
            env: Mapping[str, str] | None = None) -> list[Config]:
    """Every cell x repeat's configuration, cell by cell: the whole grid is checked before
    anything runs."""
    return [cell_config(sweep, cell, repeat, workers=workers, env=env)
            for cell in sweep.cells for repeat in range(1, sweep.repeats + 1)]


# --------------------------------------------------------------------------- identity


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def checksum(sweep: Sweep) -> str:
    """SHA-256 of the grid: the base's keys that make an answer or the narrative set (not
    where the server is, how many workers...: running the same grid there again is the same
    study), every cell's values, and the number of repeats. No ids, no study name."""
    base = {k: v for k, v in flatten(sweep.base).items() if kind(k) is not Kind.SESSION}
    body = {"base": base, "cells": [[list(o) for o in c.overrides] for c in sweep.cells],
            "repeats": sweep.repeats}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def resolve_base(raw: Mapping[str, Any], env: Mapping[str, str],
                 source: str | None = None) -> dict[str, Any]:
    """The base configuration as `run` would resolve it (defaults, YAML, environment)."""
    return build_config(raw, overrides={}, env=env, source=source).to_dict()


__all__ = ["BASE_LABEL", "MAX_EXPERIMENTS", "Cell", "Sweep", "apply_overrides", "canonical",
           "cell_config", "cell_label", "check_path", "checksum", "configs", "expand",
           "resolve_base", "session_env"]
