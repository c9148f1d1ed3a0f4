"""The report's error analysis, each figure from a database built with SQL and checked by
hand: the Brier score beside the calibration curve, the confusion matrix of each narrative
type, the indicators of true vs false positives (model output: escaped and capped), and
the share of outputs cut off or repaired; then the sections in the written HTML."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from asyncrunner.db.schema import connect
from asyncrunner.results.metrics import Confusion, metrics_report
from asyncrunner.results.report import (
    INDICATOR_CAP,
    N_INDICATORS,
    BrierScore,
    OutputQuality,
    brier_score,
    output_quality,
    section_confusion_by_type,
    top_indicators,
    write_report,
)

EID = "99999999-9999-4999-8999-999999999999"
CHECKSUM = "sum-r"
HOSTILE = "<script>alert(1)</script>"


@dataclass(frozen=True)
class Row:
    incident: str
    ntype: str = "LE"
    detected: int | None = 1
    confidence: float | None = 0.9
    label: int | None = 1
    error: str | None = None
    indicators: str | None = None
    finish_reason: str | None = "stop"
    answer_source: str | None = "first"


def make(db: Path, rows: list[Row]) -> sqlite3.Connection:
    conn = connect(db)
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, data_file, data_checksum, "
        "n_narratives_total, start_time, config_json) VALUES (?, 'analysis', 'completed', "
        "'m', 'openai', 0.2, 'v1', 'cases.csv', ?, ?, '2026-11-23 12:00:00', '{}')",
        (EID, CHECKSUM, len(rows)))
    for i, r in enumerate(rows):
        conn.execute(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, confidence, indicators, rationale, response_sec, error_occurred, "
            "error_category, error_message, processed_at, manual_flag_ind, manual_flag, "
            "finish_reason, answer_source) "
            "VALUES (?, ?, ?, ?, ?, ?, 'why', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (EID, r.incident, r.ntype, None if r.error else r.detected,
             None if r.error else r.confidence, r.indicators, 0.1 + 0.01 * i,
             int(r.error is not None), r.error, r.error and f"{r.error} happened",
             f"2026-11-23T12:00:{i % 60:02d}.5Z", r.label, r.label, r.finish_reason,
             None if r.error else r.answer_source))
    return conn


def decide(conn: sqlite3.Connection, incident: str, ntype: str, label: int) -> None:
    conn.execute(
        "INSERT INTO label_sets (label_set, data_checksum, incident_id, narrative_type, "
        "label, imported_at) VALUES ('adjudicated', ?, ?, ?, ?, '2026-11-24T09:00:00Z')",
        (CHECKSUM, incident, ntype, label))


def indicators(*items: object) -> str:
    return json.dumps(list(items))


# --------------------------------------------------------------------------- Brier score


BRIER_ROWS = [
    Row("1", detected=1, confidence=0.9, label=1),   # p 0.9, (0.9 - 1)^2 = 0.01
    Row("2", detected=1, confidence=0.8, label=0),   # p 0.8, 0.64
    Row("3", detected=0, confidence=0.7, label=0),   # p 1 - 0.7 = 0.3, 0.09
    Row("4", detected=0, confidence=0.6, label=1),   # p 0.4, 0.36
    Row("5", detected=1, confidence=0.5, label=None),        # unlabelled: left out
    Row("6", detected=1, confidence=None, label=1),          # no confidence: left out
    Row("7", error="parse_error", label=1),                  # error: left out
]


def test_brier_score_hand_computed(tmp_path: Path) -> None:
    conn = make(tmp_path / "x.db", BRIER_ROWS)
    try:
        brier = brier_score(conn, EID)
        # (0.01 + 0.64 + 0.09 + 0.36) / 4 = 0.275; base rate 2/4, reference 0.25
        assert brier.n == 4
        assert brier.score == pytest.approx(0.275)
        assert brier.base_rate == pytest.approx(0.5)
        assert brier.reference == pytest.approx(0.25)
        assert brier.skill == pytest.approx(1 - 0.275 / 0.25)  # -0.1: worse than the base rate
        assert brier_score(conn, EID, labels="manual") == brier
        # A reviewer decides 2 is positive: (0.8 - 1)^2 = 0.04, so (0.01 + 0.04 + 0.09
        # + 0.36) / 4 = 0.125; base rate 3/4, reference 3/16, skill 1 - 0.125 / 0.1875 = 1/3
        decide(conn, "2", "LE", 1)
        adjudicated = brier_score(conn, EID, labels="adjudicated")
        assert adjudicated.score == pytest.approx(0.125)
        assert adjudicated.base_rate == pytest.approx(0.75)
        assert adjudicated.skill == pytest.approx(1 / 3)
        assert brier_score(conn, EID) == brier
    finally:
        conn.close()


def test_brier_score_edges(tmp_path: Path) -> None:
    conn = make(tmp_path / "x.db", [Row("1", error="timeout"),
                                    Row("2", detected=1, confidence=1.4, label=1),
                                    Row("3", detected=0, confidence=-0.5, label=1)])
    try:
        # confidence is clamped as the calibration curve clamps it: p 1.0 and 1 - 0 = 1.0
        brier = brier_score(conn, EID)
        assert (brier.n, brier.score, brier.base_rate) == (2, 0.0, 1.0)
        assert brier.reference == 0.0 and brier.skill is None  # one class: no reference
    finally:
        conn.close()
    empty = make(tmp_path / "y.db", [])
    try:
        assert brier_score(empty, EID) == BrierScore(0, None, None)
        assert BrierScore(0, None, None).skill is None
    finally:
        empty.close()


# --------------------------------------------------------------------------- by type


def test_confusion_by_type(tmp_path: Path) -> None:
    rows = [Row("1", "LE", 1, label=1), Row("2", "LE", 1, label=0), Row("3", "LE", 0, label=1),
            Row("4", "LE", 0, label=0), Row("1", "CME", 0, label=0), Row("2", "CME", 0, label=0),
            Row("3", "CME", 1, label=1), Row("4", "CME", error="timeout")]
    conn = make(tmp_path / "x.db", rows)
    try:
        scored = metrics_report(conn, EID)
        assert scored.by_type == {"LE": Confusion(tp=1, fp=1, tn=1, fn=1),
                                  "CME": Confusion(tp=1, fp=0, tn=2, fn=0)}
        html = section_confusion_by_type(scored)
        assert ('<tr><th rowspan="2">CME</th><th>detected 1</th><td>TP 1</td><td>FP 0</td>'
                '<td rowspan="2">3</td></tr><tr><th>detected 0</th><td>FN 0</td>'
                '<td>TN 2</td></tr>') in html
        assert ('<tr><th rowspan="2">LE</th><th>detected 1</th><td>TP 1</td><td>FP 1</td>'
                '<td rowspan="2">4</td></tr><tr><th>detected 0</th><td>FN 1</td>'
                '<td>TN 1</td></tr>') in html
        assert "<th>manual label 1</th>" in html
        decide(conn, "2", "LE", 1)
        adjudicated = metrics_report(conn, EID, labels="adjudicated")
        assert adjudicated.by_type["LE"] == Confusion(tp=2, fp=0, tn=1, fn=1)
        assert "<td>TP 2</td><td>FP 0</td>" in section_confusion_by_type(
            adjudicated, label="adjudicated label")
    finally:
        conn.close()
    with closing(make(tmp_path / "z.db", [Row("1", "<b>T</b>", 1, label=1)])) as other:
        hostile = section_confusion_by_type(metrics_report(other, EID))
    assert "&lt;b&gt;T&lt;/b&gt;" in hostile and "<b>T" not in hostile


# --------------------------------------------------------------------------- indicators


def indicator_rows() -> list[Row]:
    long = "x" * (INDICATOR_CAP + 50)
    return [
        # true positives (detected 1, label 1)
        Row("t1", indicators=indicators("prior abuse", "threats", "threats")),  # once here
        Row("t2", indicators=indicators("prior abuse", " threats ", 7, None)),
        Row("t3", indicators=indicators("prior abuse", long)),
        Row("t4", indicators="not json at all"),
        Row("t5", indicators='{"cue": "an object, not an array"}'),
        Row("t6", indicators=None),
        Row("t7", indicators=indicators(*(f"cue {i:02d}" for i in range(12)))),
        # false positives (detected 1, label 0)
        Row("f1", label=0, indicators=indicators(HOSTILE, "prior abuse")),
        Row("f2", label=0, indicators=indicators(HOSTILE, "")),
        Row("f3", label=0, indicators=indicators("argument")),
        # neither: a true negative, a false negative, an unlabelled and an error row
        Row("n1", detected=0, label=0, indicators=indicators("prior abuse")),
        Row("n2", detected=0, label=1, indicators=indicators("prior abuse")),
        Row("n3", label=None, indicators=indicators("prior abuse")),
        Row("n4", error="parse_error", indicators=indicators("prior abuse")),
    ]


def test_top_indicators_of_true_and_false_positives(tmp_path: Path) -> None:
    conn = make(tmp_path / "x.db", indicator_rows())
    try:
        counts = top_indicators(conn, EID)
        assert (counts.n_tp, counts.n_fp) == (7, 3)
        # "threats" twice in t1 counts once; t2's " threats " is trimmed to the same
        assert counts.tp[:2] == (("prior abuse", 3), ("threats", 2))
        assert len(counts.tp) == N_INDICATORS
        # the rest tie at 1: by text, so "cue 00".."cue 07" come before "cue 08", "x..."
        assert [text for text, _ in counts.tp[2:]] == [f"cue {i:02d}" for i in range(8)]
        assert counts.fp == ((HOSTILE, 2), ("argument", 1), ("prior abuse", 1))
        # a reviewer decides f3 was positive after all: its indicator moves across
        decide(conn, "f3", "LE", 1)
        adjudicated = top_indicators(conn, EID, labels="adjudicated")
        assert (adjudicated.n_tp, adjudicated.n_fp) == (8, 2)
        assert ("argument", 1) not in adjudicated.fp
        assert ("argument", 1) in top_indicators(conn, EID, labels="adjudicated", limit=20).tp
    finally:
        conn.close()


def test_a_long_indicator_is_capped(tmp_path: Path) -> None:
    conn = make(tmp_path / "x.db", indicator_rows())
    try:
        tp = dict(top_indicators(conn, EID, limit=50).tp)
    finally:
        conn.close()
    capped = [text for text in tp if text.startswith("x")]
    assert capped == ["x" * INDICATOR_CAP + " [... 50 more characters not shown]"]


# --------------------------------------------------------------------------- output


def test_truncated_and_repaired_shares(tmp_path: Path) -> None:
    rows = [
        Row("1", finish_reason="length", error="parse_error"),  # cut off, did not parse
        Row("2", finish_reason="length", answer_source="repair"),  # cut off, then repaired
        Row("3", answer_source="repair"),
        Row("4", answer_source="resample"),
        Row("5"), Row("6"), Row("7", finish_reason=None, answer_source=None),
        Row("8", error="timeout", finish_reason=None),
    ]
    conn = make(tmp_path / "x.db", rows)
    try:
        quality = output_quality(conn, EID)
    finally:
        conn.close()
    assert quality == OutputQuality(results=8, answers=6, truncated=2, truncated_answers=1,
                                    repaired=2, resampled=1)
    assert quality.truncated_share == pytest.approx(2 / 8)
    assert quality.second_chance == 3
    assert quality.second_chance_share == pytest.approx(3 / 6)
    none = OutputQuality(0, 0, 0, 0, 0, 0)
    assert none.truncated_share is None and none.second_chance_share is None


# --------------------------------------------------------------------------- the page


def test_report_shows_the_analysis_sections(tmp_path: Path) -> None:
    rows = [*BRIER_ROWS, *indicator_rows(),
            Row("c1", "CME", 0, label=0, finish_reason="length", answer_source="resample")]
    conn = make(tmp_path / "x.db", rows)
    out = tmp_path / "r.html"
    try:
        write_report(conn, EID, out)
    finally:
        conn.close()
    page = out.read_text(encoding="utf-8")
    for heading in ("Confusion matrix by narrative type", "Calibration",
                    "Indicators of true and false positives",
                    "Truncated and repaired outputs"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("<h2>Calibration</h2>") == 1  # extended, not a second section
    calibration = page.split('<section id="calibration">', 1)[1].split("</section>", 1)[0]
    assert "Brier score" in calibration and "<svg" in calibration
    # the model's text is shown inert
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    indicators_html = page.split('<section id="indicators">', 1)[1].split("</section>", 1)[0]
    assert "<td>prior abuse</td><td>" in indicators_html
    # BRIER_ROWS' "2" is a false positive without indicators: 4 false positives in all
    assert "Top 10 indicators of false positives (4 answers)" in indicators_html
    assert f"<td>{HOSTILE.replace('<', '&lt;').replace('>', '&gt;')}</td><td>2</td>" \
        "<td>50.0%</td>" in indicators_html
    output = page.split('<section id="output">', 1)[1].split("</section>", 1)[0]
    assert "finish_reason = length" in output
    assert "Scored against the manual labels" in page
    by_type = page.split('<section id="confusion-by-type">', 1)[1].split("</section>", 1)[0]
    assert '<th rowspan="2">CME</th>' in by_type and '<th rowspan="2">LE</th>' in by_type
