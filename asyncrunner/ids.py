"""Experiment ids are UUIDs; nothing uses one in a path or query before this check."""

from __future__ import annotations

import uuid

from asyncrunner.errors import RefusedError


def new_experiment_id() -> str:
    return str(uuid.uuid4())


def require_uuid(value: str) -> str:
    """Return the canonical form of a UUID, or refuse (exit 3) naming the bad value."""
    text = (value or "").strip()
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        shown = text if len(text) <= 60 and text.isprintable() else repr(text[:60])
        raise RefusedError(
            f"'{shown}' is not a valid experiment id (a UUID such as "
            "3f2b8c1e-...); list experiments with `asyncrunner status`"
        ) from None
    if str(parsed) != text.lower():
        raise RefusedError(f"'{text}' is not a canonical UUID experiment id")
    return str(parsed)
