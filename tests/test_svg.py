"""svg.py and the charts drawn with it: well-formed, escaped, deterministic and bounded in
size, whatever the data (empty, one point, missing values, huge counts, days of minutes)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

import pytest

from asyncrunner.results import report as chart_module
from asyncrunner.results import svg
from asyncrunner.results.report import (
    CalibrationBin,
    ConfidenceHistogram,
    MinuteStats,
    chart_calibration,
    chart_confidence,
    chart_confusion,
    chart_errors,
    chart_timeline,
)

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=y> \x00\x1b\ud800'
# ...as a chart shows it: characters XML cannot carry replaced, the rest as text.
HOSTILE_SHOWN = '<script>alert("x")</script> & <img src=x onerror=y> \ufffd\ufffd\ufffd'
T0 = datetime(2026, 11, 23, 22, 17, tzinfo=UTC)
GEOMETRY = ("x", "y", "x1", "y1", "x2", "y2", "width", "height", "d", "viewBox")


def parse(chart: str) -> ElementTree.Element:
    """The chart as XML (it must be well-formed), after the checks every chart passes."""
    root = ElementTree.fromstring(chart)
    assert root.tag == "svg" and root.get("role") == "img"
    title = root.find("title")
    assert title is not None and title.text == root.get("aria-label")
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    assert "system-ui" in (root.get("font-family") or "")
    for element in root.iter():
        assert element.get("id") is None  # charts share a page: ids would clash
        for name in GEOMETRY:  # one decimal at most, so output is deterministic
            assert not re.search(r"\.\d\d", element.get(name) or ""), (name, element.attrib)
            assert "nan" not in (element.get(name) or "").lower()
    return root


def texts(root: ElementTree.Element) -> list[str]:
    return [t.text or "" for t in root.iter("text")]


def hist(positive: list[int], negative: list[int]) -> ConfidenceHistogram:
    n = len(positive)
    return ConfidenceHistogram(tuple(i / n for i in range(n + 1)), tuple(positive),
                               tuple(negative))


def minutes(count: int, start: datetime = T0, *, gap: range | None = None) -> list[MinuteStats]:
    return [MinuteStats(start + timedelta(minutes=i), 10 + i % 7,
                        (0.5 + i % 3, 1.5 + i % 5, 3.0 + i % 11))
            for i in range(count) if gap is None or i not in gap]


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize(("span", "max_ticks", "integer", "step"), [
    (1.0, 6, False, 0.2), (0.04, 6, False, 0.01), (7, 6, True, 2), (3, 6, True, 1),
    (0.5, 6, True, 1), (1e12, 6, True, 2e11), (50, 5, False, 10), (0, 6, False, 1),
    (math.nan, 6, False, 1),
])
def test_nice_step_is_one_two_or_five_times_a_power_of_ten(
        span: float, max_ticks: int, integer: bool, step: float) -> None:
    assert svg.nice_step(span, max_ticks, integer=integer) == pytest.approx(step)


def test_ticks_and_their_labels() -> None:
    assert svg.ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svg.tick_labels(svg.ticks(0.0, 1.0)) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert svg.ticks(-0.02, 1.02) == svg.ticks(0.0, 1.0)
    assert svg.ticks(0, 3, integer=True) == [0, 1, 2, 3]
    assert svg.tick_labels(svg.ticks(0, 5000, integer=True)) == [
        "0", "1,000", "2,000", "3,000", "4,000", "5,000"]
    assert svg.tick_labels(svg.ticks(0.0, 0.04)) == ["0.00", "0.01", "0.02", "0.03", "0.04"]
    assert svg.tick_labels(svg.ticks(-1.0, 1.0)) == ["-1.0", "-0.5", "0.0", "0.5", "1.0"]
    assert svg.ticks(1.0, 0.0) == [] and svg.ticks(0.0, math.inf) == []
    assert svg.nice_top(0) == 1 and svg.nice_top(7, integer=True) == 8
    assert svg.nice_top(0.037) == pytest.approx(0.04) and svg.nice_top(math.nan) == 1


def test_time_ticks_from_one_minute_to_weeks() -> None:
    one = svg.time_ticks(T0, T0 + timedelta(minutes=1))
    assert [label for _, label in one] == ["22:17\n2026-11-23", "22:18"]
    # across midnight the date shows again, under the first time of the new day
    night = [label for _, label in svg.time_ticks(T0, T0 + timedelta(hours=4))]
    assert night == ["23:00\n2026-11-23", "00:00\n2026-11-24", "01:00", "02:00"]
    days = svg.time_ticks(T0, T0 + timedelta(days=3))
    assert 3 <= len(days) <= 8 and all(label.startswith(("00:00", "12:00")) for _, label in days)
    weeks = svg.time_ticks(T0, T0 + timedelta(days=60))
    assert 2 <= len(weeks) <= 8 and all(re.fullmatch(r"\d{4}-\d\d-\d\d", s) for _, s in weeks)
    assert all(T0.timestamp() <= t <= (T0 + timedelta(days=60)).timestamp() for t, _ in weeks)
    assert svg.time_ticks(T0, T0 - timedelta(minutes=1)) == []


def test_escaping_makes_any_label_inert_and_valid_xml() -> None:
    shown = svg.esc(HOSTILE)
    assert "<" not in shown and '"' not in shown and "\x00" not in shown
    assert "&amp;" in shown and "\ufffd" in shown
    shown.encode("utf-8")  # no lone surrogate left to fail the write
    root = parse(svg.document(100, 50, HOSTILE, svg.text(5, 5, HOSTILE)))
    assert texts(root) == [HOSTILE_SHOWN]


def test_numbers_have_one_decimal_and_no_negative_zero() -> None:
    assert [svg.num(v) for v in (0.0, -0.0, -0.04, 1.25, 3.0, 2.96, 1e6)] == [
        "0", "0", "0", "1.2", "3", "3", "1000000"]


def test_scale_clamps_and_survives_an_empty_domain() -> None:
    scale = svg.Scale(0.0, 1.0, 10.0, 110.0)
    assert (scale(0.5), scale(-3.0), scale(9.0)) == (60.0, 10.0, 110.0)
    assert svg.Scale(1.0, 1.0, 0.0, 100.0)(5.0) == 50.0


def test_missing_values_are_skipped_and_break_the_line() -> None:
    x, y = svg.Scale(0, 10, 0, 100), svg.Scale(0, 10, 100, 0)
    points = [(0.0, 1.0), (1.0, None), (2.0, math.nan), (3.0, 2.0), (4.0, math.inf),
              (None, 3.0), (5.0, 4.0)]
    assert svg.line_d(points, x, y) == "M0 90 M30 80 M50 60"
    assert svg.dots_d(points, x, y).count("h0") == 3
    assert svg.line_d([], x, y) == "" and svg.path("") == ""
    assert svg.area_d([(1.0, 5.0)], x, y) == "M10 100 L10 50 L10 100 Z"


def test_thin_keeps_a_few_points_per_pixel_column() -> None:
    spiky = [(i / 100, 50.0 + (40 if i == 777 else i % 3)) for i in range(100_000)]
    kept = svg.thin(spiky)
    assert len(kept) <= 4 * 1001
    assert (7.77, 90.0) in kept                 # a one-sample spike survives
    assert kept[0] == spiky[0] and kept[-1] == spiky[-1]
    assert svg.thin([(0.0, 1.0), (0.1, 2.0)]) == [(0.0, 1.0), (0.1, 2.0)]


def test_blues_runs_from_near_white_to_dark_blue() -> None:
    assert svg.blues(0, 10) == "#f7fbff" and svg.blues(10, 10) == "#08306b"
    assert svg.blues(99, 10) == "#08306b" and svg.blues(5, 0) == "#f7fbff"
    assert re.fullmatch(r"#[0-9a-f]{6}", svg.blues(3.3, 10))


def test_legend_and_document() -> None:
    root = parse(svg.document(320, 200, "a legend", svg.legend(5, 5, [
        (svg.BOX, "#c0392b", "one & <two>"), (svg.DASHED, "grey", "dashed"),
        (svg.LINE_DOT, "black", "dotted")])))
    assert texts(root) == ["one & <two>", "dashed", "dotted"]
    assert root.get("width") == "320" and root.get("height") == "200"
    assert svg.legend(0, 0, []) == ""


# --------------------------------------------------------------------------- charts


def test_confusion_heatmap() -> None:
    root = parse(chart_confusion(1, 1, 9, 0, label=HOSTILE))
    shown = texts(root)
    assert shown[0] == "Confusion matrix"
    assert shown[1:9] == ["TP", "1", "FP", "1", "FN", "0", "TN", "9"]
    assert {"label 1", "label 0", "detected 1", "detected 0", "predicted",
            HOSTILE_SHOWN} <= set(shown)
    assert root.get("aria-label") == "Confusion matrix heatmap"
    cells = [r.get("fill") for r in root.iter("rect")][1:5]
    assert cells[2] == "#f7fbff" and cells[3] == "#08306b"   # 0 palest, the top darkest
    white = [t.text for t in root.iter("text") if t.get("fill") == "white"]
    assert white == ["TN", "9"]                               # only on dark cells


def test_confusion_with_nothing_and_with_huge_counts() -> None:
    assert set(texts(parse(chart_confusion(0, 0, 0, 0)))[2:9:2]) == {"0"}
    root = parse(chart_confusion(10**15, 7, 123_456_789_012, 0))
    big = next(t for t in root.iter("text") if t.text == str(10**15))
    # shrunk to fit its 115-pixel cell
    assert float(big.get("font-size") or 0) * svg.CHAR_WIDTH * 16 <= 115


def test_confidence_histogram() -> None:
    root = parse(chart_confidence(hist([0, 2, 0, 9], [1, 0, 0, 4]), label="adjudicated label"))
    shown = texts(root)
    assert "adjudicated label 1 (n=11)" in shown and "adjudicated label 0 (n=5)" in shown
    paths = [p for p in root.iter("path") if p.get("fill") in ("#c0392b", "#2471a3")]
    assert [p.get("d", "").count("Z") for p in paths[:2]] == [2, 2]   # no empty bars
    assert {"0", "2", "4", "6", "8", "10"} <= set(shown)               # whole counts
    assert root.get("aria-label") == "Confidence distribution by adjudicated label"


def test_confidence_histogram_empty_and_huge() -> None:
    shown = texts(parse(chart_confidence(hist([0] * 20, [0] * 20), label=HOSTILE)))
    assert f"{HOSTILE_SHOWN} 1 (n=0)" in shown and "results" in shown
    root = parse(chart_confidence(hist([10**12, 1], [0, 5])))
    assert "1,000,000,000,000" in texts(root)
    labels = [t for t in root.iter("text") if t.text == "1,000,000,000,000"]
    assert float(labels[0].get("x") or 0) > svg.text_width("1,000,000,000,000")  # fits


def test_calibration_curve() -> None:
    bins = [CalibrationBin(0.0, 0.1, 12, 0.05, 0.1), CalibrationBin(0.5, 0.6, 3, 0.55, 0.4),
            CalibrationBin(0.9, 1.0, 40, 0.97, float("nan"))]
    root = parse(chart_calibration(bins))
    shown = texts(root)
    assert {"perfect calibration", "observed", "12", "3"} <= set(shown)
    assert "40" not in shown                                  # its rate is NaN: skipped
    assert any(line.get("stroke-dasharray") for line in root.iter("line"))
    assert root.get("aria-label") == "Calibration curve"
    assert "observed" in texts(parse(chart_calibration([])))
    one = parse(chart_calibration(bins[:1]))
    assert any("h0" in (p.get("d") or "") for p in one.iter("path"))  # a lone point shows


def test_timeline_short_run_marks_every_point() -> None:
    root = parse(chart_timeline(minutes(12, gap=range(4, 6))))
    shown = texts(root)
    assert {"median", "90th percentile", "99th percentile", "results / minute",
            "latency (s)", "processed at (UTC)"} <= set(shown)
    assert "22:20" in shown and "2026-11-23" in shown
    paths = list(root.iter("path"))
    area = paths[0].get("d") or ""
    assert area.count("M") == 1 and area.endswith("Z")        # the gap is a zero, one outline
    # a dot per percentile of each of the 10 timed minutes, and 3 in the legend
    assert sum((p.get("d") or "").count("h0") for p in paths) == 3 * 10 + 3


def test_timeline_of_one_minute_and_of_none() -> None:
    root = parse(chart_timeline(minutes(1)))
    assert "22:17" in texts(root) and "22:18" in texts(root)
    root = parse(chart_timeline([MinuteStats(T0, 4)]))          # no response times
    assert "median" not in texts(root)
    parse(chart_timeline([]))


def test_a_days_long_timeline_stays_small() -> None:
    long = minutes(10 * 1440, gap=range(3000, 4000))
    chart = chart_timeline(long)
    root = parse(chart)
    assert len(list(root.iter())) < 80
    assert len(list(root.iter("path"))) == 4                  # the outline and three lines
    assert len(chart) < 200_000
    assert sum("\n" not in s and re.fullmatch(r"\d{4}-\d\d-\d\d", s) is not None
               for s in texts(root)) >= 3                     # day ticks name their date
    assert chart == chart_timeline(long)                      # deterministic


def test_error_bars_largest_first() -> None:
    root = parse(chart_errors({"rate_limit": 3, "timeout": 12, HOSTILE: 7}))
    shown = texts(root)
    cut = HOSTILE_SHOWN[:chart_module.ERROR_LABEL_CAP - 1] + "…"
    assert [s for s in shown if s in ("timeout", "rate_limit", cut)] == [
        "timeout", cut, "rate_limit"]
    assert {"0", "2", "4", "6", "8", "10", "12", "error rows"} <= set(shown)
    parse(chart_errors({}))
    assert "1,000,000,000,000" in texts(parse(chart_errors({"x": 10**12})))
