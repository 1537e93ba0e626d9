"""The bench's ceiling: the store's very statements (the same SQL text, compiled from
:mod:`idemstore.db.statements`), the same bind values and the same transaction shape (``BEGIN
IMMEDIATE`` / statements / ``COMMIT`` on SQLite) with the same pragmas, through the bare
driver: stdlib ``sqlite3``, psycopg, asyncpg."""

from __future__ import annotations

import importlib
import secrets
import sqlite3
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy.engine import Dialect

from ..db import ops
from ..db import statements as S
from ..db.codec import FINGERPRINT as FINGERPRINT_AT
from ..db.codec import RECORD_COLUMNS, TOKEN, U64_COLUMNS, U64_MAX_STORED, encode_u64
from ..db.driver import CompiledStatement, Statement
from ..db.engine import sqlite_connect_pragmas
from ..errors import ConfigurationError
from ..ids import idempotency_record_id
from ..rules import now_ms
from .harness import OPERATION, OUTCOME, OWNER, TENANT

#: The statements a reservation, a completion and a read run, by the names used here.
STATEMENTS: Final[Mapping[str, Statement]] = {
    "reserve": S.RESERVE,
    "complete": S.COMPLETE,
    "get": S.GET,
    "fingerprints_select": S.FINGERPRINTS_SELECT,
    "fingerprints_insert": S.FINGERPRINTS_INSERT,
    "fingerprints_delete": S.FINGERPRINTS_DELETE,
}


# -- the bare drivers: the same SQL, no SQLAlchemy -----------------------------------------


def reserve_params(key: str, fingerprint: str, token: int) -> tuple[str, dict[str, Any]]:
    """The record id and the bind values of a reservation, exactly as
    :func:`idemstore.db.ops.reserve` makes them."""
    fresh = ops.fresh_record(TENANT, OPERATION, key, OWNER, fingerprint, now_ms())
    return fresh.record_id, S.record_params(fresh, token)


def complete_params(key: str) -> tuple[str, dict[str, Any]]:
    record_id = idempotency_record_id(TENANT, OPERATION, key)
    return record_id, S.complete_params(TENANT, record_id, OUTCOME, now_ms())


def get_params(key: str) -> tuple[str, dict[str, Any]]:
    record_id = idempotency_record_id(TENANT, OPERATION, key)
    return record_id, S.tenant_params(TENANT, record_id)


def compiled_statements(dialect: Dialect) -> dict[str, CompiledStatement]:
    """The store's statements as the store compiles them for ``dialect``."""
    return {name: statement.compiled(dialect) for name, statement in STATEMENTS.items()}


def bind(stmt: CompiledStatement, params: Mapping[str, Any]) -> Any:
    if stmt.constants:
        params = {**stmt.constants, **params}
    if stmt.positional is not None:
        return tuple(params[p] for p in stmt.positional)
    return params


class BareSync:
    """The store's operations on a bare DBAPI connection (stdlib sqlite3 or psycopg)."""

    def __init__(self, connection: Any, dialect: Dialect) -> None:
        self.connection = connection
        self.sqlite = dialect.name == "sqlite"
        self.s = compiled_statements(dialect)

    def _begin(self, cursor: Any, write: bool) -> None:
        if self.sqlite:
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def reserve(self, key: str, fingerprint: str) -> str:
        s = self.s
        token = secrets.randbits(63)
        record_id, params = reserve_params(key, fingerprint, token)
        by_id = {"p_record_id": record_id}
        cursor = self.connection.cursor()
        try:
            self._begin(cursor, True)
            cursor.execute(s["reserve"].sql, bind(s["reserve"], params))
            (row,) = cursor.fetchall()
            if row[TOKEN] == token:
                kind = "reserved"
                if not row[S.INSERTED]:  # an older generation's history, as the store does
                    stmt = s["fingerprints_delete"]
                    cursor.execute(stmt.sql, bind(stmt, by_id))
            else:
                if row[FINGERPRINT_AT] == fingerprint:
                    kind = "duplicate"
                else:
                    kind = "conflict"
                    stmt = s["fingerprints_insert"]
                    cursor.execute(stmt.sql, bind(stmt, {**by_id, "p_fingerprint": fingerprint}))
                cursor.execute(s["fingerprints_select"].sql, bind(s["fingerprints_select"], by_id))
                cursor.fetchall()
            self.connection.commit()
            return kind
        except BaseException:
            self.connection.rollback()
            raise
        finally:
            cursor.close()

    def _read_back(self, name: str, params: Mapping[str, Any], record_id: str, write: bool) -> int:
        s = self.s
        cursor = self.connection.cursor()
        try:
            self._begin(cursor, write)
            cursor.execute(s[name].sql, bind(s[name], params))
            rows = cursor.fetchall()
            if rows:
                stmt = s["fingerprints_select"]
                cursor.execute(stmt.sql, bind(stmt, {"p_record_id": record_id}))
                cursor.fetchall()
            self.connection.commit()
            return len(rows)
        except BaseException:
            self.connection.rollback()
            raise
        finally:
            cursor.close()

    def complete(self, key: str) -> int:
        record_id, params = complete_params(key)
        return self._read_back("complete", params, record_id, True)

    def get(self, key: str) -> int:
        record_id, params = get_params(key)
        return self._read_back("get", params, record_id, False)


class BareAsyncpg:
    """The store's operations on bare asyncpg connections."""

    def __init__(self, dialect: Dialect) -> None:
        self.s = compiled_statements(dialect)

    async def reserve(self, conn: Any, key: str, fingerprint: str) -> str:
        s = self.s
        token = secrets.randbits(63)
        record_id, params = reserve_params(key, fingerprint, token)
        by_id = {"p_record_id": record_id}
        async with conn.transaction():
            row = await conn.fetchrow(s["reserve"].sql, *bind(s["reserve"], params))
            if row[TOKEN] == token:
                if not row[S.INSERTED]:
                    stmt = s["fingerprints_delete"]
                    await conn.execute(stmt.sql, *bind(stmt, by_id))
                return "reserved"
            kind = "duplicate"
            if row[FINGERPRINT_AT] != fingerprint:
                kind = "conflict"
                stmt = s["fingerprints_insert"]
                await conn.execute(stmt.sql, *bind(stmt, {**by_id, "p_fingerprint": fingerprint}))
            stmt = s["fingerprints_select"]
            await conn.fetch(stmt.sql, *bind(stmt, by_id))
            return kind

    async def _read_back(
        self, conn: Any, name: str, params: Mapping[str, Any], record_id: str
    ) -> int:
        s = self.s
        async with conn.transaction():
            rows = await conn.fetch(s[name].sql, *bind(s[name], params))
            if rows:
                stmt = s["fingerprints_select"]
                await conn.fetch(stmt.sql, *bind(stmt, {"p_record_id": record_id}))
            return len(rows)

    async def complete(self, conn: Any, key: str) -> int:
        record_id, params = complete_params(key)
        return await self._read_back(conn, "complete", params, record_id)

    async def get(self, conn: Any, key: str) -> int:
        record_id, params = get_params(key)
        return await self._read_back(conn, "get", params, record_id)


def open_bare_sqlite(path: str, synchronous: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A stdlib connection with idemstore's pragmas (and no implicit transactions)."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in sqlite_connect_pragmas(
        synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, memory=False
    ):
        connection.execute(pragma)
    return connection


def asyncpg_module() -> Any:
    return importlib.import_module("asyncpg")


def psycopg_module() -> Any:
    try:
        return importlib.import_module("psycopg")
    except ImportError as error:
        raise ConfigurationError(
            f"the PostgreSQL driver psycopg cannot be imported ({error}): "
            "pip install 'idemstore[postgresql]'"
        ) from None


# -- the plainest upsert: what a reservation costs at the least ----------------------------

#: The plainest baseline's table: the record's columns (the store's, without the importer's
#: ``record_id_field``), the primary key only: no other index, no CHECK, no conflict table.
PLAIN_TABLE: Final = "plainest_records"
#: The record's columns without idemstore's own extras (``record_id_field``, the lease): the
#: Rust record, as the issue's plainest baseline has it.
PLAIN_COLUMNS: Final = tuple(
    c for c in RECORD_COLUMNS if c not in {"record_id_field", "lease_expires_at_ms"}
)
_PLAIN_FRESH: Final = tuple(
    c
    for c in PLAIN_COLUMNS
    if c not in {"record_id", "status", "last_seen_at_ms", "conflict_count"}
)
_TEXT_COLUMNS: Final = frozenset(
    c
    for c in PLAIN_COLUMNS
    if c not in U64_COLUMNS and c not in {"schema_version", "reservation_token"}
)
#: The store's CHECK constraints (:mod:`idemstore.db.schema`), for the cost ladder.
_CHECKS: Final = (
    "CHECK (status IN ('reserved', 'completed', 'conflicted'))",
    "CHECK (tenant_source IN ('local_implicit', 'explicit'))",
    "CHECK ((outcome_kind IS NULL) = (outcome_completed_at_ms IS NULL))",
)
#: What the cost ladder adds to the plainest table, by name.
PLAIN_EXTRAS: Final = ("index", "partial index", "checks")


def plainest_sql(table: str = PLAIN_TABLE, extras: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """The statements creating ``table`` (with ``extras`` of :data:`PLAIN_EXTRAS`: an index on
    ``expires_at_ms``, the same index only where it is not NULL, the store's CHECKs) and the
    plainest baseline's upsert: the same CASE branches as the store's reserve, by hand."""
    t = table
    expired = f"{t}.expires_at_ms IS NOT NULL AND {t}.expires_at_ms <= excluded.last_seen_at_ms"
    columns = [
        f"{c} {'TEXT' if c in _TEXT_COLUMNS else 'INTEGER'}"
        + (" PRIMARY KEY" if c == "record_id" else "")
        for c in PLAIN_COLUMNS
    ]
    if "checks" in extras:
        columns += _CHECKS
    create = [f"CREATE TABLE IF NOT EXISTS {t} ({', '.join(columns)})"]
    if "index" in extras:
        create.append(f"CREATE INDEX IF NOT EXISTS ix_{t}_expires ON {t} (expires_at_ms)")
    if "partial index" in extras:
        create.append(
            f"CREATE INDEX IF NOT EXISTS ix_{t}_expires_set ON {t} (expires_at_ms) "
            "WHERE expires_at_ms IS NOT NULL"
        )
    sets = [f"{c} = CASE WHEN {expired} THEN excluded.{c} ELSE {t}.{c} END" for c in _PLAIN_FRESH]
    same = f"{t}.request_fingerprint = excluded.request_fingerprint"
    sets += [
        f"status = CASE WHEN {expired} THEN excluded.status WHEN {same} THEN {t}.status "
        "ELSE 'conflicted' END",
        "last_seen_at_ms = excluded.last_seen_at_ms",
        f"conflict_count = CASE WHEN {expired} THEN excluded.conflict_count "
        f"WHEN {same} THEN {t}.conflict_count "
        f"WHEN {t}.conflict_count >= {U64_MAX_STORED} THEN {t}.conflict_count "
        f"ELSE {t}.conflict_count + 1 END",
    ]
    upsert = (
        f"INSERT INTO {t} ({', '.join(PLAIN_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in PLAIN_COLUMNS)}) "
        f"ON CONFLICT (record_id) DO UPDATE SET {', '.join(sets)} RETURNING *"
    )
    return create, upsert


class PlainestSqlite:
    """A fresh reservation as plainly as it can be done on stdlib ``sqlite3``: the record id
    (the same hash), one upsert with the store's CASE branches on a table with the primary key
    only (plus ``extras``, for the cost ladder), ``BEGIN IMMEDIATE`` / ``COMMIT``, the same
    pragmas; the answer from the token."""

    def __init__(
        self, connection: sqlite3.Connection, table: str = PLAIN_TABLE, extras: tuple[str, ...] = ()
    ) -> None:
        self.connection = connection
        create, self.upsert = plainest_sql(table, extras)
        for statement in create:
            connection.execute(statement)

    def reserve(self, key: str, fingerprint: str, now: int) -> str:
        token = secrets.randbits(63)
        t = TENANT
        stored_now = encode_u64(now)
        row = (
            idempotency_record_id(t, OPERATION, key), 1, t.org_id, t.workspace_id,
            t.deployment_id, t.actor_id, t.source.value, OPERATION, key, OWNER, fingerprint,
            "reserved", stored_now, stored_now, None, None, None, None, None, None, None,
            None, None, encode_u64(0), token,
        )  # fmt: skip
        conn = self.connection
        conn.execute("BEGIN IMMEDIATE")
        try:
            (stored,) = conn.execute(self.upsert, row).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if stored[-1] == token:
            return "reserved"
        return "duplicate" if stored[FINGERPRINT_AT] == fingerprint else "conflict"
