"""Which labels an experiment is scored against: the manual ones, or the adjudicated ones.

`manual`: the labels of the input file, stored with every result (manual_flag_ind per
narrative, manual_flag per case). `adjudicated`: the manual labels with a reviewer's
decisions (label set 'adjudicated', from `asyncrunner adjudicate import`) in their place;
the manual labels themselves are never overwritten.

A decision is about one narrative of one data load (its data checksum), so it applies to
every experiment over that load. At case level, a case keeps its manual_flag unless a
decision changed one of its narratives' labels; then it is positive when any of its
narratives' effective labels is (see case_label_sql).
"""

from __future__ import annotations

LABEL_SETS = ("manual", "adjudicated")
ADJUDICATED = "adjudicated"


def narrative_label_sql(labels: str, *, result: str = "r", checksum: str = ":checksum") -> str:
    """An SQL expression for a result row's narrative label (0, 1 or NULL). `result` is
    the alias of narrative_results, `checksum` an expression for the experiment's data
    checksum."""
    _check(labels)
    if labels == "manual":
        return f"{result}.manual_flag_ind"
    return (f"COALESCE((SELECT l.label FROM label_sets l WHERE l.label_set = '{ADJUDICATED}' "
            f"AND l.data_checksum = {checksum} AND l.incident_id = {result}.incident_id "
            f"AND l.narrative_type = {result}.narrative_type), {result}.manual_flag_ind)")


def case_label_sql(labels: str, *, result: str = "r", checksum: str = ":checksum",
                   experiment: str = ":experiment_id") -> str:
    """An SQL expression for the case label of a result row's case (0, 1 or NULL).

    With adjudicated labels, a case keeps its manual_flag unless a decision changed the
    label of one of its narratives in this experiment; then the case is positive when any
    of its narratives is positive by effective label. A decision that confirms a label
    changes no case. (An experiment that scored only some of a case's narratives, through
    a sample, judges the case by those.)"""
    _check(labels)
    if labels == "manual":
        return f"{result}.manual_flag"
    changed = (f"SELECT 1 FROM narrative_results c JOIN label_sets l "
               f"ON l.label_set = '{ADJUDICATED}' AND l.data_checksum = {checksum} "
               f"AND l.incident_id = c.incident_id AND l.narrative_type = c.narrative_type "
               f"WHERE c.experiment_id = {experiment} AND c.incident_id = {result}.incident_id "
               f"AND l.label IS NOT c.manual_flag_ind")
    inner = narrative_label_sql(labels, result="c", checksum=checksum)
    return (f"CASE WHEN EXISTS ({changed}) THEN (SELECT MAX({inner}) FROM narrative_results c "
            f"WHERE c.experiment_id = {experiment} AND c.incident_id = {result}.incident_id) "
            f"ELSE {result}.manual_flag END")


def _check(labels: str) -> None:
    if labels not in LABEL_SETS:
        raise ValueError(f"labels must be one of {', '.join(LABEL_SETS)}, not {labels!r}")
