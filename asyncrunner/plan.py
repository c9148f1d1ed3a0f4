"""What a session will do, decided and checked before the experiment record is touched.

    RunRequest (flags, environment, YAML path)
        --draft()-->     Draft      which experiment and why; no database opened
        --complete()-->  RunPlan    under the experiment's lock: every guard passed, the
                                    narratives, the effective settings and the counts known

A plan says *why* it runs (`Intent`: a new experiment, a resume, a retry of error rows) and
everything that follows from it; session.py then carries out any plan with one shared tail.
Nothing here changes an experiment row: what a resume must record (allowed drift, an R-era
experiment's checksum) is part of the plan and written by the session after its backup. The
only write is ingest, which loads a new file's narratives once per checksum and is
idempotent.

One experiment, one regime (settings.py): on resume the stored experiment decides every
setting that can change an answer or the narrative set; the YAML, environment and flags
decide only how this session runs. A differing value is a `config drift:` warning naming
the key and both values, and `--allow-drift KEY` is the only way to change one.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from asyncrunner import refusals
from asyncrunner.config import (
    PROVIDERS,
    SECTIONS,
    Config,
    build_config,
    config_from_dict,
    env_flag,
    load_config,
    resolve_data_path,
)
from asyncrunner.db import checksums, loading, sample, store
from asyncrunner.db.experiments import (
    AUTHORITATIVE,
    CHANGE_ADOPTED,
    CHANGE_ALLOWED_DRIFT,
    ConfigChange,
    require_resumable,
)
from asyncrunner.db.ingest import (
    CsvCheck,
    IngestReport,
    PriorLoad,
    check_csv,
    count_placeholder_texts,
    ingest,
    placeholder_set,
    prior_versions,
    read_digests,
    readable_checksum,
    stored_ingest,
    unfinished_load,
)
from asyncrunner.errors import InputError, UsageError
from asyncrunner.ids import new_experiment_id, require_uuid
from asyncrunner.llm.client import redact_model_urls
from asyncrunner.llm.setup import endpoints_from
from asyncrunner.pipeline.loading import LoadFeed
from asyncrunner.pipeline.producer import WorkSelection
from asyncrunner.settings import (
    Kind,
    covered,
    differences,
    flatten,
    kind,
    merge,
    short,
    unflatten,
)
from asyncrunner.vocab import RETRYABLE, ErrorCategory, Status

log = structlog.get_logger("asyncrunner.plan")


class Intent(StrEnum):
    NEW = "new"
    RESUME = "resume"
    RETRY_ERRORS = "retry-errors"


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What the operator asked for, before anything is checked."""

    db_path: Path
    config_path: str | None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    resume: bool = False
    experiment_id: str | None = None
    retry_errors_only: bool = False
    force: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    allow_drift: tuple[str, ...] = ()              # --allow-drift KEY (repeatable)
    categories: tuple[str, ...] | None = None      # --category: None = RETRYABLE
    # A sweep's cell: its configuration built in memory (instead of config_path), the id it
    # was given in the study's record before it started, and the study it belongs to.
    config: Config | None = None
    new_experiment_id: str | None = None
    study: StudyTag | None = None


@dataclass(frozen=True, slots=True)
class StudyTag:
    """Which cell of which study an experiment is (stored with the experiment)."""

    study_id: str
    cell: str          # the cell's settings, e.g. "model.name=a, model.temperature=0.7"
    repeat: int        # 1.. within the cell


def request_from_env(db_path: Path, config_path: str | None, overrides: Mapping[str, Any], *,
                     resume: bool, experiment_id: str | None, retry_errors_only: bool,
                     force: bool, env: Mapping[str, str], allow_drift: tuple[str, ...] = (),
                     categories: tuple[str, ...] | None = None) -> RunRequest:
    """Flags win over RESUME / EXPERIMENT_ID / RETRY_ERRORS_ONLY from the environment."""
    return RunRequest(
        db_path=db_path, config_path=config_path, overrides=overrides,
        resume=resume or env_flag(env, "RESUME"),
        experiment_id=experiment_id or env.get("EXPERIMENT_ID") or None,
        retry_errors_only=retry_errors_only or env_flag(env, "RETRY_ERRORS_ONLY"),
        force=force, env=env, allow_drift=allow_drift, categories=categories)


@dataclass(frozen=True, slots=True)
class Draft:
    request: RunRequest
    intent: Intent
    experiment_id: str
    config: Config | None = None     # a new experiment's validated configuration


@dataclass(frozen=True, slots=True)
class LegacySet:
    """An R-era experiment (no stored checksum): the narratives it ran on, identified now
    and recorded by the session. With `tag_source`, its rows (no checksum, that data_source)
    get `checksum`, which was not used by any load yet."""

    checksum: str
    tag_source: str | None
    n_rows: int
    max_narratives: int | None


@dataclass(frozen=True, slots=True)
class RunPlan:
    """One session's work, fully checked."""

    request: RunRequest
    intent: Intent
    experiment_id: str
    config: Config                   # the effective settings of this session
    selection: WorkSelection         # which narratives the producer hands out
    total: int                       # narratives in the experiment
    target: int                      # narratives this session sets out to process
    done: int = 0                    # results already stored
    drift: tuple[str, ...] = ()      # warnings: stored values that overruled the given ones
    warnings: tuple[str, ...] = ()   # other warnings found while planning (data file, R era)
    previous_status: Status | None = None
    ingest: IngestReport | None = None
    prior_loads: tuple[PriorLoad, ...] = ()
    # What differs from the stored configuration in this session ({key: {stored, session}}),
    # the keys --allow-drift let change, and the stored configuration to record (None: same).
    settings_diff: Mapping[str, Any] = field(default_factory=dict)
    allowed_drift: tuple[str, ...] = ()
    config_changes: tuple[ConfigChange, ...] = ()
    stored_config: Mapping[str, Any] | None = None
    legacy: LegacySet | None = None
    retry_categories: tuple[str, ...] | None = None
    sample_keys: tuple[tuple[str, str], ...] | None = None   # a new sampled experiment's
    data_file: checksums.Checked | None = None   # its checksum, recorded with the session
    # A new experiment whose data file is still loading (db/loading.py): the rest of the
    # load, and how far it has come (`total` is then the size at the start).
    background: loading.BackgroundLoad | None = None
    feed: LoadFeed | None = None
    finished_load: bool = False      # a resume that first finished its file's load

    @property
    def total_now(self) -> int:
        """Narratives in the experiment, as far as its data file is loaded."""
        return self.feed.total if self.feed is not None else self.total

    @property
    def db_path(self) -> Path:
        return self.request.db_path

    @property
    def is_new(self) -> bool:
        return self.intent is Intent.NEW


def draft(req: RunRequest) -> Draft:
    """Check what can be checked without a database: the id, the YAML, the data file."""
    if req.resume:
        if not req.experiment_id:
            raise refusals.resume_needs_id()
        experiment_id = require_uuid(req.experiment_id)
        if not req.db_path.exists():
            raise refusals.database_missing(req.db_path)
        _check_allow_drift_keys(req.allow_drift)
        intent = Intent.RETRY_ERRORS if req.retry_errors_only else Intent.RESUME
        return Draft(req, intent, experiment_id)
    if req.config is not None:
        experiment_id = (require_uuid(req.new_experiment_id) if req.new_experiment_id
                         else new_experiment_id())
        endpoints_from(req.config, req.env)
        return Draft(req, Intent.NEW, experiment_id, req.config)
    if not req.config_path:
        raise InputError("run needs a CONFIG.yaml (or RESUME=1 with EXPERIMENT_ID to resume)")
    cfg = load_config(req.config_path, overrides=req.overrides, env=req.env)
    endpoints_from(cfg, req.env)          # refuses what no request could carry
    return Draft(req, Intent.NEW, new_experiment_id(), cfg)


def complete(conn: sqlite3.Connection, d: Draft,
             before_write: Callable[[], None] | None = None, *,
             load_beside: bool = False) -> RunPlan:
    """Run every guard that needs the database; the caller holds the experiment's lock.
    `before_write`: called before a resume writes while planning (it finishes a data
    file's load stopped halfway), so that its backup is taken first. `load_beside`: the
    caller runs the pipeline with RunPlan.background, so a new experiment's CSV may be
    loaded beside it (db/loading.py); otherwise it is loaded whole here."""
    if d.intent is Intent.NEW:
        return _plan_new(conn, d, load_beside)
    return _plan_resume(conn, d, before_write)


# --------------------------------------------------------------------------- new


def _plan_new(conn: sqlite3.Connection, d: Draft, load_beside: bool = False) -> RunPlan:
    assert d.config is not None
    cfg = d.config
    path = resolve_data_path(cfg)
    beside = load_beside and loading.can_load_beside(cfg, path)
    checked, check = _data_checksum(conn, cfg, path, beside)
    checksum = checked.checksum
    prior = tuple(prior_versions(conn, path, checksum))
    if prior and stored_ingest(conn, checksum) is None:
        # Said before the new version is read and loaded beside the old rows.
        log.warning("data_file_changed", message=_changed_file_message(cfg.data.file,
                                                                       prior[0], checksum))
    background: loading.BackgroundLoad | None = None
    feed: LoadFeed | None = None
    if beside:
        begun = loading.start(conn, cfg.data, path, checksum, cfg.run.max_narratives,
                              checked=check)
        if isinstance(begun, loading.BackgroundLoad):
            background, report = begun, begun.report
            feed = LoadFeed(begun.progress, cfg.run.max_narratives)
        else:
            report = begun
    else:
        report = ingest(conn, cfg.data, path, checksum=checksum)
    warnings = list(_ingest_warnings(conn, cfg, report))
    if feed is not None:
        cutoff, total = feed.progress.cutoff, feed.total
    else:
        cutoff = store.set_cutoff(conn, report.data_checksum, cfg.run.max_narratives)
        total = store.count_set(conn, report.data_checksum, cutoff)
    if total == 0:
        raise InputError(f"data file {cfg.data.file} holds no narratives to classify")
    keys = None
    if cfg.data.sample is not None:
        keys = tuple(sample.draw(conn, report.data_checksum, cutoff, cfg.data.sample))
        total = len(keys)
    return RunPlan(
        request=d.request, intent=d.intent, experiment_id=d.experiment_id, config=cfg,
        selection=WorkSelection(d.experiment_id, report.data_checksum, cutoff,
                                sampled=keys is not None),
        total=total, target=total, ingest=report, prior_loads=prior,
        warnings=tuple(warnings), sample_keys=keys, data_file=checked,
        background=background, feed=feed)


def _data_checksum(conn: sqlite3.Connection, cfg: Config, path: Path,
                   beside: bool) -> tuple[checksums.Checked, CsvCheck | None]:
    """The data file's checksum, and what check_csv found if it checked the file while it
    was read: a CSV to load beside the run is checked and hashed in one pass unless its
    checksum is remembered (then None: the file was not read, nor checked). A file the
    check refuses is hashed plainly: it may be loaded already (by the R version, under
    other rules), and if not, its load refuses it."""
    if not beside:
        return checksums.checksum(conn, path), None
    found: list[CsvCheck] = []

    def check(p: Path) -> str:
        found.append(check_csv(cfg.data, p))
        return found[-1].checksum

    try:
        checked = checksums.checksum(conn, path, read=check)
    except InputError:
        return checksums.checksum(conn, path), None
    return checked, found[-1] if found else None


def _changed_file_message(data_file: str, old: PriorLoad, new_checksum: str) -> str:
    users = ", ".join(f"{eid} '{name or ''}' ({status})" for eid, name, status in old.experiments)
    return (f"data file {data_file} has changed since it was loaded on {old.loaded_at}: "
            f"checksum {old.data_checksum} ({old.n_rows} rows, {old.n_narratives} "
            f"narratives) is now {new_checksum}; experiments on the old version: "
            f"{users or 'none'}; the new version loads beside the old rows")


def _ingest_warnings(conn: sqlite3.Connection, cfg: Config,
                     report: IngestReport) -> list[str]:
    out: list[str] = []
    if not report.placeholders_applied:
        n = count_placeholder_texts(conn, report.data_checksum, placeholder_set(cfg.data))
        if n:
            out.append(f"data file {cfg.data.file} was loaded before placeholder texts counted "
                       f"as blank: {n} of its narratives are placeholders (N/A and the like) "
                       "and will be sent; load it into a new database to drop them")
    if report.origin:
        out.append(f"data file {cfg.data.file}: its {report.n_narratives} narratives were "
                   "loaded by the R version; they are used as loaded (not re-read)")
    return out


def file_change_lines(report: IngestReport, prior: tuple[PriorLoad, ...]) -> list[str]:
    """After a changed file was loaded: how it compares with the version before."""
    if not prior or not report.loaded:
        return []
    old = prior[0]
    if old.rows_digest and old.rows_digest == report.rows_digest:
        verdict = "re-saved: the bytes changed, no cell did"
    elif old.content_digest and old.content_digest == report.content_digest:
        verdict = "only columns the mapping does not read changed"
    elif old.content_digest:
        verdict = "cells the experiments read changed"
    else:
        verdict = "the old version was loaded without cell digests; cannot tell what changed"
    return [f"data file {report.data_file}: {old.n_rows} rows / {old.n_narratives} "
            f"narratives (checksum {old.data_checksum}) -> {report.n_rows} rows / "
            f"{report.n_narratives} narratives (checksum {report.data_checksum}); {verdict}"]


# --------------------------------------------------------------------------- resume


@dataclass(frozen=True, slots=True)
class _Settings:
    config: Config
    drift: list[str]
    warnings: list[str]
    diff: dict[str, Any]
    allowed: tuple[str, ...]
    changes: list[ConfigChange]
    stored_config: dict[str, Any] | None


def _plan_resume(conn: sqlite3.Connection, d: Draft,
                 before_write: Callable[[], None] | None = None) -> RunPlan:
    req, experiment_id = d.request, d.experiment_id
    retry = d.intent is Intent.RETRY_ERRORS
    record = require_resumable(conn, experiment_id, force=req.force, retry_errors_only=retry)
    s = _resume_config(req, record)
    endpoints_from(s.config, req.env)
    warnings = list(s.warnings)
    legacy: LegacySet | None = None
    checked: checksums.Checked | None = None
    finished_load = False
    if record.data_checksum:
        checked, more = _check_data_unchanged(conn, record, s.config)
        warnings += more
        if unfinished_load(conn, record.data_checksum):
            # Stopped while its file was still loading beside it: the rest first.
            if before_write is not None:
                before_write()
            ingest(conn, s.config.data, Path(record.data_file or ""),
                   checksum=record.data_checksum)
            finished_load = True
        checksum, max_narratives = record.data_checksum, record.max_narratives
    else:
        legacy, more = _legacy_set(conn, record)
        warnings += more
        checksum = legacy.checksum
        max_narratives = legacy.max_narratives or record.max_narratives
    if legacy is not None and legacy.tag_source is not None:
        cutoff = _nth_id(conn, LEGACY_ROWS, (legacy.tag_source,), max_narratives)
        total = legacy.n_rows if max_narratives is None else min(legacy.n_rows, max_narratives)
    else:
        cutoff = store.set_cutoff(conn, checksum, max_narratives)
        total = store.count_set(conn, checksum, cutoff)
    sampled = sample.stored_count(conn, experiment_id)
    if sampled:
        total = sampled          # the stored keys, not a new draw
    done, _ = store.count_results(conn, experiment_id)
    categories = _retry_categories(conn, req, experiment_id) if retry else None
    target = _count_errors(conn, experiment_id, categories) if retry else max(0, total - done)
    if retry and target == 0:
        raise refusals.nothing_to_retry(experiment_id, categories)
    cfg, stored_config = s.config, s.stored_config
    if legacy is not None and legacy.max_narratives is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(
            cfg.run, max_narratives=legacy.max_narratives))
        if stored_config is not None:
            stored_config["run"]["max_narratives"] = legacy.max_narratives
    return RunPlan(
        request=req, intent=d.intent, experiment_id=experiment_id, config=cfg,
        selection=_selection(experiment_id, checksum, cutoff, retry, categories,
                             sampled=bool(sampled)),
        total=total, target=target, done=done, drift=tuple(s.drift),
        warnings=tuple(warnings), previous_status=_status_or_none(record.status),
        settings_diff=s.diff, allowed_drift=s.allowed, config_changes=tuple(s.changes),
        stored_config=stored_config, legacy=legacy, retry_categories=categories,
        data_file=checked, finished_load=finished_load)


def _status_or_none(value: str | None) -> Status | None:
    try:
        return Status(value) if value is not None else None
    except ValueError:
        return None


def _check_allow_drift_keys(keys: tuple[str, ...]) -> None:
    """`--allow-drift KEY`: a configuration key (or an entry of a mapping key such as
    model.extra_body.top_p) that changes answers. Anything else is a usage error."""
    for key in keys:
        section, _, rest = key.partition(".")
        name = rest.split(".", 1)[0]
        cls = SECTIONS.get(section)
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
            raise UsageError(f"--allow-drift {key}: no such configuration key")
        k = kind(key)
        if k is Kind.SET:
            raise UsageError(
                f"--allow-drift {key}: {section}.{name} decides which narratives belong to "
                "the experiment and cannot change on resume; start a new experiment")
        if k is not Kind.ANSWER:
            raise UsageError(f"--allow-drift {key}: {section}.{name} cannot change an answer; "
                             "it may differ between sessions without --allow-drift")


def _stored_dict(record: store.ExperimentRecord) -> tuple[dict[str, Any], set[str]]:
    """The experiment's configuration, and the answer keys it does not record (an R-era
    experiment has no config_json, only the columns of AUTHORITATIVE)."""
    if record.config_json:
        return config_from_dict(record.config).to_dict(), set()
    stored = Config().to_dict()
    known: set[str] = set()
    for (section, key), column in AUTHORITATIVE:
        value = getattr(record, column)
        if value is None or (column == "model_provider" and value not in PROVIDERS):
            continue
        stored[section][key] = value
        known.add(f"{section}.{key}")
    if record.api_url:
        stored["model"]["api_url"] = record.api_url
    if record.experiment_name:
        stored["experiment"]["name"] = record.experiment_name
    unknown = {k for k in flatten(stored) if kind(k) is Kind.ANSWER} - known
    return stored, unknown


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """As stored: the URL normalized and redacted (the stored one has no credentials)."""
    model = config.get("model")
    return {**config, "model": redact_model_urls(model)} if isinstance(model, dict) else config


def _resume_config(req: RunRequest, record: store.ExperimentRecord) -> _Settings:
    """The stored experiment decides every answer and set key; the YAML (if given),
    environment and flags decide the session keys. See settings.py."""
    stored, unrecorded = _stored_dict(record)
    if req.config_path:
        given_cfg = load_config(req.config_path, overrides=req.overrides, env=req.env,
                                require_data=False)
    else:
        given_cfg = build_config(stored, overrides=req.overrides, env=req.env)
    given = given_cfg.to_dict()
    origin = "in the YAML" if req.config_path else "in the environment or flags"
    drift: list[str] = []
    warnings: list[str] = []
    allowed = tuple(req.allow_drift)
    adopted = tuple(sorted(unrecorded))
    diff: dict[str, Any] = {}
    changes: list[ConfigChange] = []
    used_allow: set[str] = set()
    for d in differences(_comparable(stored), _comparable(given)):
        if d.kind is Kind.IDENTITY:
            continue
        if d.kind is Kind.SESSION:
            diff[d.key] = {"stored": d.stored, "session": d.given}
        elif d.kind is Kind.ANSWER and covered(d.key, adopted):
            changes.append(ConfigChange(d.key, d.stored, d.given, CHANGE_ADOPTED))
        elif d.kind is Kind.ANSWER and covered(d.key, allowed):
            used_allow.update(a for a in allowed if covered(d.key, (a,)))
            diff[d.key] = {"stored": d.stored, "session": d.given}
            changes.append(ConfigChange(d.key, d.stored, d.given, CHANGE_ALLOWED_DRIFT))
            warnings.append(f"allowed drift: {d.key} changes from {short(d.stored)} to "
                            f"{short(d.given)} for this and later sessions (recorded in the "
                            "experiment's config history)")
        else:
            fixed = ("; it decides which narratives belong to the experiment"
                     if d.kind is Kind.SET else f" (to change it: --allow-drift {d.key})")
            drift.append(f"config drift: {d.key} is {short(d.given)} {origin}, the experiment "
                         f"ran with {short(d.stored)}; using the stored value{fixed}")
    for key in allowed:
        if key not in used_allow:
            warnings.append(f"--allow-drift {key}: the given value is the stored one; "
                            "nothing changes")
    if unrecorded:
        fields = sorted({".".join(k.split(".")[:2]) for k in unrecorded})
        warnings.append(
            f"experiment {record.experiment_id} has no stored configuration (written by the R "
            f"version): {', '.join(fields)} are taken from this session's settings and "
            "recorded")
    effective = merge(stored, given, allowed + adopted)
    if unrecorded:
        # Nor did the R version record the column mapping: this session's is recorded.
        effective["data"] = {**given["data"], "file": record.data_file or given["data"]["file"]}
    cfg = config_from_dict(effective)
    new_stored: dict[str, Any] | None = None
    if unrecorded:
        new_stored = _comparable(cfg.to_dict())
    elif changes:
        new_stored = _with_keys(stored, given, allowed)
    return _Settings(cfg, drift, warnings, diff, allowed, changes, new_stored)


def _with_keys(stored: dict[str, Any], given: dict[str, Any],
               keys: tuple[str, ...]) -> dict[str, Any]:
    """The stored configuration with the answer keys covered by `keys` taken from `given`."""
    a, b = flatten(stored), flatten(given)
    out: dict[str, Any] = {}
    for k in dict.fromkeys([*a, *b]):
        source = b if kind(k) is Kind.ANSWER and covered(k, keys) else a
        if k in source:
            out[k] = source[k]
    return config_from_dict(unflatten(out)).to_dict()


# --------------------------------------------------------------------------- data file


def _check_data_unchanged(conn: sqlite3.Connection, record: store.ExperimentRecord,
                          cfg: Config) -> tuple[checksums.Checked, list[str]]:
    """The experiment's data file must hold what was loaded: the same bytes, or (a re-save)
    the same cells the experiment reads. Returns its checksum and the warnings of the
    second case."""
    path = Path(record.data_file or "")
    if not path.is_file():
        raise refusals.data_missing(record.experiment_id, record.data_file)
    checked = checksums.checksum(conn, path)
    now = checked.checksum
    if now == record.data_checksum:
        return checked, []
    assert record.data_checksum is not None
    loaded = stored_ingest(conn, record.data_checksum)
    if loaded is None or not loaded.content_digest:
        raise refusals.data_changed(record.experiment_id, record.data_file,
                                    old=record.data_checksum, new=now,
                                    loaded_at=loaded.loaded_at if loaded else None)
    try:
        digests = read_digests(cfg.data, path)
    except InputError as exc:
        raise refusals.data_changed(record.experiment_id, record.data_file,
                                    old=record.data_checksum, new=now,
                                    loaded_at=loaded.loaded_at, detail=str(exc)) from None
    if digests.content_digest != loaded.content_digest:
        raise refusals.data_changed(record.experiment_id, record.data_file,
                                    old=record.data_checksum, new=now,
                                    loaded_at=loaded.loaded_at,
                                    detail="cells the experiment reads differ")
    what = ("no cell changed" if digests.rows_digest == loaded.rows_digest
            else "only columns the experiment does not read changed")
    return checked, [f"data file {record.data_file} was re-saved since it was loaded on "
                     f"{loaded.loaded_at} (checksum {record.data_checksum} -> {now}) but "
                     f"{what}; resuming on the stored narratives"]


# The narratives the R version loaded without a checksum from one data_source (`s.` is the
# alias of source_narratives in every query using it).
LEGACY_ROWS = "s.data_checksum IS NULL AND s.data_source IS ?"
_SET_ROWS = "s.data_checksum = ?"


def _nth_id(conn: sqlite3.Connection, where: str, params: tuple[Any, ...],
            n: int | None) -> int | None:
    if n is None:
        return None
    row = conn.execute(f"SELECT narrative_id FROM source_narratives s WHERE {where} "
                       "ORDER BY narrative_id LIMIT 1 OFFSET ?", (*params, n - 1)).fetchone()
    return int(row[0]) if row else None


def _legacy_set(conn: sqlite3.Connection,
                record: store.ExperimentRecord) -> tuple[LegacySet, list[str]]:
    """An experiment with no stored checksum (the R version's): find the narratives it ran
    on, compute the data file's checksum, and say what will be recorded."""
    eid, data_file = record.experiment_id, record.data_file
    path = Path(data_file or "")
    if not data_file or not path.is_file():
        raise refusals.data_missing(eid, data_file)
    now = readable_checksum(path)
    # Checksums the R version stored with its narratives (v2 did); loads of our own from the
    # same path since are not the R experiment's.
    tagged = [r[0] for r in conn.execute(
        "SELECT DISTINCT data_checksum FROM source_narratives WHERE data_source = ? "
        "AND data_checksum IS NOT NULL AND data_checksum NOT IN "
        "(SELECT data_checksum FROM ingests WHERE origin IS NULL)", (data_file,))]
    warnings: list[str] = []
    source: str | None = None
    if tagged:
        # The R version stored the file's MD5 with the narratives it loaded.
        if now not in tagged:
            raise refusals.data_changed(eid, data_file, old=", ".join(tagged), new=now)
        key, n_rows = now, store.count_set(conn, now, None)
        where, params = _SET_ROWS, (now,)
    else:
        sources = [r[0] for r in conn.execute(
            "SELECT DISTINCT data_source FROM source_narratives WHERE data_checksum IS NULL")]
        if data_file in sources:
            source = data_file
        elif len(sources) == 1:
            source = sources[0]
            warnings.append(f"the narratives the R version loaded name data file {source!r}, "
                            f"the experiment names {data_file!r}; taking them as its narratives")
        else:
            raise refusals.legacy_set_unknown(eid, data_file)
        if store.count_set(conn, now, None):
            # This file's current content was loaded here since: use those rows.
            key, n_rows = now, store.count_set(conn, now, None)
            where, params = _SET_ROWS, (now,)
            warnings.append(f"data file {data_file} as it is now was already loaded "
                            f"(checksum {now}); resuming on those narratives")
            source = None
        else:
            key = now
            where, params = LEGACY_ROWS, (source,)
            n_rows = int(conn.execute(f"SELECT COUNT(*) FROM source_narratives s WHERE {where}",
                                      params).fetchone()[0])
    max_narratives = _legacy_subset(conn, record, where, params, n_rows)
    warnings.append(
        f"experiment {eid} has no stored data checksum (written by the R version): its "
        f"narratives are the {n_rows} loaded from {data_file}"
        + (f" (the first {max_narratives})" if max_narratives else "")
        + f"; the file's checksum {now} is stored now, so later resumes check against it")
    return LegacySet(key, source, n_rows, max_narratives), warnings


def _legacy_subset(conn: sqlite3.Connection, record: store.ExperimentRecord, where: str,
                   params: tuple[Any, ...], n_rows: int) -> int | None:
    """An R experiment whose total is smaller than its file ran on a subset: accepted as the
    first n_total narratives when every result it holds lies among them, refused otherwise."""
    n_total = record.n_narratives_total
    if record.max_narratives is not None or not n_total or n_total >= n_rows:
        return None
    cutoff = _nth_id(conn, where, params, n_total)
    outside = conn.execute(
        "SELECT COUNT(*) FROM narrative_results r WHERE r.experiment_id = ? AND NOT EXISTS "
        f"(SELECT 1 FROM source_narratives s WHERE {where} "
        "AND s.narrative_id <= ? AND s.incident_id = r.incident_id "
        "AND s.narrative_type = r.narrative_type)",
        (record.experiment_id, *params, cutoff)).fetchone()[0]
    if outside:
        raise refusals.legacy_subset_unknown(record.experiment_id, n_total, n_rows)
    return n_total


# --------------------------------------------------------------------------- retry


def _retry_categories(conn: sqlite3.Connection, req: RunRequest,
                      experiment_id: str) -> tuple[str, ...]:
    """The error categories this retry sends again: --category, or every retryable one."""
    if req.categories is None:
        return tuple(str(c) for c in sorted(RETRYABLE))
    return tuple(req.categories)


def _selection(experiment_id: str, checksum: str, cutoff: int | None, retry: bool,
               categories: tuple[str, ...] | None, *, sampled: bool) -> WorkSelection:
    return WorkSelection(experiment_id, checksum, cutoff, retry_errors_only=retry,
                         categories=categories if retry else None, sampled=sampled)


def _count_errors(conn: sqlite3.Connection, experiment_id: str,
                  categories: tuple[str, ...] | None) -> int:
    counts = store.errors_by_category(conn, experiment_id)
    return sum(n for cat, n in counts.items() if categories is None or cat in categories)


def check_categories(text: str) -> tuple[str, ...]:
    """`--category api_error,timeout` (or `all`) -> the categories, or a usage error."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return tuple(str(c) for c in ErrorCategory)
    valid = {str(c) for c in ErrorCategory}
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise UsageError(f"--category {text!r}: use a comma-separated list of "
                         f"{', '.join(sorted(valid))}, or all")
    return tuple(dict.fromkeys(names))


__all__ = ["LEGACY_ROWS", "Draft", "Intent", "LegacySet", "RunPlan", "RunRequest",
           "check_categories", "complete", "draft", "file_change_lines", "request_from_env"]
