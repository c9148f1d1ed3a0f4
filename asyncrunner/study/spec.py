"""A study's spec: SWEEP.yaml read and resolved, every cell x repeat given its experiment id
up front, and the JSON kept in `studies.spec_json`, which is all a resume needs.

    SWEEP.yaml  --read_sweep()-->  Sweep (base resolved, cells expanded; no ids)
                --new_study()-->   StudySpec (study id, one experiment id per cell x repeat)
                <--from_json()--   studies.spec_json (sweep --resume)

SWEEP.yaml keys: `base` (a run config, its path relative to the SWEEP file, or a mapping of
config sections), `matrix` (see matrix.py), `repeats` (default 1), `name` (optional). The
base's data file is taken as `run` takes it: a relative path is relative to the working
directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncrunner.config import SECTIONS, read_yaml
from asyncrunner.errors import ConfigError, RefusedError
from asyncrunner.ids import new_experiment_id, require_uuid
from asyncrunner.llm.client import redact_model_urls
from asyncrunner.study.matrix import (
    MAX_EXPERIMENTS,
    MAX_REPEATS,
    Cell,
    Sweep,
    expand,
    resolve_base,
    stored_value,
)

SPEC_FORMAT = 1
SWEEP_KEYS = ("base", "matrix", "name", "repeats")


@dataclass(frozen=True, slots=True)
class Run:
    """One cell x repeat: one experiment."""

    number: int          # 1.. in the order the sweep runs them
    cell_number: int     # 1.. in matrix order
    cell: Cell
    repeat: int          # 1..repeats
    experiment_id: str


@dataclass(frozen=True, slots=True)
class StudySpec:
    study_id: str
    sweep: Sweep
    experiment_ids: tuple[tuple[str, ...], ...]    # [cell][repeat - 1]
    sweep_file: str | None = None
    base_file: str | None = None

    @property
    def runs(self) -> list[Run]:
        """Cell by cell, each cell's repeats in turn (see sweep.py for why)."""
        out: list[Run] = []
        for c, (cell, ids) in enumerate(zip(self.sweep.cells, self.experiment_ids,
                                            strict=True), start=1):
            for r, experiment_id in enumerate(ids, start=1):
                out.append(Run(len(out) + 1, c, cell, r, experiment_id))
        return out

    def to_json(self) -> dict[str, Any]:
        """As stored in `studies.spec_json`: endpoint URLs redacted, as everywhere a
        configuration is stored (a resume takes credentials from the environment)."""
        s = self.sweep
        return {
            "format": SPEC_FORMAT, "name": s.name, "sweep_file": self.sweep_file,
            "base_file": self.base_file, "base": _redacted(dict(s.base)), "repeats": s.repeats,
            "matrix": [[path, [stored_value(path, v) for v in values]]
                       for path, values in s.matrix],
            "cells": [{"label": cell.label,
                       "overrides": [[path, stored_value(path, value)]
                                     for path, value in cell.overrides],
                       "experiments": [{"repeat": r, "experiment_id": eid}
                                       for r, eid in enumerate(ids, start=1)]}
                      for cell, ids in zip(s.cells, self.experiment_ids, strict=True)],
        }


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model")
    return {**config, "model": redact_model_urls(model)} if isinstance(model, Mapping) \
        else config


def new_study(sweep: Sweep, *, sweep_file: str | None = None,
              base_file: str | None = None) -> StudySpec:
    ids = tuple(tuple(new_experiment_id() for _ in range(sweep.repeats)) for _ in sweep.cells)
    return StudySpec(new_experiment_id(), sweep, ids, sweep_file, base_file)


def from_json(study_id: str, data: Mapping[str, Any]) -> StudySpec:
    """The spec a study was started with; refused (exit 3) if this version cannot read it."""
    try:
        if data.get("format") != SPEC_FORMAT:
            raise ValueError(f"spec format {data.get('format')!r}")
        cells, ids = [], []
        for item in data["cells"]:
            cells.append(Cell(str(item["label"]),
                              tuple((str(p), v) for p, v in item["overrides"])))
            runs = sorted(item["experiments"], key=lambda e: int(e["repeat"]))
            ids.append(tuple(require_uuid(str(e["experiment_id"])) for e in runs))
        sweep = Sweep(base=dict(data["base"]),
                      matrix=tuple((str(p), tuple(v)) for p, v in data["matrix"]),
                      cells=tuple(cells), repeats=int(data["repeats"]), name=data.get("name"))
        if not cells or any(len(i) != sweep.repeats for i in ids):
            raise ValueError("cells and repeats do not match")
    except (KeyError, TypeError, ValueError, AttributeError, RefusedError) as exc:
        raise RefusedError(f"study {study_id}: its stored spec cannot be read ({exc}); was "
                           "it written by another version of asyncrunner?") from None
    return StudySpec(study_id, sweep, tuple(ids), data.get("sweep_file"),
                     data.get("base_file"))


# --------------------------------------------------------------------------- SWEEP.yaml


def read_sweep(path: Path, env: Mapping[str, str]) -> tuple[Sweep, str | None]:
    """The sweep of a SWEEP.yaml with its base resolved, and the base file's path (None for
    an inline base). Raises a one-line ConfigError for anything wrong in it."""
    raw = read_yaml(path)
    _check_keys(path, raw)
    base_raw, base_file = _base(path, raw.get("base"))
    try:
        base = resolve_base(base_raw, env, source=base_file or str(path))
    except ConfigError as exc:
        raise ConfigError(f"sweep base {base_file or '(inline)'}: {exc}") from None
    matrix = raw.get("matrix") or {}
    if not isinstance(matrix, Mapping):
        raise ConfigError(f"sweep file {path}: 'matrix' must be a mapping of dotted config "
                          "paths to lists of values")
    repeats = _repeats(raw.get("repeats", 1))
    cells = expand(matrix)
    if len(cells) * repeats > MAX_EXPERIMENTS:
        raise ConfigError(f"sweep file {path}: {len(cells)} cells x {repeats} repeats is more "
                          f"than {MAX_EXPERIMENTS} experiments")
    sweep = Sweep(base=base, matrix=tuple((str(k), tuple(v)) for k, v in matrix.items()),
                  cells=cells, repeats=repeats, name=_name(raw.get("name")))
    return sweep, base_file


def _check_keys(path: Path, raw: Mapping[Any, Any]) -> None:
    unknown = sorted(str(k) for k in raw if k not in SWEEP_KEYS)
    if not unknown:
        return
    hint = (" (run settings go under base:)" if unknown[0] in SECTIONS else "")
    raise ConfigError(f"unknown sweep key '{unknown[0][:60]}' in {path} "
                      f"(known: {', '.join(SWEEP_KEYS)}){hint}")


def _base(path: Path, base: object) -> tuple[Mapping[str, Any], str | None]:
    if isinstance(base, Mapping):
        return base, None
    if isinstance(base, str) and base.strip():
        try:
            given = Path(base).expanduser()
        except RuntimeError:  # ~name of a user this machine does not know
            raise ConfigError(f"sweep key 'base': cannot expand ~ in {base}") from None
        found = given if given.is_absolute() else path.parent / given
        try:
            return read_yaml(found), str(found)
        except ConfigError as exc:
            raise ConfigError(f"sweep key 'base': {exc}") from None
    raise ConfigError(f"sweep file {path}: 'base' must be a run config file (relative to the "
                      "SWEEP file) or a mapping of config sections")


def _repeats(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_REPEATS:
        return value
    try:
        shown = repr(value)[:60]
    except ValueError:  # Python makes no text of an int beyond 4300 digits
        shown = "a huge number"
    raise ConfigError(f"sweep key 'repeats' must be a whole number between 1 and "
                      f"{MAX_REPEATS}, got {shown}")


def _name(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError("sweep key 'name' must be text")
