"""Inline SVG charts for the HTML report and the leaderboard, by hand, with the standard
library only.

The report once drew with matplotlib: importing it (and numpy) and rasterising six figures
was the largest fixed cost of a run, and the extra was ~117 MB installed. The charts are
simple (bars, lines, dots, a heatmap), so a few primitives suffice: elements (`rect`,
`path`, `text`...), linear `Scale`s, "nice" ticks, axes, a legend and the `document`
around them. Chart layouts live with their data (report.py, leaderboard.py).

Rules every function keeps:
- all text goes through `esc`: labels are untrusted (experiment and model names);
- coordinates are written with one decimal (`num`), so the same data always gives the same
  bytes and a report can be diffed;
- no `id` attributes: several charts share one HTML document, and ids would clash;
- a series is one `path`, however many points, and a path never carries more than a few
  points per pixel column (`thin`), so a days-long run costs what a short one does;
- values that are None, NaN or infinite are skipped (a line breaks there).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

FONT = "system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif"
FONT_SIZE = 12.0       # tick labels, legend, annotations
TITLE_SIZE = 14.0
AXIS_COLOUR = "#444"
GRID_COLOUR = "#ddd"
TEXT_COLOUR = "#222"
CHAR_WIDTH = 0.6       # of the font size: a generous average, so estimated labels fit

# matplotlib's "Blues" colour map at nine even stops, kept so the heatmap looks as before.
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5",
         "#08519c", "#08306b")

# Characters XML 1.0 forbids even as references (an inline SVG may be read as XML) and
# lone surrogates (which cannot be written as UTF-8): replaced, never passed through.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

Point = tuple[float | None, float | None]


# --------------------------------------------------------------------------- text, numbers


def esc(value: object) -> str:
    """Text or attribute content, safe in HTML and in XML."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def num(value: float) -> str:
    """A coordinate with one decimal, without a trailing '.0' or a negative zero."""
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def text_width(text: str, size: float = FONT_SIZE) -> float:
    """Estimated rendered width: no font metrics without a renderer, so err wide."""
    return CHAR_WIDTH * size * len(text)


# --------------------------------------------------------------------------- ticks


def nice_step(span: float, max_ticks: int = 6, *, integer: bool = False) -> float:
    """The smallest step of 1, 2 or 5 x 10^k that cuts `span` into at most `max_ticks`
    intervals (at least 1 when `integer`: counts have no half results)."""
    if not finite(span) or span <= 0:
        return 1.0
    raw = span / max(1, max_ticks)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return max(1.0, step) if integer else step


def nice_top(value: float, max_ticks: int = 6, *, integer: bool = False) -> float:
    """An axis maximum at or above `value` that lands on a tick (1 when there is no data)."""
    if not finite(value) or value <= 0:
        return 1.0
    step = nice_step(value, max_ticks, integer=integer)
    return math.ceil(value / step - 1e-9) * step


def ticks(low: float, high: float, max_ticks: int = 6, *,
          integer: bool = False) -> list[float]:
    """Tick values from `low` to `high` (both inclusive, within rounding) at a nice step."""
    if not (finite(low) and finite(high)) or high < low:
        return []
    step = nice_step(high - low, max_ticks, integer=integer)
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """As many decimals as the step needs, no more: 0.2 -> '0.2', 5 -> '5', 0.05 -> '0.05'."""
    decimals = 0 if not 0 < step < 1 else min(10, math.ceil(-math.log10(step) - 1e-9))
    if abs(value) < step * 1e-6:
        value = 0.0  # never "-0.0"
    return f"{value:,.{decimals}f}"


def tick_labels(values: Sequence[float]) -> list[str]:
    step = values[1] - values[0] if len(values) > 1 else 1.0
    return [tick_label(v, step) for v in values]


# Steps of a time axis, in minutes; all up to a day divide a day, so ticks land on round
# clock times (UTC midnight is a whole number of them from the epoch).
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440)


def time_ticks(start: datetime, end: datetime,
               max_ticks: int = 7) -> list[tuple[float, str]]:
    """(seconds since the epoch, label) of round UTC times from `start` to `end` (aware
    datetimes). Labels are HH:MM, with the date under the first one and wherever the date
    changes; a step of a day or more shows the date alone."""
    low, high = start.timestamp() / 60, end.timestamp() / 60
    if not (finite(low) and finite(high)) or high < low:
        return []
    span = max(high - low, 1.0)
    step = next((s for s in _TIME_STEPS if span / s <= max_ticks), None)
    if step is None:  # weeks or more: whole days at a nice count
        step = 1440 * int(nice_step(span / 1440, max_ticks, integer=True))
    out: list[tuple[float, str]] = []
    previous_date: str | None = None
    for k in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1):
        when = datetime.fromtimestamp(k * step * 60, UTC)
        date = when.strftime("%Y-%m-%d")
        if step >= 1440:
            label = date
        else:
            label = when.strftime("%H:%M") + (f"\n{date}" if date != previous_date else "")
        previous_date = date
        out.append((k * step * 60.0, label))
    return out


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class Scale:
    """Linear map of a data interval onto a pixel interval; values outside are clamped,
    so nothing is drawn outside its plot (no clip paths: they would need ids)."""

    d0: float
    d1: float
    r0: float
    r1: float

    def __call__(self, value: float) -> float:
        if self.d1 == self.d0:
            return (self.r0 + self.r1) / 2
        t = (value - self.d0) / (self.d1 - self.d0)
        return self.r0 + min(1.0, max(0.0, t)) * (self.r1 - self.r0)


@dataclass(frozen=True, slots=True)
class Frame:
    """A plot area in pixels; its scales run left to right and bottom to top."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def x(self, low: float, high: float) -> Scale:
        return Scale(low, high, self.left, self.right)

    def y(self, low: float, high: float) -> Scale:
        return Scale(low, high, self.bottom, self.top)


# --------------------------------------------------------------------------- elements


def _attrs(**attrs: str | float | None) -> str:
    """key="value" pairs, None left out; underscores become dashes (stroke_width)."""
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        shown = num(value) if isinstance(value, float | int) else esc(value)
        parts.append(f' {key.rstrip("_").replace("_", "-")}="{shown}"')
    return "".join(parts)


def rect(x: float, y: float, width: float, height: float, fill: str, *,
         stroke: str | None = None) -> str:
    attrs = _attrs(x=x, y=y, width=max(0.0, width), height=max(0.0, height), fill=fill,
                   stroke=stroke)
    return f"<rect{attrs}/>"


def line(x1: float, y1: float, x2: float, y2: float, stroke: str = AXIS_COLOUR, *,
         width: float = 1.0, dash: str | None = None) -> str:
    attrs = _attrs(x1=x1, y1=y1, x2=x2, y2=y2, stroke=stroke, stroke_width=width,
                   stroke_dasharray=dash)
    return f"<line{attrs}/>"


def path(d: str, *, stroke: str | None = None, fill: str = "none", width: float = 1.5,
         dash: str | None = None, cap: str | None = None) -> str:
    """One path element; empty when there is nothing to draw."""
    if not d:
        return ""
    attrs = _attrs(d=d, fill=fill, stroke=stroke, stroke_width=width if stroke else None,
                   stroke_dasharray=dash, stroke_linecap=cap,
                   stroke_linejoin="round" if stroke else None)
    return f"<path{attrs}/>"


def text(x: float, y: float, content: str, *, anchor: str = "middle",
         size: float = FONT_SIZE, fill: str = TEXT_COLOUR, bold: bool = False,
         rotate: bool = False, middle: bool = False) -> str:
    """A text; `middle` centres it vertically on y, `rotate` turns it to read bottom-up.
    (dy rather than dominant-baseline, which not every SVG reader honours.)"""
    attrs = _attrs(x=x, y=y, dy="0.35em" if middle else None, text_anchor=anchor,
                   font_size=size, fill=fill, font_weight="bold" if bold else None,
                   transform=f"rotate(-90 {num(x)} {num(y)})" if rotate else None)
    return f"<text{attrs}>{esc(content)}</text>"


def lines_text(x: float, y: float, content: str, *, size: float = FONT_SIZE,
               anchor: str = "middle", fill: str = TEXT_COLOUR) -> str:
    """Text over several lines (split at newlines), the first one's top at y."""
    return "".join(text(x, y + size * (0.8 + 1.2 * i), part, anchor=anchor, size=size,
                        fill=fill)
                   for i, part in enumerate(content.split("\n")))


# --------------------------------------------------------------------------- paths


def thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points of a line in pixels, with at most four per pixel column (its first, lowest,
    highest and last, in order): the drawing is the same at that resolution and the size no
    longer grows with the data (a days-long timeline has thousands of minutes)."""
    out: list[tuple[float, float]] = []
    column: list[tuple[float, float]] = []

    def flush() -> None:
        if len(column) <= 4:
            out.extend(column)
            return
        low = min(column, key=lambda p: p[1])
        high = max(column, key=lambda p: p[1])
        keep = sorted({0, column.index(low), column.index(high), len(column) - 1})
        out.extend(column[i] for i in keep)

    for point in points:
        if column and round(point[0]) != round(column[0][0]):
            flush()
            column = []
        column.append(point)
    flush()
    return out


def _runs(points: Iterable[Point], x: Scale, y: Scale) -> list[list[tuple[float, float]]]:
    """Pixel points in runs broken by missing values."""
    runs: list[list[tuple[float, float]]] = [[]]
    for px, py in points:
        if px is None or py is None or not (math.isfinite(px) and math.isfinite(py)):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((x(px), y(py)))
    return [run for run in runs if run]


def line_d(points: Iterable[Point], x: Scale, y: Scale) -> str:
    """Path data of a polyline through the points, broken where a value is missing."""
    parts = []
    for run in _runs(points, x, y):
        kept = thin(run)
        parts.append("M" + " L".join(f"{num(a)} {num(b)}" for a, b in kept))
    return " ".join(parts)


def dots_d(points: Iterable[Point], x: Scale, y: Scale) -> str:
    """Path data of a zero-length segment per point: stroked with round caps (see `dots`),
    every marker of a series is one element."""
    return " ".join(f"M{num(a)} {num(b)}h0" for run in _runs(points, x, y) for a, b in run)


def dots(points: Iterable[Point], x: Scale, y: Scale, colour: str, *,
         size: float = 6.0) -> str:
    return path(dots_d(points, x, y), stroke=colour, width=size, cap="round")


def area_d(points: Iterable[Point], x: Scale, y: Scale, baseline: float = 0.0) -> str:
    """Path data of the region between a line and `baseline`, closed down to it."""
    parts = []
    for run in _runs(points, x, y):
        kept = thin(run)
        base = num(y(baseline))
        parts.append(f"M{num(kept[0][0])} {base} L"
                     + " L".join(f"{num(a)} {num(b)}" for a, b in kept)
                     + f" L{num(kept[-1][0])} {base} Z")
    return " ".join(parts)


def bars_d(boxes: Iterable[tuple[float, float, float, float]]) -> str:
    """Path data of rectangles (x, y, width, height, in pixels): one element per series."""
    return " ".join(f"M{num(bx)} {num(by)}h{num(w)}v{num(h)}h{num(-w)}Z"
                    for bx, by, w, h in boxes if w > 0 and h > 0)


# --------------------------------------------------------------------------- axes


def frame_box(frame: Frame) -> str:
    return rect(frame.left, frame.top, frame.width, frame.height, "none", stroke=AXIS_COLOUR)


def x_axis(frame: Frame, scale: Scale, values: Sequence[float], labels: Sequence[str],
           title: str | None = None, *, grid: bool = False) -> str:
    """Ticks and labels under the frame (labels may hold a newline), optional vertical grid
    lines, and the title under the labels."""
    parts = []
    deepest = 0
    for value, label in zip(values, labels, strict=True):
        px = scale(value)
        if grid:
            parts.append(line(px, frame.top, px, frame.bottom, GRID_COLOUR))
        parts.append(line(px, frame.bottom, px, frame.bottom + 4))
        if label:
            parts.append(lines_text(px, frame.bottom + 6, label))
            deepest = max(deepest, label.count("\n") + 1)
    if title:
        parts.append(text((frame.left + frame.right) / 2,
                          frame.bottom + 22 + FONT_SIZE * 1.2 * max(1, deepest), title,
                          size=FONT_SIZE + 1))
    return "".join(parts)


def y_axis(frame: Frame, scale: Scale, values: Sequence[float], labels: Sequence[str],
           title: str | None = None, *, grid: bool = False) -> str:
    """Ticks and labels left of the frame, optional horizontal grid lines, and the title,
    read bottom-up, left of the widest label."""
    parts = []
    for value, label in zip(values, labels, strict=True):
        py = scale(value)
        if grid:
            parts.append(line(frame.left, py, frame.right, py, GRID_COLOUR))
        parts.append(line(frame.left - 4, py, frame.left, py))
        parts.append(text(frame.left - 6, py, label, anchor="end", middle=True))
    if title:
        widest = max((text_width(label) for label in labels), default=0.0)
        parts.append(text(frame.left - 14 - widest, (frame.top + frame.bottom) / 2, title,
                          size=FONT_SIZE + 1, rotate=True))
    return "".join(parts)


def y_label_room(labels: Sequence[str], title: bool = True) -> float:
    """Left margin that fits these tick labels, and a rotated title beside them."""
    widest = max((text_width(label) for label in labels), default=0.0)
    return widest + (36.0 if title else 14.0)


# --------------------------------------------------------------------------- legend

# How a legend entry shows its series.
BOX, LINE, DASHED, LINE_DOT = "box", "line", "dashed", "line-dot"


def legend(x: float, y: float, entries: Sequence[tuple[str, str, str]]) -> str:
    """A boxed legend with its top left corner at (x, y); entries are (kind, colour,
    label) with kind one of BOX, LINE, DASHED, LINE_DOT."""
    if not entries:
        return ""
    row = FONT_SIZE * 1.5
    width = 36 + max(text_width(label) for _, _, label in entries)
    box = _attrs(x=x, y=y, width=width, height=row * len(entries) + 6, fill="#fff",
                 fill_opacity=0.85, stroke="#ccc", rx=3)
    parts = [f"<rect{box}/>"]
    for i, (kind, colour, label) in enumerate(entries):
        cy = y + 3 + row * (i + 0.5)
        if kind == BOX:
            parts.append(rect(x + 8, cy - 5, 16, 10, colour))
        else:
            parts.append(line(x + 6, cy, x + 26, cy, colour, width=1.5,
                              dash="5 3" if kind == DASHED else None))
            if kind == LINE_DOT:
                parts.append(path(f"M{num(x + 16)} {num(cy)}h0", stroke=colour, width=6,
                                  cap="round"))
        parts.append(text(x + 30, cy, label, anchor="start", middle=True))
    return "".join(parts)


# --------------------------------------------------------------------------- colour


def blues(value: float, top: float) -> str:
    """The colour of `value` on a white-to-dark-blue scale running from 0 to `top`."""
    t = 0.0 if not finite(value) or top <= 0 else min(1.0, max(0.0, value / top))
    position = t * (len(BLUES) - 1)
    i = min(int(position), len(BLUES) - 2)
    a, b = _rgb(BLUES[i]), _rgb(BLUES[i + 1])
    f = position - i
    return "#" + "".join(f"{round(p + (q - p) * f):02x}" for p, q in zip(a, b, strict=True))


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


# --------------------------------------------------------------------------- document


def document(width: float, height: float, alt: str, *parts: str) -> str:
    """The <svg> element: a fixed-size picture that scales down with the page (viewBox),
    announced to screen readers as one image named `alt`. No xmlns: the HTML parser puts
    an inline <svg> in the SVG namespace itself, and the report names no URL at all."""
    head = _attrs(width=width, height=height,
                  viewBox=f"0 0 {num(width)} {num(height)}", role="img", aria_label=alt,
                  font_family=FONT, font_size=FONT_SIZE)
    return (f"<svg{head}><title>{esc(alt)}</title>"
            f"{rect(0, 0, width, height, '#fff')}{''.join(parts)}</svg>")
