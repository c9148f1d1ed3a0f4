"""Synthetic sample data: obviously fake LE and CME narratives with manual IPV flags.

This module owns the demo and benchmark inputs; no real case data is ever involved. Rows have
the columns of the production workbook (`COLUMNS`) and deliberately exercise ingest:

  * IncidentID: about half zero-padded text ("004711"), the rest plain ints;
  * flags spelled 1/0, "yes"/"no" or True/False (one spelling per row), a few blanks;
  * ~2% blank narratives and ~1% duplicate rows (an earlier row repeated, same IncidentID);
  * ~30% positive cases, phrased with the simulated model's `IPV_CUES` most of the time, plus
    label noise both ways (positives without cue words, negatives with misleading ones such as
    "his business partner") so the keyword model scores well but not perfectly.

Everything is driven by one `random.Random(seed)`: the same seed gives the same rows.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("IncidentID", "NarrativeLE", "NarrativeCME", "ManualFlagLE", "ManualFlagCME",
           "ManualFlag")

POSITIVE_SHARE = 0.30
BLANK_NARRATIVE_SHARE = 0.02
DUPLICATE_SHARE = 0.01
BLANK_FLAG_SHARE = 0.015
POSITIVE_WITHOUT_CUES = 0.08   # flagged narratives written without any cue word
MISLEADING_NEGATIVE = 0.02     # unflagged narratives that contain a cue word anyway
FIRST_ID = 1001

Row = dict[str, object]

# One spelling per row, so every column mixes spellings the way hand-kept sheets do.
_SPELLINGS: tuple[tuple[object, object], ...] = ((1, 0), ("yes", "no"), (True, False))


@dataclass(frozen=True, slots=True)
class _Person:
    age: int
    male: bool

    @property
    def noun(self) -> str:
        return "male" if self.male else "female"

    @property
    def they(self) -> str:
        return "he" if self.male else "she"

    @property
    def their(self) -> str:
        return "his" if self.male else "her"

    @property
    def partner(self) -> str:
        return "girlfriend" if self.male else "boyfriend"

    @property
    def spouse(self) -> str:
        return "wife" if self.male else "husband"


# --------------------------------------------------------------------------- sentence banks
# Fictional agencies and places keep the text recognisably synthetic.

_AGENCIES = ("Sample County Sheriff's Office", "Exampleton Police Department",
             "Fictional Township Police", "Testville Police Department")
_PLACES = ("a single-family residence", "an apartment", "a mobile home", "a motel room",
           "a wooded area behind a residence", "a parked vehicle", "a detached garage")
_FINDERS = ("a neighbor", "the decedent's mother", "a roommate", "the decedent's brother",
            "a coworker conducting a welfare check", "the landlord", "the decedent's adult son")
_ROOMS = ("bedroom", "living room", "garage", "basement", "bathroom", "kitchen")
_METHODS = (
    "A handgun was located near the decedent's right hand.",
    "The decedent was found hanging from a ligature attached to a beam.",
    "Several empty prescription bottles were located on the nightstand.",
    "A long gun was located beside the decedent.",
    "The vehicle engine was running and the garage door was closed.",
    "A ligature was found around the decedent's neck.",
)
_CAUSES = ("gunshot wound of the head", "hanging", "combined drug toxicity",
           "carbon monoxide toxicity", "asphyxia due to ligature")
_TOXICOLOGY = ("was negative", "was positive for ethanol", "is pending",
               "was positive for prescribed antidepressants", "was positive for opioids")
_MOODS = ("withdrawn", "unusually quiet", "depressed", "anxious", "calm and resolved",
          "irritable")
_NEUTRAL_CIRCUMSTANCES = (
    "The decedent had recently lost {their} job and was behind on rent.",
    "The decedent had a history of depression and had stopped taking {their} medication.",
    "A handwritten note addressed to family was found on the kitchen table.",
    "The decedent had been diagnosed with a chronic pain condition last year.",
    "Family reported the decedent had been drinking heavily since a recent bankruptcy.",
    "The decedent had been grieving the death of {their} father earlier this year.",
    "No signs of forced entry or struggle were observed at the scene.",
    "The decedent had made a previous attempt two years ago.",
    "The decedent had been struggling with gambling debts.",
)
_HISTORIES = (
    "The decedent had no known criminal history.",
    "The decedent had been seen at an outpatient mental health clinic.",
    "Records show one prior welfare check at the address.",
    "The decedent had a history of substance use.",
    "There was no known history of mental health treatment.",
)
# Phrased with IPV_CUES wording ("boyfriend", "restraining order", "argument with", ...).
_IPV_CUED = (
    "According to {finder}, the decedent had an argument with {their} {partner} hours before"
    " the incident.",
    "The decedent's {partner} had been served with a restraining order two weeks prior.",
    "Family members reported a long history of domestic abuse by the decedent's {spouse}.",
    "A protective order against the decedent's ex-{partner} was active at the time of death.",
    "Witnesses stated the {partner} was jealous and had threatened the decedent repeatedly.",
    "Officers had responded to a domestic disturbance at the residence last month, where the"
    " {spouse} was arrested.",
    "The decedent's sister stated the {spouse} had strangled the decedent during a fight in"
    " March.",
    "Text messages on the decedent's phone showed {their} ex-{spouse} had been stalking"
    " {them}.",
)
# IPV described without any cue word: the keyword model misses these (false negatives).
_IPV_UNCUED = (
    "Friends stated the decedent was afraid to return home and had recently moved out after"
    " repeated threats.",
    "The decedent had recently left a controlling relationship and was staying with a"
    " relative.",
    "A relative said the person the decedent lived with monitored {their} phone and money.",
)
# Cue words in a non-IPV context: the keyword model flags these (false positives).
_MISLEADING = (
    "{They_cap} was found by {their} business partner when the shop did not open.",
    "{Their_cap} partner at work told officers {they} seemed withdrawn in recent weeks.",
    "The decedent was an ex-Marine who had struggled since leaving the service.",
    "The decedent volunteered at a domestic violence shelter on weekends.",
    "The decedent's {spouse} of thirty years found {them} and called 911; no conflict was"
    " reported.",
)


# --------------------------------------------------------------------------- generation


def generate_cases(n_cases: int, seed: int = 7) -> list[Row]:
    """`n_cases` rows (duplicates included) with the columns in `COLUMNS`."""
    if n_cases < 0:
        raise ValueError("n_cases must be >= 0")
    rng = random.Random(seed)
    n_duplicates = _duplicate_count(n_cases)
    cases = [_case(rng, FIRST_ID + i) for i in range(n_cases - n_duplicates)]
    rows = [row for row, _ in cases]
    _blank_some_narratives(rng, rows, [flags for _, flags in cases])
    _insert_duplicates(rng, rows, n_duplicates)
    return rows


def _duplicate_count(n_cases: int) -> int:
    if n_cases < 20:
        return 0  # tiny samples stay clean
    return max(1, round(n_cases * DUPLICATE_SHARE))


def _case(rng: random.Random, number: int) -> tuple[Row, tuple[int, int]]:
    """One row, and its true (LE, CME) flags, which blank label cells may hide."""
    person = _Person(age=rng.randint(16, 88), male=rng.random() < 0.72)
    positive = rng.random() < POSITIVE_SHARE
    le_flag, cme_flag = _narrative_flags(rng, positive)
    yes, no = rng.choice(_SPELLINGS)
    row: Row = {
        "IncidentID": f"{number:06d}" if rng.random() < 0.5 else number,
        "NarrativeLE": _le_narrative(rng, person, le_flag),
        "NarrativeCME": _cme_narrative(rng, person, cme_flag),
        "ManualFlagLE": _spell(rng, le_flag, yes, no),
        "ManualFlagCME": _spell(rng, cme_flag, yes, no),
        "ManualFlag": _spell(rng, int(le_flag or cme_flag), yes, no),
    }
    return row, (le_flag, cme_flag)


def _narrative_flags(rng: random.Random, positive: bool) -> tuple[int, int]:
    if not positive:
        return 0, 0
    # A positive case is mentioned by at least one narrative, most often by both.
    return rng.choice(((1, 1), (1, 1), (1, 1), (1, 1), (1, 0), (0, 1)))


def _spell(rng: random.Random, flag: int, yes: object, no: object) -> object:
    if rng.random() < BLANK_FLAG_SHARE:
        return None  # unknown: the reviewer left the cell empty
    return yes if flag else no


def _fill(template: str, rng: random.Random, person: _Person) -> str:
    them = "him" if person.male else "her"
    return template.format(
        their=person.their, they=person.they, them=them, partner=person.partner,
        spouse=person.spouse, finder=rng.choice(_FINDERS),
        They_cap=person.they.capitalize(), Their_cap=person.their.capitalize())


def _circumstance(rng: random.Random, person: _Person, flagged: int) -> list[str]:
    """The sentences that decide the label: IPV (cued or not), misleading, or neutral."""
    if flagged:
        bank = _IPV_UNCUED if rng.random() < POSITIVE_WITHOUT_CUES else _IPV_CUED
        return [_fill(rng.choice(bank), rng, person)]
    sentences = [_fill(rng.choice(_NEUTRAL_CIRCUMSTANCES), rng, person)]
    if rng.random() < MISLEADING_NEGATIVE:
        sentences.append(_fill(rng.choice(_MISLEADING), rng, person))
    return sentences


def _le_narrative(rng: random.Random, person: _Person, flagged: int) -> str:
    hour = rng.randint(0, 23)
    sentences = [
        f"Officers from the {rng.choice(_AGENCIES)} responded to {rng.choice(_PLACES)} at"
        f" approximately {hour:02d}{rng.choice((0, 15, 30, 45)):02d} hours after"
        f" {rng.choice(_FINDERS)} called 911.",
        f"The decedent, a {person.age}-year-old {person.noun}, was found unresponsive in the"
        f" {rng.choice(_ROOMS)}.",
        rng.choice(_METHODS),
        *_circumstance(rng, person, flagged),
        f"{rng.choice(_FINDERS).capitalize()} stated the decedent had seemed"
        f" {rng.choice(_MOODS)} in recent weeks.",
    ]
    if rng.random() < 0.5:
        sentences.append(rng.choice(_HISTORIES))
    return " ".join(sentences)


def _cme_narrative(rng: random.Random, person: _Person, flagged: int) -> str:
    sentences = [
        f"Decedent is a {person.age} year old {person.noun} pronounced dead at the scene"
        f" on day {rng.randint(1, 28)} of the reporting period.",
        f"Cause of death: {rng.choice(_CAUSES)}. Manner of death: suicide.",
        f"Toxicology {rng.choice(_TOXICOLOGY)}.",
        *_circumstance(rng, person, flagged),
    ]
    if rng.random() < 0.4:
        sentences.append(rng.choice(_HISTORIES))
    return " ".join(sentences)


def _blank_some_narratives(rng: random.Random, rows: list[Row],
                           truth: list[tuple[int, int]]) -> None:
    # Only negative narratives are blanked, so no positive label ever points at empty text.
    slots = [(i, column) for i, flags in enumerate(truth)
             for column, flag in zip(("NarrativeLE", "NarrativeCME"), flags, strict=True)
             if not flag]
    count = min(len(slots), round(2 * len(rows) * BLANK_NARRATIVE_SHARE))
    for i, column in rng.sample(slots, count):
        rows[i][column] = rng.choice((None, "", "   "))  # empty cell, empty text, whitespace


def _is_yes(value: object) -> bool:
    return value in (1, "yes", True)


def _insert_duplicates(rng: random.Random, rows: list[Row], count: int) -> None:
    for _ in range(count):
        source = rng.randrange(len(rows))
        # The repeat lands after its original, as a re-exported record would.
        rows.insert(rng.randint(source + 1, len(rows)), dict(rows[source]))


# --------------------------------------------------------------------------- writers


@dataclass(frozen=True, slots=True)
class Summary:
    """What a writer produced, for the one-line CLI report."""

    path: Path
    rows: int
    unique_ids: int
    positive_cases: int
    blank_narratives: int


def summarize(path: Path, rows: list[Row]) -> Summary:
    ids = {str(row["IncidentID"]) for row in rows}
    positives = {str(row["IncidentID"]) for row in rows if _is_yes(row["ManualFlag"])}
    blanks = sum(1 for row in rows for column in ("NarrativeLE", "NarrativeCME")
                 if not str(row[column] or "").strip())
    return Summary(path, len(rows), len(ids), len(positives), blanks)


def write_workbook(path: str | Path, n_cases: int, seed: int = 7,
                   sheet: str = "narratives") -> Summary:
    """Write an .xlsx (openpyxl write-only mode, fast enough for 21,000 cases)."""
    from openpyxl import Workbook

    path = Path(path)
    rows = generate_cases(n_cases, seed)
    wb = Workbook(write_only=True)
    ws = wb.create_sheet(title=sheet)
    ws.append(list(COLUMNS))
    for row in rows:
        ws.append([row[column] for column in COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    return summarize(path, rows)


def write_csv(path: str | Path, n_cases: int, seed: int = 7) -> Summary:
    """Write a UTF-8 CSV; empty cells are empty fields, booleans read "True"/"False"."""
    path = Path(path)
    rows = generate_cases(n_cases, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])
    return summarize(path, rows)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncrunner.sim.synth",
        description="Write synthetic LE/CME narratives with manual IPV flags (no real data).")
    parser.add_argument("--cases", type=int, required=True, help="number of rows to write")
    parser.add_argument("--out", type=Path, required=True, help="output file, .xlsx or .csv")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    args = parser.parse_args(argv)
    if args.cases < 0:
        parser.error("--cases must be >= 0")
    suffix = args.out.suffix.lower()
    if suffix == ".xlsx":
        summary = write_workbook(args.out, args.cases, args.seed)
    elif suffix == ".csv":
        summary = write_csv(args.out, args.cases, args.seed)
    else:
        parser.error(f"--out must end in .xlsx or .csv, not {args.out.name!r}")
    print(f"wrote {summary.path}: {summary.rows} rows, {summary.unique_ids} unique ids,"
          f" {summary.positive_cases} positive cases, {summary.blank_narratives} blank"
          " narratives")
    return 0


if __name__ == "__main__":
    sys.exit(main())
