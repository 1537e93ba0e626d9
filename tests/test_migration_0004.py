"""Revision 0004: the index on ``expires_at_ms`` only where it is set. Every row kept up and
down, and purge_expired still reads through an index on both engines."""

from __future__ import annotations

import sqlalchemy as sa

from idemstore import IdempotencyStore
from idemstore.db import migrate as idem_migrate
from idemstore.db import statements as S
from idemstore.db.codec import encode_u64
from idemstore.db.driver import _bound
from tests.conftest import Database
from tests.test_record_id_field import _populate_0001, _rows

NEW = "ix_idemstore_records_expires_at_ms_set"
OLD = "ix_idemstore_records_expires_at_ms"


def _indexes(conn: sa.Connection) -> set[str]:
    return {str(ix["name"]) for ix in sa.inspect(conn).get_indexes("idemstore_records")}


def _definition(conn: sa.Connection, name: str) -> str:
    if conn.dialect.name == "sqlite":
        sql = "SELECT sql FROM sqlite_master WHERE name = :n"
    else:
        sql = (
            "SELECT indexdef FROM pg_indexes WHERE indexname = :n AND schemaname = current_schema()"
        )
    return str(conn.execute(sa.text(sql), {"n": name}).scalar_one())


def _purge_plan(conn: sa.Connection) -> str:
    """The query plan of purge_expired's DELETE (PostgreSQL told to avoid a sequential scan
    where it can: with three rows it would rather scan; an index it cannot use stays unused)."""
    stmt = S.PURGE.compiled(conn.dialect)
    params = _bound(stmt, {"p_now": encode_u64(2_000), "p_limit": 100})
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {stmt.sql}", params).all()
        return "\n".join(str(r[-1]) for r in rows)
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    return "\n".join(str(r[0]) for r in conn.exec_driver_sql(f"EXPLAIN {stmt.sql}", params))


def test_migration_0004_keeps_every_row_up_and_down(database: Database) -> None:
    engine = database.sync_engine()
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0001_initial")
        _populate_0001(conn)
        idem_migrate.upgrade(conn, "0003_leases")
        conn.execute(
            sa.text("UPDATE idemstore_records SET expires_at_ms = :e WHERE record_id = 'idem_1'"),
            {"e": encode_u64(1_000)},
        )
        before = _rows(conn)
        assert OLD in _indexes(conn) and NEW not in _indexes(conn)
    with engine.begin() as conn:
        idem_migrate.upgrade(conn, "0004_partial_expiry_index")
        assert idem_migrate.current_revision(conn) == "0004_partial_expiry_index"
        assert _rows(conn) == before
        assert NEW in _indexes(conn) and OLD not in _indexes(conn)
        assert "WHERE" in _definition(conn, NEW).upper()  # partial on both engines
        assert NEW in _purge_plan(conn)
    with engine.begin() as conn:
        idem_migrate.downgrade(conn, "0003_leases")
        assert idem_migrate.current_revision(conn) == "0003_leases"
        assert _rows(conn) == before
        assert OLD in _indexes(conn) and NEW not in _indexes(conn)
        assert "WHERE" not in _definition(conn, OLD).upper()
        assert OLD in _purge_plan(conn)
    with engine.begin() as conn:
        idem_migrate.upgrade(conn)
    store = IdempotencyStore(engine)
    try:
        # Only the record whose expiry passed goes; those without one never do.
        assert store.purge_expired(now_ms=2_000) == 1
        with engine.connect() as conn:
            ids = conn.execute(sa.text("SELECT record_id FROM idemstore_records")).scalars()
            assert sorted(ids) == ["idem_0", "idem_2"]
    finally:
        store.close()
