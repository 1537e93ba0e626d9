"""Faults around the schema: migrations run from many instances at once, databases at a
revision this package does not know, secrets in database URLs, and commands that only read.

Concurrency and command-line checks run real processes (the ``idemstore`` console script's
entry function, ``python -c`` with ``from_url(..., migrate=True)``, ``python -m idemstore``)
against a real PostgreSQL server (scratch databases and schemas) and SQLite files.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from idemstore import (
    AsyncIdempotencyStore,
    ConfigurationError,
    IdempotencyStore,
    SchemaNotReadyError,
    TenantContext,
    create_engine,
)
from idemstore.db import migrate as idem_migrate
from idemstore.db.engine import safe_url
from idemstore.db.schema import SCHEMA_REVISION, SCHEMA_REVISIONS, VERSION_TABLE
from tests.conftest import Database, postgres_url_or_skip

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret"
NEWER = "0099_from_a_newer_idemstore"
TENANT = TenantContext.local_implicit()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IDEMSTORE_")}


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``idemstore ARGV...`` as a user runs it (a new process, no IDEMSTORE_* environment)."""
    return subprocess.run(
        [sys.executable, "-m", "idemstore", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=120,
    )


def _cli_all(commands: Sequence[Sequence[str]]) -> list[tuple[int, str, str]]:
    """Run several ``idemstore`` commands side by side; (exit code, stdout, stderr) each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "idemstore", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for argv in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((proc.returncode, out, err))
    return results


def _cli_url(database: Database) -> str:
    """The URL a user would pass for ``database`` (PostgreSQL: its schema in ``options``)."""
    if database.schema is None:
        return database.url
    return f"{database.url}?options=-csearch_path%3D{database.schema}"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("idemstore: error: "), stderr
    return lines[0]


def _state(engine: sa.Engine) -> tuple[list[str], list[str]]:
    """The tables and the version table's rows: what a refused migration must leave alone."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalars().all()
    return sorted(sa.inspect(engine).get_table_names()), sorted(rows)


@pytest.fixture
def scratch_postgres() -> Iterator[Callable[[], str]]:
    """Factory of whole, empty PostgreSQL databases (dropped after the test): their URLs."""
    admin_url = postgres_url_or_skip()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    made: list[str] = []

    def make() -> str:
        name = f"idemstore_scratch_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        made.append(name)
        return make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


# -- 1. many instances migrate at once ----------------------------------------------------

#: Each process loads everything, says ``ready`` and waits for ``go`` on stdin, so that the
#: four migrations start within a millisecond or so of each other.
_READY = (
    "import sys, alembic.command, idemstore.cli, idemstore.store; "
    "print('ready', flush=True); sys.stdin.readline(); "
)
#: ``idemstore --database-url URL migrate`` through the console script's entry function.
_MIGRATE_COMMAND = (
    _READY + "sys.argv = ['idemstore', '--database-url', sys.argv[1], 'migrate']; "
    "sys.exit(idemstore.cli.main())"
)
#: An application instance opening its store with ``migrate=True``.
_MIGRATE_ON_OPEN = (
    _READY + "from idemstore import IdempotencyStore; "
    "IdempotencyStore.from_url(sys.argv[1], migrate=True).close()"
)
ROUNDS = 5


def _migrate_at_once(url: str) -> list[tuple[int, str]]:
    """Four processes (two ``idemstore migrate``, two ``from_url(migrate=True)``) released
    together on a fresh database; each one's exit code and stderr."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for code in (_MIGRATE_COMMAND, _MIGRATE_ON_OPEN, _MIGRATE_COMMAND, _MIGRATE_ON_OPEN)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            results.append((proc.returncode, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _assert_migrated_once(url: str, results: list[tuple[int, str]]) -> None:
    failures = [
        [line for line in err.splitlines() if "Error" in line or "error:" in line][-1:]
        for code, err in results
        if code != 0
    ]
    assert not failures, failures
    engine = create_engine(url, poolclass=NullPool)
    try:
        tables, rows = _state(engine)
    finally:
        engine.dispose()
    assert rows == [SCHEMA_REVISION]
    assert {"idemstore_records", "idemstore_conflict_fingerprints"} <= set(tables)


def test_many_instances_migrate_a_fresh_postgresql_database_at_once(scratch_postgres):
    for _ in range(ROUNDS):
        url = scratch_postgres()
        _assert_migrated_once(url, _migrate_at_once(url))


def test_a_migration_waits_for_another_longer_than_the_lock_timeout(make_database):
    """The advisory lock is waited for without limit (another instance's upgrade may take
    longer than busy_timeout_ms); the store's lock_timeout applies again afterwards."""
    db = make_database("postgresql")
    holder = db.sync_engine(poolclass=NullPool)
    with holder.connect() as conn:
        conn.exec_driver_sql(
            f"SELECT pg_advisory_xact_lock({idem_migrate.MIGRATION_LOCK_KEY}, "
            "hashtext(coalesce(current_schema(), '')))"
        )
        migrator = db.sync_store(migrate=False, busy_timeout_ms=200)
        finished: list[float] = []

        def migrate() -> None:
            migrator.migrate()
            finished.append(time.monotonic())

        thread = threading.Thread(target=migrate)
        thread.start()
        time.sleep(1.0)  # five lock timeouts
        assert thread.is_alive() and not finished, "the migration did not wait for the lock"
        released = time.monotonic()
        conn.rollback()
    thread.join(30)
    assert finished and finished[0] >= released
    with migrator.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW lock_timeout").scalar_one() == "200ms"
    migrator.close()


def test_many_instances_migrate_a_fresh_sqlite_file_at_once(tmp_path):
    for n in range(ROUNDS):
        path = tmp_path / f"round{n}" / "idemstore.db"
        path.parent.mkdir()
        url = f"sqlite:///{path}"
        _assert_migrated_once(url, _migrate_at_once(url))  # the file did not exist: WAL too
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


# -- 2. a database at a revision this package does not know -------------------------------


def test_known_revisions_are_the_migration_scripts():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(idem_migrate.alembic_config())
    chain = tuple(reversed([script.revision for script in scripts.walk_revisions()]))
    assert chain == SCHEMA_REVISIONS  # base first, head last
    assert SCHEMA_REVISION == chain[-1] == idem_migrate.head_revision()
    files = [p for p in (REPO / "migrations" / "versions").glob("*.py") if p.stem != "__init__"]
    assert len(files) == len(chain)


def _refusal(message: str, *found: str) -> None:
    """One line that names the revision(s) found and the one this package needs, and does
    not send the reader to ``idemstore migrate`` (which cannot help)."""
    assert "\n" not in message
    for revision in found:
        assert repr(revision) in message, message
    assert repr(SCHEMA_REVISION) in message, message
    assert "run `idemstore migrate`" not in message, message


def _refused_everywhere(database: Database, *found: str) -> None:
    """The store (sync and async), migrate (library and command) and the CLI all refuse
    ``database`` with one line, and the refused migrations change nothing."""
    engine = database.sync_engine()
    before = _state(engine)

    with IdempotencyStore.from_url(database.url, **database.sync_options()) as store:
        with pytest.raises(SchemaNotReadyError) as on_use:
            store.get(TENANT, "op", "k")
        with pytest.raises(SchemaNotReadyError) as on_migrate:
            store.migrate()
    _refusal(str(on_use.value), *found)
    _refusal(str(on_migrate.value), *found)
    with pytest.raises(SchemaNotReadyError) as on_open:
        IdempotencyStore.from_url(database.url, migrate=True, **database.sync_options())
    _refusal(str(on_open.value), *found)

    async def use_async() -> None:
        store = AsyncIdempotencyStore.from_url(database.url, **database.async_options())
        try:
            with pytest.raises(SchemaNotReadyError) as on_async_use:
                await store.stats()
            with pytest.raises(SchemaNotReadyError) as on_async_migrate:
                await store.migrate()
        finally:
            await store.close()
        _refusal(str(on_async_use.value), *found)
        _refusal(str(on_async_migrate.value), *found)

    asyncio.run(use_async())

    url = _cli_url(database)
    for code, out, err in _cli_all([["--database-url", url, c] for c in ("migrate", "stats")]):
        assert code == 2, (out, err)
        _refusal(_one_error_line(err), *found)
    assert _state(engine) == before


def test_a_database_at_a_newer_revision_is_refused(database):
    database.sync_store().close()
    with database.sync_engine().begin() as conn:
        conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '{NEWER}'")
        conn.exec_driver_sql("CREATE TABLE idemstore_added_later (id INTEGER PRIMARY KEY)")
    _refused_everywhere(database, NEWER)


def test_a_version_table_with_the_head_and_another_row_is_refused(database):
    database.sync_store().close()
    with database.sync_engine().begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {VERSION_TABLE} VALUES ('0000_another')")
    _refused_everywhere(database, SCHEMA_REVISION, "0000_another")


def test_an_older_known_revision_says_run_migrate():
    """As when a revision 0002 exists and the database is still at 0001: the gate says to
    migrate, and migrating is allowed."""
    known = (*SCHEMA_REVISIONS, "9999_next")
    with pytest.raises(SchemaNotReadyError) as caught:
        idem_migrate.check_revisions((SCHEMA_REVISION,), "db", known=known)
    assert "run `idemstore migrate`" in str(caught.value)
    assert repr(SCHEMA_REVISION) in str(caught.value) and "'9999_next'" in str(caught.value)
    idem_migrate.check_revisions((SCHEMA_REVISION,), "db", known=known, migrating=True)
    idem_migrate.check_revisions((), "db", known=known, migrating=True)
    idem_migrate.check_revisions(("9999_next",), "db", known=known)


def test_refusing_a_newer_revision_does_not_import_alembic(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    IdempotencyStore.from_url(url, migrate=True).close()
    with sqlite3.connect(tmp_path / "newer.db") as conn:
        conn.execute(f"UPDATE {VERSION_TABLE} SET version_num = '{NEWER}'")
    conn.close()
    code = f"""
import sys
import threading
import time
from idemstore import IdempotencyStore, SchemaNotReadyError
with IdempotencyStore.from_url({url!r}) as store:
    try:
        store.stats()
    except SchemaNotReadyError as error:
        print(error)
print("alembic" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    ).stdout.splitlines()
    assert NEWER in out[0]
    assert out[1] == "False"


# -- 3. no secret is ever printed ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        (
            "postgresql+psycopg://u@h/db?sslpassword=s3cret&sslmode=require",
            "postgresql+psycopg://u@h/db?sslmode=require&sslpassword=***",
        ),
        (
            "postgresql+asyncpg://u:s3cret@h/db?password=s3cret&application_name=app",
            "postgresql+asyncpg://u:***@h/db?application_name=app&password=***",
        ),
        ("postgresql://h/db?PassWord=s3cret", "postgresql://h/db?PassWord=***"),
        ("postgresql://h/db?passfile=s3cret", "postgresql://h/db?passfile=***"),
        ("postgresql://h/db?pwd=s3cret", "postgresql://h/db?pwd=***"),
        ("postgresql://h/db?client_secret=s3cret", "postgresql://h/db?client_secret=***"),
        ("postgresql://h/db?access_token=s3cret", "postgresql://h/db?access_token=***"),
        ("postgresql://h/db?sslkey=s3cret", "postgresql://h/db?sslkey=***"),
        ("postgresql://h/db?api_key=s3cret&api_key=s3cret", "postgresql://h/db?api_key=***"),
        (
            "postgresql://h/db?dsn=host%3Dh+password%3Ds3cret",
            "postgresql://h/db?dsn=***",
        ),
        ("sqlite:///keys.db?password=s3cret", "sqlite:///keys.db?password=***"),
        ("sqlite:////tmp/keys.db", "sqlite:////tmp/keys.db"),
    ],
)
def test_safe_url_masks_every_secret(url, shown):
    assert safe_url(url) == shown
    assert safe_url(make_url(url)) == shown


def test_errors_and_logs_of_the_library_never_hold_a_secret(make_database, caplog):
    pg = make_database("postgresql")
    url = (
        make_url(pg.url)
        .set(password=SECRET, query={"password": SECRET, "sslpassword": SECRET})
        .render_as_string(hide_password=False)
    )
    caplog.set_level(logging.DEBUG)
    with IdempotencyStore.from_url(url, **pg.sync_options()) as store:
        with pytest.raises(SchemaNotReadyError) as caught:
            store.stats()
        assert "password=***" in str(caught.value)
        store.migrate()
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '{NEWER}'")
        with pytest.raises(SchemaNotReadyError) as newer:
            store.migrate()
    for text in (str(caught.value), str(newer.value), caplog.text):
        assert SECRET not in text


def test_the_cli_never_prints_a_secret(tmp_path, make_database):
    """Every error path a user can reach, and the commands that print the URL, with a
    password in the user part and in the query (``-v`` for the log lines too)."""
    empty = make_database("postgresql")  # reachable, no idemstore schema
    newer = make_database("postgresql")
    newer.sync_store().close()
    with newer.sync_engine().begin() as conn:
        conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '{NEWER}'")
    ready = make_database("postgresql")
    base = make_url(empty.url)
    secrets = {"password": SECRET, "sslpassword": SECRET}  # what libpq takes

    def pg(schema: str | None = None, **parts: Any) -> str:
        query = dict(secrets)
        if schema is not None:
            query["options"] = f"-csearch_path={schema}"
        url = base.set(password=SECRET, query=query, **parts)
        return url.render_as_string(hide_password=False)

    export = str(tmp_path / "out.json")
    reached = [  # the URL reaches a database, or a driver's connect
        pg(port=1),  # nothing listens there
        pg(database="idemstore_no_such_database"),
        pg(newer.schema),  # a revision this package does not know
        base.set(password=SECRET, query={**secrets, "sslmode": "bogus"}).render_as_string(
            hide_password=False
        ),
    ]
    refused = [  # the URL is refused before connecting
        f"postgresql://u:{SECRET}@host:port/db?password={SECRET}",  # not a port
        f"postgresql//u:{SECRET}@host/db?password={SECRET}",  # not a URL
        f"sqlite://u:{SECRET}@host/keys.db?password={SECRET}",  # SQLite takes no host
        f"mysql://u:{SECRET}@host/db?password={SECRET}",  # not supported
        f"sqlite:///{tmp_path / 'missing.db'}?password={SECRET}",  # no such file
    ]
    errors = [["-v", "--database-url", url, c] for url in reached for c in ("stats", "migrate")]
    errors += [["-v", "--database-url", url, "stats"] for url in refused]
    for command in (["stats"], ["get", "op", "k"], ["export", export]):
        errors.append(["-v", "--database-url", pg(empty.schema), *command])  # no schema
    for (code, out, err), argv in zip(_cli_all(errors), errors, strict=True):
        assert code == 2, (argv, out, err)
        assert "Traceback" not in err, (argv, err)
        assert SECRET not in out + err, (argv, out, err)

    url = pg(ready.schema)
    shown = []
    for argv in (["migrate"], ["stats"], ["stats", "--json"], ["export", export]):
        done = _cli("-v", "--database-url", url, *argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert SECRET not in done.stdout + done.stderr, (argv, done.stdout, done.stderr)
        shown.append(done.stdout)
    assert "password=***" in shown[0] and "password=***" in shown[1]


# -- 4. commands that only read ------------------------------------------------------------

READ_ONLY_COMMANDS = [["stats"], ["get", "op", "k"], ["export", "exported.json"]]


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=lambda c: c[0])
def test_a_read_only_command_on_a_missing_file_creates_nothing(tmp_path, command):
    path = tmp_path / "typo.db"
    done = _cli("--database-url", f"sqlite:///{path}", *command, cwd=tmp_path)
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert str(path) in line and "idemstore migrate" in line
    assert sorted(os.listdir(tmp_path)) == []


def _foreign_database(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE app_users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO app_users (name) VALUES ('ada')")
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    conn.close()
    return path.read_bytes()


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS, ids=lambda c: c[0])
def test_a_read_only_command_leaves_a_foreign_database_as_it_was(tmp_path, command):
    path = tmp_path / "app.db"
    content = _foreign_database(path)
    done = _cli("--database-url", f"sqlite:///{path}", *command, cwd=tmp_path)
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "has no idemstore schema" in line and "idemstore migrate" in line
    assert sorted(os.listdir(tmp_path)) == ["app.db"]
    assert path.read_bytes() == content
    assert _journal_mode(path) == "delete"


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_read_only_store_reads_and_never_writes(database, flavour):
    with database.sync_store() as writer:
        writer.reserve(TENANT, "op", "k", "owner", "fp")
    path = None
    if database.engine_name == "sqlite":
        path = Path(make_url(database.url).database or "")
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode = DELETE")  # as an operator may have set it
        conn.close()

    def check(record: Any, total: int, write_error: BaseException) -> None:
        assert record is not None and record.key == "k"
        assert total == 1
        assert isinstance(write_error, sa_exc.DBAPIError)
        assert "read" in str(write_error.orig).lower()

    if flavour == "sync":
        with IdempotencyStore.from_url(
            database.url, read_only=True, **database.sync_options()
        ) as store:
            record, total = store.get(TENANT, "op", "k"), store.stats().total
            with pytest.raises(sa_exc.DBAPIError) as caught:
                store.reserve(TENANT, "op", "other", "owner", "fp")
        check(record, total, caught.value)
    else:

        async def use() -> None:
            store = AsyncIdempotencyStore.from_url(
                database.url, read_only=True, **database.async_options()
            )
            try:
                record, total = await store.get(TENANT, "op", "k"), (await store.stats()).total
                with pytest.raises(sa_exc.DBAPIError) as caught:
                    await store.reserve(TENANT, "op", "other", "owner", "fp")
            finally:
                await store.close()
            check(record, total, caught.value)

        asyncio.run(use())
    if path is not None:
        assert _journal_mode(path) == "delete"
    with database.sync_store(migrate=False) as reader:
        assert reader.stats().total == 1  # nothing was written


def test_read_only_with_migrate_is_refused_before_anything_is_opened(tmp_path):
    path = tmp_path / "new.db"
    with pytest.raises(ConfigurationError, match="read_only"):
        IdempotencyStore.from_url(f"sqlite:///{path}", migrate=True, read_only=True)
    assert not path.exists()


def _open_fresh_files_together(directory: str, files: int, barrier: Any) -> int:
    """Open ``files`` fresh SQLite files one after another, all processes at the same file at
    once; how many opens failed (each failure printed)."""
    from idemstore.db.engine import create_engine

    failed = 0
    for n in range(files):
        barrier.wait()
        engine = create_engine(f"sqlite:///{directory}/f{n}.db", busy_timeout_ms=5000)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as error:  # counted and shown by the test
            print(f"f{n}: {error}", flush=True)
            failed += 1
        finally:
            engine.dispose()
    return failed


def test_processes_opening_a_fresh_sqlite_file_at_once_all_get_wal(tmp_path):
    # The first connection switches a fresh file to WAL; SQLite answers another process doing
    # the same at that moment "database is locked" at once, without its busy handler.
    processes, files = 4, 150
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(processes)
    with context.Pool(processes) as pool:
        failed = pool.starmap(
            _open_fresh_files_together, [(str(tmp_path), files, barrier)] * processes
        )
    assert failed == [0] * processes
    for n in range(files):
        with sqlite3.connect(tmp_path / f"f{n}.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()
