"""What an ingest did not load, read back from `ingests` and `ingest_drops`.

The narratives a run never sends are part of its result: in the real data about 6,600 of
41,900 narrative slots are blank, placeholders, duplicates or in rows without an id. This
module turns the per-slot records ingest.py writes into one summary (`drop_summary`, a
JSON-ready dict) and its text lines (`describe`), shown by `status`, the run log, the
report and `compare`. It reads only, and never narrative text (none is stored for drops).

A summary is per data checksum (one load per checksum): an experiment limited by
`max_narratives` still sees the drops of the whole file.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from asyncrunner.vocab import DropReason

LIST_LIMIT = 200   # rows listed in a summary; the counts are always complete
TEXT_LIMIT = 10    # rows listed in text output

_POSITIVE = "COALESCE(manual_flag_ind, manual_flag) = 1"
_LOST = (f"reason IN ('{DropReason.BLANK}', '{DropReason.PLACEHOLDER}', "
         f"'{DropReason.NO_ID}')")


def _rows(conn: sqlite3.Connection, sql: str, checksum: str) -> list[dict[str, Any]]:
    cursor = conn.execute(sql, (checksum, LIST_LIMIT))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _count(conn: sqlite3.Connection, where: str, checksum: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM ingest_drops WHERE data_checksum = ? "
                            f"AND {where}", (checksum,)).fetchone()[0])


def drop_summary(conn: sqlite3.Connection, checksum: str | None) -> dict[str, Any] | None:
    """The drops of one load, or None when the checksum has no ingest record (an experiment
    of the R version that was never resumed here)."""
    if not checksum:
        return None
    ing = conn.execute(
        "SELECT data_source, n_rows, n_narratives, n_blank, n_duplicates, n_placeholder, "
        "n_no_id, origin, mapping_json, rows_digest FROM ingests WHERE data_checksum = ? "
        "ORDER BY loaded_at LIMIT 1", (checksum,)).fetchone()
    if ing is None:
        return None
    # Rows are recorded by every load since drops were; older loads have no digest either.
    recorded = ing[9] is not None
    summary: dict[str, Any] = {
        "data_checksum": checksum, "data_file": ing[0], "recorded": recorded,
        "origin": ing[7], "placeholders_applied": '"placeholders"' in (ing[8] or ""),
        "n_rows": ing[1], "n_loaded": ing[2],
        "by_reason": {str(DropReason.BLANK): (ing[3] or 0) - (ing[5] or 0),
                      str(DropReason.PLACEHOLDER): ing[5] or 0,
                      str(DropReason.DUPLICATE): ing[4] or 0,
                      str(DropReason.NO_ID): ing[6] or 0},
    }
    summary["n_dropped"] = sum(summary["by_reason"].values())
    if not recorded:
        return summary
    by_type: dict[str, dict[str, int]] = {}
    for ntype, reason, n in conn.execute(
            "SELECT narrative_type, reason, COUNT(*) FROM ingest_drops WHERE data_checksum = ? "
            "GROUP BY 1, 2 ORDER BY 1, 2", (checksum,)):
        by_type.setdefault(str(ntype), {})[str(reason)] = int(n)
    summary["by_type"] = by_type
    summary["positive_label"] = {
        "count": _count(conn, f"{_LOST} AND {_POSITIVE}", checksum),
        "rows": _rows(conn, "SELECT row_number, incident_id, narrative_type, reason, "
                            "manual_flag_ind, manual_flag, has_text FROM ingest_drops "
                            f"WHERE data_checksum = ? AND {_LOST} AND {_POSITIVE} "
                            "ORDER BY row_number, narrative_type LIMIT ?", checksum),
    }
    duplicate = f"reason = '{DropReason.DUPLICATE}'"
    summary["label_conflicts"] = {
        "count": _count(conn, f"{duplicate} AND label_conflict = 1", checksum),
        "rows": _rows(conn, "SELECT row_number, incident_id, narrative_type, kept_row_number, "
                            "manual_flag_ind, manual_flag, text_differs FROM ingest_drops "
                            f"WHERE data_checksum = ? AND {duplicate} AND label_conflict = 1 "
                            "ORDER BY row_number, narrative_type LIMIT ?", checksum),
    }
    summary["duplicates_with_other_text"] = _count(
        conn, f"{duplicate} AND text_differs = 1", checksum)
    no_id = f"reason = '{DropReason.NO_ID}'"
    row_numbers = [int(r[0]) for r in conn.execute(
        "SELECT DISTINCT row_number FROM ingest_drops WHERE data_checksum = ? "
        f"AND {no_id} ORDER BY row_number LIMIT ?", (checksum, LIST_LIMIT))]
    summary["no_id"] = {
        "rows": int(conn.execute(
            "SELECT COUNT(DISTINCT row_number) FROM ingest_drops WHERE data_checksum = ? "
            f"AND {no_id}", (checksum,)).fetchone()[0]),
        "narratives_with_text": _count(conn, f"{no_id} AND has_text = 1", checksum),
        "row_numbers": row_numbers,
    }
    return summary


def _row_ref(r: dict[str, Any]) -> str:
    who = f"{r['incident_id']}/{r['narrative_type']}" if r.get("incident_id") is not None \
        else f"(no id)/{r['narrative_type']}"
    return f"row {r['row_number']} {who}"


def describe(summary: dict[str, Any] | None, limit: int = TEXT_LIMIT) -> list[str]:
    """Text lines for status, the run log and compare (no narrative text)."""
    if summary is None:
        return ["not recorded (loaded by the R version; no ingest record)"]
    if summary.get("origin"):
        return [f"{summary['n_loaded']} narratives loaded by the R version: what it dropped "
                "was not recorded"]
    r = summary["by_reason"]
    head = (f"{summary['n_dropped']} of {summary['n_dropped'] + (summary['n_loaded'] or 0)} "
            f"narrative slots not loaded: {r['blank']} blank, {r['placeholder']} placeholder, "
            f"{r['duplicate']} duplicate, {r['no_id']} without an id")
    lines = [head]
    if not summary["placeholders_applied"]:
        lines.append("loaded before placeholder texts counted as blank: N/A and the like "
                     "are among the loaded narratives")
    if not summary["recorded"]:
        lines.append("loaded by an older asyncrunner: dropped rows not recorded one by one "
                     "(its blank count includes rows without an id)")
        return lines
    by_type = summary["by_type"]
    if by_type:
        lines.append("by type: " + "; ".join(
            f"{t} " + ", ".join(f"{n} {reason}" for reason, n in counts.items())
            for t, counts in by_type.items()))
    positive = summary["positive_label"]
    if positive["count"]:
        shown = ", ".join(f"{_row_ref(x)} ({x['reason']})" for x in positive["rows"][:limit])
        more = " ..." if positive["count"] > limit else ""
        lines.append(f"WARNING {positive['count']} dropped with a positive manual label: "
                     f"{shown}{more}")
    conflicts = summary["label_conflicts"]
    if conflicts["count"]:
        shown = ", ".join(f"{_row_ref(x)} vs kept row {x['kept_row_number']}"
                          for x in conflicts["rows"][:limit])
        more = " ..." if conflicts["count"] > limit else ""
        lines.append(f"WARNING {conflicts['count']} duplicates with labels that contradict "
                     f"the kept row: {shown}{more}")
    if summary["duplicates_with_other_text"]:
        lines.append(f"{summary['duplicates_with_other_text']} duplicates had a different "
                     "text than the kept row (the first row's text was used)")
    no_id = summary["no_id"]
    if no_id["rows"]:
        rows = ", ".join(str(n) for n in no_id["row_numbers"][:limit])
        more = " ..." if no_id["rows"] > limit else ""
        lines.append(f"WARNING {no_id['rows']} rows without an id "
                     f"({no_id['narratives_with_text']} narratives with text lost): "
                     f"rows {rows}{more}")
    return lines


def warnings(summary: dict[str, Any] | None) -> list[str]:
    """The lines a researcher must see (logged as warnings at ingest)."""
    return [line.removeprefix("WARNING ") for line in describe(summary)
            if line.startswith("WARNING ")]
