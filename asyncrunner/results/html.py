"""HTML pieces shared by the report and the leaderboard: escaping, tables, sections, the
stylesheet, the series colours and the atomic write of a page.

Everything that reaches a page goes through `esc` (experiment names and model output are
untrusted). Charts are inline SVG drawn by svg.py: no plotting library, nothing to install.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

POSITIVE_COLOUR = "#c0392b"
NEGATIVE_COLOUR = "#2471a3"


def esc(value: Any) -> str:
    return "-" if value is None else html.escape(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           caption: str | None = None, cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="{cls}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:2em auto;max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}thead th{background:#f2f2f2}
caption{font-weight:bold;text-align:left;padding:.3em 0}
table.confusion td{text-align:center;min-width:7em;font-size:1.1em}
table.metrics td:not(:first-child){text-align:right;white-space:nowrap}
table.disagreements td:last-child{max-width:40em}
.note{color:#555;font-size:.92em}svg{max-width:100%;height:auto;display:block;margin:.6em 0}
.meta{color:#777;font-size:.85em}.labels{font-weight:bold}
table.confusion.by-type td{font-size:1em}
table.indicators{min-width:28em}
table.indicators td:first-child{max-width:40em;overflow-wrap:anywhere}
table.indicators td:not(:first-child){text-align:right}
"""


def write_atomic(out: Path, text: str) -> None:
    """Temp file in the same directory, then rename: readers see the old or the new file.
    The temp name carries the PID so two writers never share one; created with the
    process umask (unlike mkstemp's 0600) because a report is meant to be shared."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
