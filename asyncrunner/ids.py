"""Experiment ids are UUIDs; nothing uses one in a path or query before this check."""

from __future__ import annotations

import uuid

from asyncrunner.errors import RefusedError


def new_experiment_id() -> str:
    return str(uuid.uuid4())


_WHERE_IDS = {"experiment": "list experiments with `asyncrunner status`",
              "study": "a study's id is the first line `asyncrunner sweep` printed"}


def require_uuid(value: str, what: str = "experiment") -> str:
    """Return the canonical form of a UUID, or refuse (exit 3) naming the bad value;
    `what` the id is of (experiment, study)."""
    text = (value or "").strip()
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        shown = text if len(text) <= 60 and text.isprintable() else repr(text[:60])
        raise RefusedError(
            f"'{shown}' is not a valid {what} id (a UUID such as "
            f"3f2b8c1e-...); {_WHERE_IDS.get(what, 'check the id')}"
        ) from None
    if str(parsed) != text.lower():
        raise RefusedError(f"'{text}' is not a canonical UUID {what} id")
    return str(parsed)
