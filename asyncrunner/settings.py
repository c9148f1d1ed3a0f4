"""Which settings make an experiment what it is, and which only say how one session runs it.

One experiment, one regime: every answer an experiment holds must have been produced under
the settings its record names. So on resume each configuration key is one of

  * SESSION keys (`SESSION_KEYS`): cannot change an answer (where the server is, how long to
    wait, how many requests in flight, batch size, rate limits, where files go). Taken from
    the YAML / environment / flags of this session and recorded in its `sessions` row.
  * SET keys (`SET_KEYS`, `data.*`): decide which narratives belong to the experiment. Always
    the stored ones; a difference is a warning, and they cannot be changed at all.
  * IDENTITY keys (`experiment.*`): the experiment's name and notes; always the stored ones,
    silently (they change no answer and no narrative).
  * ANSWER keys: everything else. Always the stored ones; a difference is a warning, and
    `--allow-drift KEY` is the only way to change one (recorded in the session row and the
    experiment's config history). A key added to the configuration later is an ANSWER key
    until it is listed as a SESSION key: the safe side.

Values are compared on the flattened configuration: nested mappings (`model.extra_body`)
become one dotted key per entry (`model.extra_body.top_p`), so a warning names the exact
field. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SESSION_KEYS: frozenset[str] = frozenset({
    "model.api_url", "model.api_key_env", "model.timeout_s",
    "model.price_per_1k_input", "model.price_per_1k_output", "model.max_response_bytes",
    "run.workers", "run.batch_size", "run.commit_interval_s", "run.max_attempts",
    "run.retry_backoff_s", "run.max_retry_after_s", "run.requests_per_minute",
    "run.tokens_per_minute", "run.grace_period_s", "run.output_dir", "run.log_dir",
    # named by the contract, for when they exist: where requests go, what they cost, when
    # a run gives up; none of them changes an answer
    "model.endpoints", "model.price_per_mtok", "run.max_error_share", "run.breaker_window",
    "model.batch_max_requests", "model.batch_poll_s", "model.batch_window",
    "run.auto_workers", "run.endpoint_down_s",
})
SET_KEYS: frozenset[str] = frozenset({"run.max_narratives"})
SET_SECTIONS: frozenset[str] = frozenset({"data"})
IDENTITY_SECTIONS: frozenset[str] = frozenset({"experiment"})


class Kind(StrEnum):
    SESSION = "session"
    SET = "set"
    IDENTITY = "identity"
    ANSWER = "answer"


def kind(key: str) -> Kind:
    """The kind of a dotted key (a nested key is of its field's kind)."""
    section, _, rest = key.partition(".")
    field = f"{section}.{rest.split('.', 1)[0]}"
    if section in IDENTITY_SECTIONS:
        return Kind.IDENTITY
    if section in SET_SECTIONS or field in SET_KEYS:
        return Kind.SET
    if field in SESSION_KEYS:
        return Kind.SESSION
    return Kind.ANSWER


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"extra_body": {"top_p": 1}}} -> {"model.extra_body.top_p": 1}.
    An empty or missing mapping contributes nothing, so `extra_body: {}` equals `null`."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of flatten. A mapping field can appear both as `null` and with entries
    (one side's `extra_body: null`, the other's `extra_body.top_p`): the entries win."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value is None and isinstance(node.get(leaf), dict):
            continue
        node[leaf] = value
    return out


def _keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Both key sets, in order of appearance (mappings such as data.narratives keep the
    order their columns were given in)."""
    return list(dict.fromkeys([*a, *b]))


def same(a: Any, b: Any) -> bool:
    """Equal as settings: 1 == 1.0, but neither equals None, and True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return bool(a == b)


@dataclass(frozen=True, slots=True)
class Difference:
    key: str
    stored: Any        # None when the stored configuration does not have the key
    given: Any         # None when the given configuration does not have the key
    kind: Kind


def differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[Difference]:
    """Every flattened key whose values differ, in key order."""
    a, b = flatten(stored), flatten(given)
    return [Difference(k, a.get(k), b.get(k), kind(k))
            for k in sorted(set(a) | set(b)) if not same(a.get(k), b.get(k))]


def covered(key: str, allowed: Iterable[str]) -> bool:
    """Whether `--allow-drift` names this key or a mapping that holds it."""
    return any(key == a or key.startswith(a + ".") for a in allowed)


def merge(stored: Mapping[str, Any], given: Mapping[str, Any],
          allowed: Iterable[str] = ()) -> dict[str, Any]:
    """The effective configuration of a resumed session (as a nested dict): session keys
    from `given`, answer keys from `given` where `allowed`, everything else from `stored`."""
    allowed = tuple(allowed)
    a, b = flatten(stored), flatten(given)
    out: dict[str, Any] = {}
    for key in _keys(a, b):
        k = kind(key)
        take_given = k is Kind.SESSION or (k is Kind.ANSWER and covered(key, allowed))
        source = b if take_given else a
        if key in source:
            out[key] = source[key]
    return unflatten(out)


def settings_hash(config: Mapping[str, Any]) -> str:
    """A short, stable digest of a configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
