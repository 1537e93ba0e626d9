"""The Rust module's input rules, in one place: what a key, an operation, a tenant, a
timestamp, an outcome and its details must be before anything is written.

Used by the operations (:mod:`idemstore.db.ops`), the record codec and the importer alike.
Plain Python: no SQLAlchemy, no I/O. Every refusal is an
:class:`~idemstore.errors.InvalidInputError` (also a ``ValueError``) with one line that names
what to fix; the messages of the Rust module are kept (``idempotency key cannot be empty``).
"""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta
from typing import Final

from . import jsonvalue
from .errors import InvalidInputError
from .model import U64_MAX, JSONValue, Outcome, TenantContext, TenantSource

#: What Rust's ``str::trim`` removes: the Unicode ``White_Space`` property. Python's
#: ``str.strip()`` also removes U+001C..U+001F, which would trim keys the Rust store keeps
#: (and so give them another record id).
RUST_WHITESPACE: Final = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
#: Largest value of a Rust ``u32`` (the record and file ``schema_version``).
U32_MAX: Final = 2**32 - 1
#: Records deleted per transaction by ``purge_expired``.
DEFAULT_PURGE_BATCH: Final = 1000
#: The largest ``batch_size``: the purge's ``LIMIT`` is bound as an SQL ``INTEGER``.
MAX_PURGE_BATCH: Final = 2**31 - 1
#: Why details may nest no deeper than MAX_DETAILS_DEPTH (the message says what to fix).
DETAILS_TOO_DEEP: Final = (
    f"nested more than {jsonvalue.MAX_DETAILS_DEPTH} levels deep: the Rust store's parser "
    f"refuses a file nested {jsonvalue.RUST_RECURSION_LIMIT} levels deep, and the details of a "
    f"record sit {jsonvalue.DETAILS_CONTAINERS} levels down in the file it reads"
)

_SOURCES: Final = frozenset(s.value for s in TenantSource)


def rust_trim(value: str) -> str:
    """``value`` trimmed as Rust's ``str::trim`` trims it."""
    return value.strip(RUST_WHITESPACE)


def check_unicode(value: str, name: str) -> str:
    """``value`` itself, if it is valid Unicode: Rust strings are UTF-8, so a lone surrogate
    has no place in a key or a record (:class:`InvalidInputError` naming ``name``)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def non_empty(value: str, name: str) -> str:
    """``value`` trimmed as Rust trims it; :class:`InvalidInputError` (``<name> cannot be
    empty``, the Rust message) when nothing is left or it is not a valid string."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, not {type(value).__name__}")
    normalized = rust_trim(check_unicode(value, name))
    if not normalized:
        raise InvalidInputError(f"{name} cannot be empty")
    return normalized


def u64(value: int, name: str) -> int:
    """``value`` if it is an integer from 0 to 2^64-1 (a Rust ``u64``), else
    :class:`InvalidInputError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise InvalidInputError(f"{name} must be an integer from 0 to 2^64-1, not {value!r}")
    return value


def optional_str(value: str | None, name: str) -> str | None:
    """``value`` if it is None or a valid string, else :class:`InvalidInputError`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string or None, not {type(value).__name__}")
    return check_unicode(value, name)


def tenant(value: TenantContext) -> TenantContext:
    """``value`` if it is a :class:`TenantContext` of valid strings and a known source, else
    :class:`InvalidInputError` naming the field."""
    if not isinstance(value, TenantContext):
        raise InvalidInputError(f"tenant must be a TenantContext, not {type(value).__name__}")
    for name in ("org_id", "workspace_id"):
        text = getattr(value, name)
        if not isinstance(text, str):
            raise InvalidInputError(f"tenant {name} must be a string")
        check_unicode(text, f"tenant {name}")
    optional_str(value.deployment_id, "tenant deployment_id")
    optional_str(value.actor_id, "tenant actor_id")
    if not isinstance(value.source, str) or value.source not in _SOURCES:
        raise InvalidInputError(
            f"tenant source must be one of {', '.join(sorted(_SOURCES))}, not {value.source!r}"
        )
    return value


def now_ms() -> int:
    """Milliseconds since the Unix epoch, the store's clock."""
    return time.time_ns() // 1_000_000


def now_or(value: int | None) -> int:
    """``value`` (checked as a u64 named ``now_ms``), or the clock when it is None."""
    return now_ms() if value is None else u64(value, "now_ms")


#: A lease or ttl: a ``timedelta``, or an int of milliseconds.
Duration = timedelta | int


def duration_ms(value: Duration, name: str) -> int:
    """``value`` (a ``timedelta``, or an int of milliseconds) in whole milliseconds (a
    ``timedelta`` rounded down), if that is at least 1 ms; else :class:`InvalidInputError`
    naming ``name``."""
    if isinstance(value, timedelta):
        ms = value // timedelta(milliseconds=1)
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = value
    else:
        raise InvalidInputError(
            f"{name} must be a timedelta or an int of milliseconds, not {type(value).__name__}"
        )
    if ms < 1:
        raise InvalidInputError(f"{name} must be at least 1 millisecond, not {value!r}")
    return ms


def after(now: int, value: Duration, name: str) -> int:
    """``now`` plus the duration ``value`` (:func:`duration_ms`), in milliseconds since the
    epoch; :class:`InvalidInputError` naming ``name`` when that is beyond 2^64-1."""
    end = now + duration_ms(value, name)
    if end > U64_MAX:
        raise InvalidInputError(
            f"{name} ends after 2^64-1 ms since the epoch: {value!r} is too long"
        )
    return end


def outcome(value: Outcome) -> Outcome:
    """``value`` if it is an :class:`Outcome` the Rust store could hold, else
    :class:`InvalidInputError` naming the field. Its details are checked when they are
    encoded (:func:`dump_details`)."""
    if not isinstance(value, Outcome):
        raise InvalidInputError(f"outcome must be an Outcome, not {type(value).__name__}")
    if not isinstance(value.outcome_kind, str):
        raise InvalidInputError("outcome_kind must be a string")
    check_unicode(value.outcome_kind, "outcome_kind")
    u64(value.completed_at_ms, "completed_at_ms")
    for name in ("primary_ref_kind", "primary_ref_id", "secondary_ref_kind", "secondary_ref_id"):
        optional_str(getattr(value, name), name)
    return value


def purge_batch(batch_size: int) -> int:
    """``batch_size`` if it is an integer from 1 to :data:`MAX_PURGE_BATCH`."""
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_PURGE_BATCH
    ):
        raise InvalidInputError(
            f"batch_size must be an integer from 1 to {MAX_PURGE_BATCH}, not {batch_size!r}"
        )
    return batch_size


# -- details: the canonical text, within what the Rust parser reads --------------------------

#: Compact, keys sorted, non-ASCII kept, NaN refused: serde_json's form of a ``Value``.
_DETAILS_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


#: The same, as the C encoder made once (``json.dumps`` makes one per call, which costs as
#: much as encoding a small object). No circular-reference bookkeeping: a cycle ends in a
#: RecursionError, and is then found too deep.
def _not_json(value: object) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_C_ENCODER: Final = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
    if getattr(json.encoder, "c_make_encoder", None) is not None
    else None
)

#: Digits enough for an integer beyond f64's range (the value is then checked exactly).
_HUGE_DIGITS: Final = 300
_HUGE_INTEGER: Final = re.compile(f"[0-9]{{{_HUGE_DIGITS}}}")


def _not_serialisable(error: Exception) -> InvalidInputError:
    return InvalidInputError(f"outcome details must be JSON-serialisable: {error}")


def _too_deep() -> InvalidInputError:
    return InvalidInputError(f"outcome details are {DETAILS_TOO_DEEP} (or they contain themselves)")


def dump_checked_details(details: JSONValue) -> str:
    """Details already checked as the Rust parser reads them (the importer's
    ``details_value``: acyclic, not too deep, numbers in range) as stored text."""
    try:
        if details is None:
            return "null"
        if type(details) is str:
            return check_unicode(json.encoder.encode_basestring(details), "outcome details")
        text = "".join(_C_ENCODER(details, 0)) if _C_ENCODER is not None else dump_details(details)
    except RecursionError:  # not enough stack left here for the C encoder
        text = jsonvalue.dumps_compact(details)
    return check_unicode(text, "outcome details")


def dump_details(details: JSONValue) -> str:
    """Outcome details as stored: compact JSON, keys sorted (as serde_json writes them).

    Raises :class:`InvalidInputError` for details that are not JSON, circular, or that would
    make a file the Rust store cannot read: nested more than
    :data:`~idemstore.jsonvalue.MAX_DETAILS_DEPTH` deep, or holding an integer beyond f64's
    range. Deep details are written without recursion when the stack runs short.
    """
    try:
        if details is None:
            text = "null"
        elif type(details) is str:
            text = json.encoder.encode_basestring(details)
        elif _C_ENCODER is not None:
            text = "".join(_C_ENCODER(details, 0))
        else:  # pragma: no cover - CPython always has the C encoder
            text = _DETAILS_ENCODER.encode(details)
    except RecursionError:
        # Deeper than the stack left here allows: circular, too deep, or a caller deep in
        # its own stack. Measured and written again without recursion.
        try:
            jsonvalue.check_value(details, jsonvalue.MAX_DETAILS_DEPTH, tuples_are_objects=False)
        except jsonvalue.TooDeep:
            raise _too_deep() from None
        except jsonvalue.OutOfRange:
            pass  # reported below, with its path
        try:
            text = jsonvalue.dumps_compact(details)
        except (TypeError, ValueError) as error:
            raise _not_serialisable(error) from None
    except (TypeError, ValueError) as error:
        raise _not_serialisable(error) from None
    else:
        # Short texts (the common case) can be neither: a container takes two characters.
        if (
            len(text) > 2 * jsonvalue.MAX_DETAILS_DEPTH
            and text.count("[") + text.count("{") > jsonvalue.MAX_DETAILS_DEPTH
            and jsonvalue.first_too_deep(text, limit=jsonvalue.MAX_DETAILS_DEPTH) is not None
        ):
            raise _too_deep()
    if len(text) >= _HUGE_DIGITS and _HUGE_INTEGER.search(text) is not None:
        where = jsonvalue.check_details(details)
        if where is not None:
            raise InvalidInputError(
                f"outcome details: the integer at {where} is beyond the range of a float, "
                "which the Rust store's parser refuses (number out of range)"
            )
    return check_unicode(text, "outcome details")


__all__ = [
    "DEFAULT_PURGE_BATCH",
    "DETAILS_TOO_DEEP",
    "MAX_PURGE_BATCH",
    "RUST_WHITESPACE",
    "U32_MAX",
    "Duration",
    "after",
    "check_unicode",
    "dump_checked_details",
    "dump_details",
    "duration_ms",
    "non_empty",
    "now_ms",
    "now_or",
    "optional_str",
    "outcome",
    "purge_batch",
    "rust_trim",
    "tenant",
    "u64",
]
