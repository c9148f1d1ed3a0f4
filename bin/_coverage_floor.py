"""Fail when a pipeline stage's line coverage (in-process tests) drops below its floor."""

from __future__ import annotations

import json
import sys

FLOORS = {
    "asyncrunner/pipeline/runner.py": 90.0,
    "asyncrunner/pipeline/writer.py": 90.0,
    "asyncrunner/pipeline/producer.py": 90.0,
    "asyncrunner/pipeline/workers.py": 90.0,
    "asyncrunner/session.py": 90.0,
}


def main(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        print(f"coverage floor: no coverage data at {path} (a partial test run?)")
        return 0
    low = []
    for name, floor in FLOORS.items():
        entry = files.get(name)
        if entry is None:
            low.append(f"{name} not measured (moved or renamed? update {__file__})")
            continue
        pct = float(entry["summary"]["percent_covered"])
        if pct < floor:
            low.append(f"{name} {pct:.1f} % < {floor:.0f} %")
    if low:
        print("coverage floor not met: " + "; ".join(low))
        return 1
    print("coverage floor met: " + ", ".join(n.split("/")[-1] for n in FLOORS) + " >= 90 %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
