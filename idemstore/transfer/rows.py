"""Records of a JSON key file as database rows, without SQLAlchemy.

The importer's conversion from a decoded record to the row that is inserted lives here, so
that the parse worker processes (:mod:`idemstore.transfer.parse`) can run it without importing
the database layer. Rows are built by the record codec (:func:`idemstore.db.codec.make_row`):
every column, u64 values stored, the details as their stored text, a random
``reservation_token`` last.

Two paths turn a record into a row:

* the fast one works on the record as the C JSON scanner returns it with
  ``object_pairs_hook=tuple`` (a tuple of ``(key, value)`` pairs), looks its field layout up
  in a cache (so duplicate or unknown fields cost one dict look-up per distinct layout) and
  checks the types and ranges serde would check. Caches are keyed on keys, types, strings
  and nulls only: never on other JSON values, where Python's ``1 == 1.0 == True`` would merge
  different texts;
* anything the fast path does not take goes to :func:`idemstore.transfer.validate.validate_value`,
  which builds the row the slow way or refuses the record with serde's exact message.

A test runs both over every sample and every bad file: the fast path never accepts a record
the precise one refuses, and both give the same row.
"""

from __future__ import annotations

import contextlib
import gc
import secrets
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Final

from .. import jsonvalue
from ..db.codec import (
    NO_OUTCOME,
    OutcomeColumns,
    Row,
    TenantColumns,
    field_of,
    make_row,
    record_row,
    tenant_values,
)
from ..errors import InvalidInputError
from ..ids import record_id_hasher
from ..model import U64_MAX, RecordStatus, TenantSource
from ..rules import U32_MAX, dump_checked_details
from .fields import (
    LEGACY_TENANT,
    OUTCOME_FIELD_SET,
    OUTCOME_FIELDS,
    RECORD_FIELD_SET,
    RECORD_FIELDS,
    TENANT_FIELD_SET,
)
from .validate import (
    RecordProblem,
    check_record_text,
    details_value,
    plain_value,
    unknown_fields,
    validate_value,
)

__all__ = [
    "REPORT_LIST_LIMIT",
    "Converted",
    "Converter",
    "IdMismatch",
    "gc_paused",
]

#: A converted record: its row (token last) and its conflict fingerprints, first-seen order.
Converted = tuple[Row, tuple[str, ...]]

#: At most this many id mismatches are listed in a report (all are counted).
REPORT_LIST_LIMIT: Final = 1000


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (restored after): a bulk parse makes millions of
    tuples that live for a batch, and the collector would walk them over and over (measured:
    the C JSON scanner takes twice as long with it on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# Decoded records -> rows


@dataclass(frozen=True, slots=True)
class IdMismatch:
    """A record whose ``record_id`` field or recomputed id differs from its map key."""

    map_key: str
    record_id: str
    computed_id: str


class _Slow(Exception):
    """The fast path does not take this record: use the precise validator."""


class _Absent:
    """Stands for a field that is missing (not ``null``, which serde may refuse)."""


_ABSENT_TENANT: Final = _Absent()  # the legacy default tenant
_ABSENT_LIST: Final = _Absent()  # no conflict fingerprints
# What a missing optional field reads as, appended after a record's values so that one
# itemgetter picks every field (present or defaulted) in RECORD_FIELDS order.
_RECORD_DEFAULTS: Final = {
    "schema_version": 1,
    "tenant_context": _ABSENT_TENANT,
    "first_seen_event_id": None,
    "expires_at_ms": None,
    "outcome": None,
    "conflict_count": 0,
    "conflict_fingerprints": _ABSENT_LIST,
}
_DEFAULT_VALUES: Final = tuple(_RECORD_DEFAULTS.values())
_REQUIRED: Final = frozenset(RECORD_FIELDS) - _RECORD_DEFAULTS.keys()
_DEFAULT_AT: Final = {name: i for i, name in enumerate(_RECORD_DEFAULTS)}
# The Python type each field may have on the fast path (serde's rules; anything else, bool
# included, goes to the precise validator).
_Types = frozenset[type]
_STR: Final[_Types] = frozenset((str,))
_OPT_STR: Final[_Types] = frozenset((str, type(None)))
_INT: Final[_Types] = frozenset((int,))
_FIELD_TYPES: Final[tuple[_Types, ...]] = (
    _INT,  # schema_version
    _STR,  # record_id
    frozenset((tuple, _Absent)),  # tenant_context
    _STR,
    _STR,
    _STR,
    _STR,  # operation, key, owner, request_fingerprint
    _STR,  # status
    _INT,
    _INT,  # first/last seen
    _OPT_STR,  # first_seen_event_id
    frozenset((int, type(None))),  # expires_at_ms
    frozenset((tuple, type(None))),  # outcome
    _INT,  # conflict_count
    frozenset((list, _Absent)),  # conflict_fingerprints
)
_OUTCOME_TYPES: Final[tuple[_Types, ...]] = (_STR, _INT, _OPT_STR, _OPT_STR, _OPT_STR, _OPT_STR)
_STATUSES: Final = frozenset(s.value for s in RecordStatus)
_SOURCES: Final = frozenset(s.value for s in TenantSource)
# The legacy default tenant as row columns.
_LEGACY_TENANT: Final = tenant_values(LEGACY_TENANT)
_CACHE_LIMIT: Final = 10_000
_FLAT: Final = frozenset((str, type(None)))
_VALUE: Final = itemgetter(1)
_TOKENS_AT_ONCE: Final = 4096


@dataclass(frozen=True, slots=True)
class _Layout:
    """How to read one object layout (its keys, in file order)."""

    pick: Any  # itemgetter over values + defaults; None if the fast path cannot take it
    unknown: tuple[str, ...]


def _record_layout(keys: tuple[str, ...]) -> _Layout:
    if len(set(keys)) != len(keys) or not set(keys) >= _REQUIRED:
        return _Layout(None, ())
    at = {name: i for i, name in enumerate(keys)}
    n = len(keys)
    picks = [at[f] if f in at else n + _DEFAULT_AT[f] for f in RECORD_FIELDS]
    unknown = tuple(k for k in keys if k not in RECORD_FIELD_SET)
    return _Layout(itemgetter(*picks), unknown)


def _outcome_layout(keys: tuple[str, ...]) -> _Layout:
    if len(set(keys)) != len(keys) or not {"outcome_kind", "completed_at_ms"} <= set(keys):
        return _Layout(None, ())
    at = {name: i for i, name in enumerate(keys)}
    picks = [at.get(f, len(keys)) for f in OUTCOME_FIELDS]  # missing: the None appended
    unknown = tuple("outcome." + k for k in keys if k not in OUTCOME_FIELD_SET)
    return _Layout(itemgetter(*picks), unknown)


def _types_ok(types: tuple[type, ...], allowed: tuple[_Types, ...]) -> bool:
    return all(t in a for t, a in zip(types, allowed, strict=True))


def _tenant(pairs: tuple[tuple[str, Any], ...]) -> tuple[TenantColumns, tuple[str, ...]]:
    """A tenant object's five columns and unknown fields, or :class:`_Slow`."""
    if not pairs:
        raise _Slow
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Slow
    org = d.get("org_id")
    ws = d.get("workspace_id")
    dep = d.get("deployment_id")
    actor = d.get("actor_id")
    source = d.get("source", "local_implicit")
    if not (
        type(org) is str
        and type(ws) is str
        and (dep is None or type(dep) is str)
        and (actor is None or type(actor) is str)
        and type(source) is str
        and source in _SOURCES
    ):
        raise _Slow
    unknown = tuple("tenant_context." + k for k in d if k not in TENANT_FIELD_SET)
    return (org, ws, dep, actor, source), unknown


class Converter:
    """Turns decoded records into :data:`Converted` items, tallying unknown fields and id
    mismatches (``strict``: a mismatch refuses the record instead).

    Call it with ``(map_key, value)`` for one record (``value`` as scanned with pairs as tuples,
    or a plain dict), or :meth:`chunk` with the pairs of many records at once.

    ``containers``: how deep the records sit in their file (2 in the versioned form, 1 in the
    legacy one), for the nesting limit the Rust parser counts over the whole file.
    """

    def __init__(self, *, strict: bool = False, containers: int = 2) -> None:
        self.strict = strict
        self.containers = containers
        #: Unknown field path -> how many records had it.
        self.unknown: Counter[str] = Counter()
        self.records_with_unknown_fields = 0
        self.id_mismatches = 0
        #: The first :data:`REPORT_LIST_LIMIT` id mismatches.
        self.mismatches: list[IdMismatch] = []
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        self._outcomes: dict[tuple[str, ...], _Layout] = {}
        self._tenants: dict[Any, tuple[TenantColumns, tuple[str, ...]]] = {}
        self._types: dict[tuple[type, ...], bool] = {}
        self._details: dict[tuple[tuple[str, str | None], ...], str] = {}
        self._hashers: dict[tuple[Row, str], Callable[[str], str]] = {}
        self._tokens: Iterator[int] = iter(())
        # Tallies of the records converted but not yet committed (see chunk()).
        self._pending_unknown: list[tuple[str, ...]] = []
        self._pending_mismatches: list[IdMismatch] = []

    # -- one record

    def __call__(self, map_key: str, value: Any) -> Converted:
        try:
            try:
                item = self._fast(map_key, value)
            except _Slow:
                item = self._precise(map_key, value)
        except BaseException:
            self._discard()
            raise
        self._commit()
        return item

    def chunk(self, pairs: tuple[tuple[str, Any], ...]) -> list[Converted] | None:
        """Every record of ``pairs`` (map key, record pairs), or None when one of them needs
        the precise path (the caller then reads them one by one, which finds the line of any
        error); nothing is tallied then."""
        fast = self._fast
        try:
            items = [fast(k, v) for k, v in pairs]
        except (_Slow, RecordProblem, jsonvalue.JSONValueProblem, InvalidInputError):
            self._discard()
            return None
        self._commit()
        return items

    # -- the two paths

    # Over 80 lines on purpose: the per-record hot path of the import (about 100k calls a
    # second); every helper call it would be split into costs measurably (see README, Import).
    def _fast(self, map_key: str, value: Any) -> Converted:
        if type(value) is not tuple or not value:
            raise _Slow
        keys, values = zip(*value)  # noqa: B905 - pairs
        layout = self._layouts.get(keys)
        if layout is None:
            layout = self._layouts[keys] = _record_layout(keys)
        if layout.pick is None:
            raise _Slow
        fields = layout.pick(values + _DEFAULT_VALUES)
        types = tuple(map(type, fields))
        ok = self._types.get(types)
        if ok is None:
            ok = self._types[types] = _types_ok(types, _FIELD_TYPES)
        if not ok:
            raise _Slow
        sv, rid, tc, op, key, owner, fp, status, first, last, event, expires, oc, count, fps = (
            fields
        )
        if not (
            0 <= sv <= U32_MAX
            and status in _STATUSES
            and 0 <= first <= U64_MAX
            and 0 <= last <= U64_MAX
            and 0 <= count <= U64_MAX
            and (expires is None or 0 <= expires <= U64_MAX)
        ):
            raise _Slow
        unknown = layout.unknown
        if tc is _ABSENT_TENANT:
            tenant = _LEGACY_TENANT
        else:
            try:
                cached = self._tenants.get(tc)
            except TypeError:  # an unknown field holds a list: not hashable
                cached = _tenant(tc)
            if cached is None:
                cached = _tenant(tc)
                if len(self._tenants) >= _CACHE_LIMIT:
                    self._tenants.clear()
                self._tenants[tc] = cached
            tenant, tenant_unknown = cached
            if tenant_unknown:
                unknown += tenant_unknown
        if oc is None:
            outcome: OutcomeColumns = NO_OUTCOME
        else:
            okeys, ovalues = zip(*oc, strict=True) if oc else ((), ())
            olayout = self._outcomes.get(okeys)
            if olayout is None:
                olayout = self._outcomes[okeys] = _outcome_layout(okeys)
            if olayout.pick is None:
                raise _Slow
            ofields = olayout.pick((*ovalues, None))
            otypes = tuple(map(type, ofields))
            ok = self._types.get(otypes)
            if ok is None:
                ok = self._types[otypes] = _types_ok(otypes[:6], _OUTCOME_TYPES)
            kind, completed, pk, pid, sk, sid, details = ofields
            if not (ok and 0 <= completed <= U64_MAX):
                raise _Slow
            if olayout.unknown:
                unknown += olayout.unknown
            # Cached only for a flat object of strings and nulls, whose pairs are an exact key
            # (1, 1.0 and true are equal in Python but different JSON).
            if type(details) is tuple and _FLAT.issuperset(map(type, map(_VALUE, details))):
                text = self._details.get(details)
                if text is None:
                    text = dump_checked_details(details_value(details))
                    if len(self._details) >= _CACHE_LIMIT:
                        self._details.clear()
                    self._details[details] = text
            else:
                # Checked as the Rust parser reads them: nesting, numbers beyond u64 / i64.
                text = dump_checked_details(details_value(details))
            outcome = (kind, completed, pk, pid, sk, sid, text)
        if fps is _ABSENT_LIST or not fps:
            fingerprints: tuple[str, ...] = ()
        else:
            if not all(type(f) is str for f in fps):
                raise _Slow
            fingerprints = tuple(fps)
        if unknown:  # ignored, but they still have to parse: nesting, numbers
            check_record_text(value, self.containers)
        # The common case (one id computed, equal to the map key) needs no more of _check.
        if (
            len(fingerprints) > 1
            or rid != map_key
            or unknown
            or self._hasher(tenant, op)(key) != map_key
        ):
            self._check(map_key, rid, tenant, op, key, fingerprints, unknown)
        token = next(self._tokens, None)
        if token is None:
            token = self._more_tokens()
        # The codec builds the row (mypy misaligns the unpacked fixed-length tuples).
        row = make_row(
            map_key, sv, *tenant, op, key, owner, fp, status, first, last, event, expires,
            *outcome, count, field_of(map_key, rid), None, token,  # type: ignore[arg-type]
        )  # fmt: skip
        return row, fingerprints

    def _precise(self, map_key: str, value: Any) -> Converted:
        d = plain_value(value, jsonvalue.MAX_DEPTH - self.containers)
        record, _ = validate_value(d, containers=self.containers)
        unknown = unknown_fields(d) if type(d) is dict else ()
        row = record_row(record, map_key)
        fps = record.conflict_fingerprints
        tenant = tenant_values(record.tenant_context)
        self._check(map_key, record.record_id, tenant, record.operation, record.key, fps, unknown)
        token = next(self._tokens, None)
        if token is None:
            token = self._more_tokens()
        return (*row, token), fps

    def _check(
        self,
        map_key: str,
        record_id: str,
        tenant: Row,
        operation: str,
        key: str,
        fps: tuple[str, ...],
        unknown: tuple[str, ...],
    ) -> None:
        """What both paths check once the values are known; tallies go to pending."""
        if len(fps) > 1 and len(set(fps)) != len(fps):
            seen: set[str] = set()
            for i, f in enumerate(fps):
                if f in seen:
                    raise RecordProblem(
                        f"conflict fingerprint {f!r} appears twice: the database keeps each "
                        "fingerprint of a record once",
                        f"conflict_fingerprints[{i}]",
                    )
                seen.add(f)
        computed = self._hasher(tenant, operation)(key)
        if record_id != map_key or computed != map_key:
            if self.strict:
                raise RecordProblem(
                    f"id mismatch (--strict): map key {map_key!r}, record_id field "
                    f"{record_id!r}, id computed from tenant, operation and key {computed!r}",
                    "record_id" if record_id != map_key else "",
                )
            self._pending_mismatches.append(IdMismatch(map_key, record_id, computed))
        if unknown:
            self._pending_unknown.append(unknown)

    def _hasher(self, tenant: Row, operation: str) -> Callable[[str], str]:
        """The record-id function of this tenant and operation (kept per converter: a dict
        look-up costs less than the lru_cache behind it)."""
        hasher = self._hashers.get((tenant, operation))
        if hasher is None:
            if len(self._hashers) >= _CACHE_LIMIT:
                self._hashers.clear()
            hasher = self._hashers[tenant, operation] = record_id_hasher(
                tenant[0], tenant[1], tenant[2], operation
            )
        return hasher

    def _more_tokens(self) -> int:
        """Reservation tokens: 63 random bits each, drawn many at once."""
        raw = struct.unpack(f"<{_TOKENS_AT_ONCE}Q", secrets.token_bytes(8 * _TOKENS_AT_ONCE))
        self._tokens = iter([t >> 1 for t in raw])
        return next(self._tokens)

    def _commit(self) -> None:
        if self._pending_unknown:
            for names in self._pending_unknown:
                self.records_with_unknown_fields += 1
                self.unknown.update(names)
            self._pending_unknown.clear()
        if self._pending_mismatches:
            self.id_mismatches += len(self._pending_mismatches)
            room = REPORT_LIST_LIMIT - len(self.mismatches)
            self.mismatches.extend(self._pending_mismatches[: max(room, 0)])
            self._pending_mismatches.clear()

    def _discard(self) -> None:
        self._pending_unknown.clear()
        self._pending_mismatches.clear()
