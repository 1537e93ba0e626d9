"""Database -> JSON key file: the export, as the Rust module writes its file (records in key
order, each under the key it is stored by, through a fsynced temp file and a rename), or the
same text to an open stream (``idemstore export -``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TextIO

import sqlalchemy as sa

from ..db import bulk
from ..db.driver import Driver
from ..db.ops import Call
from ..store import IdempotencyStore
from .importer import sync_store
from .writer import check_writable, write_entries, write_entries_to

if TYPE_CHECKING:
    from ..aio import AsyncIdempotencyStore

__all__ = ["export_call", "export_file", "export_file_async"]


def export_call(target: str | os.PathLike[str] | TextIO) -> Call[int]:
    """Writing every record to a versioned file, as one read transaction. ``target``: a path
    (through a fsynced temporary file and a rename), or an open text stream written as the
    records come (e.g. standard output; not flushed). A path that cannot be written (a
    directory, a missing folder) is refused here, before any transaction
    (:class:`InvalidInputError`), as is one that fails while writing."""
    path: str | None = None
    stream: TextIO | None = None
    if isinstance(target, str | os.PathLike):
        path = os.fspath(target)
        check_writable(path)
    else:
        stream = target

    def run(d: Driver) -> int:
        entries = bulk.iter_entries(d)
        try:
            if stream is not None:
                return write_entries_to(stream, entries)
            return write_entries(str(path), entries)
        finally:
            entries.close()  # its cursor, while the connection is open (also on an error)

    return Call("read", run)


def export_file(store: IdempotencyStore | sa.Engine, path: str | os.PathLike[str]) -> int:
    """Write the whole database as a versioned file the Rust module reads (records in
    ``record_id`` order, through a fsynced temp file and a rename); the record count."""
    return sync_store(store).run(export_call(path))


async def export_file_async(store: AsyncIdempotencyStore, path: str | os.PathLike[str]) -> int:
    """:func:`export_file` for the async store, in one hop."""
    return await store.run(export_call(path))
