"""report.py: a real experiment's HTML report is self-contained, complete and leaks
neither narrative text nor the API key; edge-case experiments built with SQL render too;
and headless Chromium draws it."""

from __future__ import annotations

import re
import shutil
import sqlite3
import struct
import subprocess
import zlib
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import (
    FIXTURE_ROWS,
    ServerThread,
    cli_env,
    experiment_id_from,
    run_cli,
    write_config,
    write_fixture_csv,
)

from asyncrunner.db.schema import connect
from asyncrunner.errors import RefusedError
from asyncrunner.results.report import (
    ANSWER_CAP,
    calibration_bins,
    cap_answer,
    confidence_histogram,
    default_report_path,
    minute_stats,
    parse_utc,
    top_disagreements,
    write_report,
)

SENTINEL_KEY = "sk-SENTINEL-do-not-leak-4242"
EID = "44444444-4444-4444-8444-444444444444"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(db, experiment id, report HTML) of one real CLI run against the mock server."""
    tmp = tmp_path_factory.mktemp("report")
    data = write_fixture_csv(tmp / "cases.csv")
    with ServerThread() as server:
        cfg = write_config(tmp, data, server.url)
        db = tmp / "exp.db"
        proc = run_cli("run", str(cfg), "--db", str(db),
                       env=cli_env(ASYNCRUNNER_TEST_KEY=SENTINEL_KEY))
    assert proc.returncode == 0, proc.stderr
    eid = experiment_id_from(proc.stdout)
    conn = connect(db)
    try:
        out = write_report(conn, eid, default_report_path(tmp / "out", eid))
    finally:
        conn.close()
    assert out == tmp / "out" / f"{eid}_report.html"
    return db, eid, out.read_text(encoding="utf-8")


def test_report_is_self_contained(real_report: tuple[Path, str, str]) -> None:
    _, _, page = real_report
    assert page.startswith("<!DOCTYPE html>")
    # nothing fetched from anywhere: no remote (or protocol-relative) src/href, no scripts,
    # no CSS imports or url() that could name a font server
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    charts = re.findall(r"<svg\b.*?</svg>", page, re.S)
    # confusion heatmap, confidence, calibration, throughput/latency (no errors: no bar chart)
    assert len(charts) == 4
    assert "<img" not in page
    for chart in charts:  # each one well-formed, so any SVG reader can take it out
        assert ElementTree.fromstring(chart).get("role") == "img"


def test_report_has_matrix_metrics_and_disagreements(
        real_report: tuple[Path, str, str]) -> None:
    _, eid, page = real_report
    assert "Confusion matrix" in page
    # the hand-computed matrix of test_e2e: TP 2, FP 2, TN 4, FN 1
    for cell in ("TP 2", "FP 2", "TN 4", "FN 1"):
        assert f"<td>{cell}</td>" in page
    for name in ("overall", "LE", "CME"):
        assert f"<tr><td>{name}</td>" in page
    # LE: 2/1/2/0, precision 2/3 with its Wilson interval
    assert "<tr><td>LE</td><td>5</td><td>2</td><td>1</td><td>2</td><td>0</td>" in page
    assert "0.667 [" in page
    for heading in ("Experiment", "Confusion matrix", "Metrics by narrative type",
                    "Confidence distribution", "Calibration", "Throughput and latency",
                    "Errors by category", "Top 20 disagreements"):
        assert f"<h2>{heading}</h2>" in page
    assert eid in page and "mock-classifier" in page and "completed" in page
    assert "No errors." in page
    # FP 2 + FN 1 = 3 disagreements, each a row of the disagreements table
    table = page.split('class="disagreements"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 3


def test_report_leaks_no_narrative_text_or_key(real_report: tuple[Path, str, str]) -> None:
    db, _, page = real_report
    texts = [t for row in FIXTURE_ROWS for t in row[1:3] if t]
    assert len(texts) == 9
    for text in texts:
        assert text not in page
        assert text.rstrip(".") not in page
    assert SENTINEL_KEY not in page
    assert "ASYNCRUNNER_TEST_KEY" not in page  # not even the variable's name is needed
    # the texts are in the database, so their absence above is the report's doing
    conn = sqlite3.connect(db)
    try:
        stored = {r[0] for r in conn.execute("SELECT narrative_text FROM source_narratives")}
    finally:
        conn.close()
    assert set(texts) <= stored


# --------------------------------------------------------------------------- SQL-built


def make_experiment(db: Path, status: str = "completed",
                    rows: list[tuple[str, str, int | None, float | None, int | None, str | None,
                                     str | None]] | None = None) -> sqlite3.Connection:
    """rows: (incident, type, detected, confidence, label, error category, rationale)."""
    conn = connect(db)
    conn.execute(
        "INSERT INTO experiments (experiment_id, experiment_name, status, model_name, "
        "model_provider, temperature, prompt_version, data_file, data_checksum, "
        "n_narratives_total, start_time, config_json) VALUES (?, 'edge <case>', ?, 'm', "
        "'openai', 0.2, 'v1', 'cases.csv', 'abc', ?, '2026-11-23 12:00:00', "
        "'{\"model\": {\"api_key_env\": \"SECRET_VAR\"}}')", (EID, status, len(rows or [])))
    for i, (inc, ntype, det, conf, label, err, why) in enumerate(rows or []):
        conn.execute(
            "INSERT INTO narrative_results (experiment_id, incident_id, narrative_type, "
            "detected, confidence, rationale, response_sec, error_occurred, error_category, "
            "error_message, processed_at, manual_flag_ind) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (EID, inc, ntype, det, conf, why, 0.1 + 0.01 * i, int(err is not None), err,
             err and f"{err} happened", f"2026-11-23T12:{i // 3:02d}:{i % 60:02d}.5Z",
             label))
    return conn


def render(conn: sqlite3.Connection, out: Path) -> str:
    try:
        write_report(conn, EID, out)
    finally:
        conn.close()
    page = out.read_text(encoding="utf-8")
    assert "Confusion matrix" in page and page.rstrip().endswith("</html>")
    assert not list(out.parent.glob("*.partial"))
    return page


def test_zero_results(tmp_path: Path) -> None:
    page = render(make_experiment(tmp_path / "x.db", status="running"), tmp_path / "r.html")
    assert "still running" in page
    assert "No scored results yet" in page and "No errors." in page
    assert "No disagreements" in page and "<svg" not in page
    assert "<td>TP 0</td>" in page and "SECRET_VAR" not in page
    assert "edge &lt;case&gt;" in page and "edge <case>" not in page


def test_all_errors(tmp_path: Path) -> None:
    rows = [(str(i), "LE", None, None, 1, cat, None)
            for i, cat in enumerate(["timeout", "timeout", "rate_limit", "parse_error"])]
    page = render(make_experiment(tmp_path / "x.db", rows=rows), tmp_path / "r.html")
    errors = page.split('<section id="errors">', 1)[1].split("</section>", 1)[0]
    assert "<tr><td>timeout</td><td>2</td></tr>" in errors
    assert "<tr><td>rate_limit</td><td>1</td></tr>" in errors
    assert "<svg" in errors  # the bar chart
    assert "Not scored: 4 error rows" in page
    assert "No labelled results" in page


def test_no_labels_one_type_and_hostile_rationale(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script> & <img src=https://evil.example/x.png>'
    rows = [(str(i), "LE", i % 2, 0.9, None, None, hostile) for i in range(6)]
    rows.append(("99", "LE", 1, 0.95, 0, None, hostile))  # one labelled disagreement
    page = render(make_experiment(tmp_path / "x.db", rows=rows), tmp_path / "r.html")
    # the text is shown, inert: no element or attribute of it survives
    assert "<script" not in page and "<img src=https" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    assert "<tr><td>LE</td>" in page and "<tr><td>CME</td>" not in page
    assert "6 results without a manual label" in page
    table = page.split('class="disagreements"', 1)[1].split("</table>", 1)[0]
    assert "<td>99</td><td>LE</td><td>1</td><td>0</td><td>0.95</td>" in table


def test_labels_of_one_class_only(tmp_path: Path) -> None:
    # one histogram series empty, a single minute, a single calibration bin
    rows = [(str(i), "CME", 0, 0.8, 0, None, "fine") for i in range(3)]
    page = render(make_experiment(tmp_path / "x.db", rows=rows), tmp_path / "r.html")
    assert page.count("<svg") == 4
    assert "<td>TN 3</td>" in page


def test_unknown_experiment_is_refused(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db")
    try:
        with pytest.raises(RefusedError, match=EID):
            write_report(conn, EID, tmp_path / "r.html")
    finally:
        conn.close()
    assert not (tmp_path / "r.html").exists()


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "r.html"
    out.parent.mkdir()
    out.write_text("old")
    render(make_experiment(tmp_path / "x.db"), out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["r.html"]


# --------------------------------------------------------------------------- no plotting library


def test_cli_report_needs_no_plotting_library(tmp_path: Path) -> None:
    """A real run and `report` in processes where matplotlib cannot be imported: the charts
    are the package's own SVG, so the run writes its report and `report` succeeds."""
    stub = tmp_path / "no_matplotlib" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        "raise ImportError(\"No module named 'matplotlib' (simulated)\")\n")
    env = cli_env(PYTHONPATH=str(stub.parent), ASYNCRUNNER_TEST_KEY="k")
    data = write_fixture_csv(tmp_path / "cases.csv")
    db = tmp_path / "exp.db"
    with ServerThread() as server:
        cfg = write_config(tmp_path, data, server.url)
        proc = run_cli("run", str(cfg), "--db", str(db), env=env)
    assert proc.returncode == 0, proc.stderr
    eid = experiment_id_from(proc.stdout)
    assert "matplotlib" not in proc.stdout + proc.stderr
    assert (tmp_path / "out" / f"{eid}_report.html").read_text(encoding="utf-8").count(
        "<svg") == 4
    report = run_cli("report", eid, "--out", str(tmp_path / "r.html"), "--db", str(db),
                     env=env)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "r.html").read_text(encoding="utf-8").count("<svg") == 4


# --------------------------------------------------------------------------- chart data


def test_calibration_bins_hand_computed(tmp_path: Path) -> None:
    conn = make_experiment(tmp_path / "x.db", rows=[
        ("1", "LE", 1, 0.95, 1, None, None),   # p(detected) 0.95 -> bin 9
        ("2", "LE", 1, 1.0, 0, None, None),    # p 1.0 -> bin 9 (top edge stays in the last bin)
        ("3", "LE", 0, 0.95, 0, None, None),   # p = 1 - 0.95 = 0.05 -> bin 0
        ("4", "LE", 0, 0.85, 1, None, None),   # p 0.15 -> bin 1
        ("5", "LE", 0, 0.85, 0, None, None),   # p 0.15 -> bin 1
        ("6", "LE", 1, 0.6, None, None, None),  # unlabelled: left out
        ("7", "LE", None, None, 1, "timeout", None),  # error: left out
        ("8", "LE", 1, None, 1, None, None),   # no confidence: left out
    ])
    try:
        bins = calibration_bins(conn, EID)
        hist = confidence_histogram(conn, EID)
    finally:
        conn.close()
    assert [(b.lower, b.n) for b in bins] == [(0.0, 1), (0.1, 2), (0.9, 2)]
    # bin 9: mean p = (0.95 + 1.0)/2 = 0.975, observed = 1/2; bin 1: 0.15 and 1/2
    assert bins[2].mean_predicted == pytest.approx(0.975)
    assert bins[2].observed_rate == pytest.approx(0.5)
    assert bins[1].mean_predicted == pytest.approx(0.15)
    assert bins[1].observed_rate == pytest.approx(0.5)
    assert bins[0].observed_rate == 0.0
    # confidence histogram, 20 bins: label 1 has 0.95 (bin 19) and 0.85 (bin 17); label 0 has
    # 1.0 (top edge: bin 19), 0.95 (bin 19) and 0.85 (bin 17)
    assert len(hist.edges) == 21 and hist.edges[0] == 0.0 and hist.edges[-1] == 1.0
    assert {i: n for i, n in enumerate(hist.positive) if n} == {17: 1, 19: 1}
    assert {i: n for i, n in enumerate(hist.negative) if n} == {17: 1, 19: 2}
    assert hist.n == 5


def test_time_helpers_and_minute_stats(tmp_path: Path) -> None:
    t = parse_utc("2026-11-23T12:00:59.123456Z")
    assert t == datetime(2026, 11, 23, 12, 0, 59, 123456, tzinfo=UTC)
    assert parse_utc("2026-11-23T12:00:00") == datetime(2026, 11, 23, 12, tzinfo=UTC)
    assert parse_utc("garbage") is None and parse_utc(None) is None
    conn = make_experiment(tmp_path / "x.db")
    stamps = [("2026-11-23T12:00:01.000000Z", 0.5), ("2026-11-23T12:00:59.999999Z", 0.1),
              ("2026-11-23T12:01:00.000000Z", None), ("2026-11-23T12:03:30.000000Z", 2.0),
              ("2026-11-23T14:03:40+02:00", 1.0),     # an older row's offset: 12:03 UTC
              ("garbage", 9.0), (None, 9.0)]
    stamps += [(f"2026-11-23T12:05:{s:02d}.0Z", float(s)) for s in range(1, 41)]
    for i, (when, secs) in enumerate(stamps):
        conn.execute("INSERT INTO narrative_results (experiment_id, incident_id, "
                     "narrative_type, processed_at, response_sec) VALUES (?, ?, 'LE', ?, ?)",
                     (EID, str(i), when, secs))
    try:
        minutes = minute_stats(conn, EID)
    finally:
        conn.close()
    at = [datetime(2026, 11, 23, 12, m, tzinfo=UTC) for m in (0, 1, 3, 5)]
    assert [(m.minute, m.results) for m in minutes] == [(at[0], 2), (at[1], 1), (at[2], 2),
                                                         (at[3], 40)]
    assert minutes[0].latency == (0.1, 0.5, 0.5)   # nearest rank of two: 1st, 2nd, 2nd
    assert minutes[1].latency is None              # no response time in that minute
    # 12:05 holds 1..40 s: median = 20th value, p90 = 36th, p99 = 40th
    assert minutes[3].latency == (20.0, 36.0, 40.0)


def test_a_long_answer_is_capped_in_the_disagreements_table(tmp_path: Path) -> None:
    long = "x" * (ANSWER_CAP + 500)
    rows = [("1", "LE", 1, 0.9, 0, None, long), ("2", "LE", 0, 0.8, 1, None, "short")]
    conn = make_experiment(tmp_path / "x.db", rows=rows)
    shown = [r[-1] for r in top_disagreements(conn, EID)]
    assert shown[0] == "x" * ANSWER_CAP + " [... 500 more characters not shown]"
    assert shown[1] == "short"
    assert cap_answer(None) is None and cap_answer("x" * ANSWER_CAP) == "x" * ANSWER_CAP
    page = render(conn, tmp_path / "r.html")
    assert "x" * ANSWER_CAP + " [... 500 more" in page and "x" * (ANSWER_CAP + 1) not in page


# --------------------------------------------------------------------------- screenshot


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path to Chromium; installs it once with apt-get if absent, else skips."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is not available")
    try:
        # A fresh machine's package lists may be stale or empty: refresh them first.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300,
                       check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       timeout=600, check=False)
    except (subprocess.TimeoutExpired, OSError) as exc:
        pytest.skip(f"chromium is not installed and apt-get install failed: {exc}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` "
                    "did not provide it (no root or no network?)")
    return found


def distinct_samples(path: Path) -> int:
    """Distinct 3-byte samples of a PNG's decompressed image data. PNG filters turn a flat
    row into runs of one byte, so a blank page has a handful whatever filters the writer
    chose; a page of text, tables and charts has hundreds. (No imaging library is a
    dependency, and the pixels themselves are not needed for this.)"""
    data = path.read_bytes()
    pos, chunks = 8, []
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + size])
        pos += 12 + size
    raw = zlib.decompress(b"".join(chunks))
    return len({raw[i:i + 3] for i in range(0, len(raw) - 3, 21)})


def test_screenshot_with_headless_chromium(chromium: str, tmp_path: Path,
                                          real_report: tuple[Path, str, str]) -> None:
    report = tmp_path / "report.html"
    report.write_text(real_report[2], encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
        capture_output=True, text=True, timeout=60, check=False)
    assert shot.exists(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert len(data) > 20_000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert distinct_samples(shot) > 200  # text, tables and charts, not one flat colour
