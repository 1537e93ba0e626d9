"""What the importer and the exporter need from the database, many records at a time.

Rows travel as the codec's tuples (:mod:`idemstore.db.codec`: every column in row order,
u64 values stored, details as text, the reservation token last). Id lists are cut into
chunks of exactly :data:`~idemstore.db.statements.BULK_ROWS` ids (the last one padded), so
each statement compiles once.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from ..model import IdempotencyRecord
from . import statements as S
from .codec import KEY, Row, record_from_row
from .driver import Driver
from .schema import records


def _id_chunks(ids: Sequence[str]) -> list[list[str]]:
    """``ids`` in lists of exactly ``BULK_ROWS``, the last padded with its first id."""
    chunks = []
    for i in range(0, len(ids), S.BULK_ROWS):
        chunk = list(ids[i : i + S.BULK_ROWS])
        chunk.extend([chunk[0]] * (S.BULK_ROWS - len(chunk)))
        chunks.append(chunk)
    return chunks


def _fingerprints_of(d: Driver, ids: Sequence[str]) -> dict[str, list[str]]:
    """Conflict fingerprints of the records with these ids, each list in first-seen order."""
    fingerprints: dict[str, list[str]] = {}
    for chunk in _id_chunks(ids):
        for record_id, fingerprint in d.execute_flat(S.FINGERPRINTS_BY_IDS, chunk):
            fingerprints.setdefault(record_id, []).append(fingerprint)
    return fingerprints


def fetch_existing(d: Driver, ids: Sequence[str]) -> dict[str, tuple[Row, tuple[str, ...]]]:
    """Rows and conflict fingerprints of those of ``ids`` that exist."""
    found: dict[str, Row] = {}
    for chunk in _id_chunks(ids):
        for row in d.execute_flat(S.RECORDS_BY_IDS, chunk):
            found[row[KEY]] = tuple(row)
    if not found:
        return {}
    fingerprints = _fingerprints_of(d, list(found))
    return {k: (row, tuple(fingerprints.get(k, ()))) for k, row in found.items()}


def has_records(d: Driver) -> bool:
    """Whether the records table holds any row."""
    return bool(d.execute(S.ANY_RECORD))


def delete_records(d: Driver, ids: Sequence[str]) -> None:
    """Delete the records (and their conflict fingerprints) with these ids."""
    for chunk in _id_chunks(ids):
        d.execute_flat(S.FINGERPRINTS_DELETE_IDS, chunk)
        d.execute_flat(S.RECORDS_DELETE_IDS, chunk)


def insert_rows(
    d: Driver, rows: Sequence[Sequence[Any]], fingerprints: Sequence[tuple[str, str]]
) -> None:
    """Insert whole record rows, then ``(record_id, fingerprint)`` pairs in first-seen order:
    ``COPY`` on PostgreSQL, the driver's ``executemany`` of a one-row ``INSERT`` otherwise
    (fingerprints always, so their identity column numbers them in order)."""
    if not d.copy_rows(records, rows):
        d.executemany(S.BULK_INSERT, rows)
    d.executemany(S.BULK_FINGERPRINT, fingerprints)


def iter_entries(
    d: Driver, page_size: int = 1000
) -> Generator[tuple[str, IdempotencyRecord], None, None]:
    """Every record with the key it is stored under, in binary key order, streamed
    ``page_size`` rows at a time."""
    for page in d.stream(S.ALL_IN_ID_ORDER, size=page_size):
        fingerprints = _fingerprints_of(d, [row[KEY] for row in page])
        for row in page:
            yield row[KEY], record_from_row(row, fingerprints.get(row[KEY], ()))


__all__ = ["delete_records", "fetch_existing", "has_records", "insert_rows", "iter_entries"]
