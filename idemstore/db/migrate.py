"""Alembic, driven from code; the rules for the revision a database is at; the schema gate.

The migrations live in ``migrations/`` at the top of the repository and travel inside the wheel
as ``idemstore/migrations``. Alembic's ``Config`` is built here, so ``alembic.ini`` needs no URL
and ``idemstore migrate`` / ``store.migrate()`` work from an installed wheel.

Alembic is imported by the functions that use it: opening a store checks the schema revision
(:class:`SchemaGate`) with a plain ``SELECT`` (:func:`idemstore.db.ops.schema_revisions`)
against :data:`~idemstore.db.schema.SCHEMA_REVISIONS` (:func:`check_revisions`) and never needs
it.

Many instances may migrate one database at once: each upgrade runs in one transaction that
first takes :func:`lock_for_migration` (PostgreSQL: an advisory lock; SQLite: the write lock,
``BEGIN IMMEDIATE``), so the others wait, then find the schema at head and do nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..errors import ConfigurationError, SchemaNotReadyError
from ..version import __version__
from . import ops
from .driver import translated_errors
from .engine import safe_url, sqlite_file
from .runner import run_owned
from .schema import SCHEMA_REVISIONS, VERSION_TABLE

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

logger = logging.getLogger("idemstore")

#: First key of the PostgreSQL advisory lock around migrations ("idms"); the second is a hash
#: of the schema migrated, so that schemas of one database migrate independently.
MIGRATION_LOCK_KEY: Final = 0x69646D73


def migrations_dir() -> Path:
    """The migrations folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent.parent  # the idemstore package
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigurationError(f"idemstore's migrations are not found beside {here}")


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic ``Config`` for idemstore's migrations, optionally bound to ``connection``
    (``env.py`` then runs on it, inside its transaction)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The head of ``migrations/`` as Alembic reads it (a test keeps it equal to
    :data:`~idemstore.db.schema.SCHEMA_REVISION`)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise ConfigurationError("idemstore's migrations have no head revision")
    return head


def current_revisions(connection: sa.Connection) -> tuple[str, ...]:
    """Every row of idemstore's version table, sorted (none when it is missing or empty)."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(sorted(context.get_current_heads()))


def current_revision(connection: sa.Connection) -> str | None:
    """The revision the database is at; None before the first migration. Raises
    :class:`SchemaNotReadyError` when the version table holds more than one row."""
    found = current_revisions(connection)
    if len(found) > 1:
        check_revisions(found, safe_url(connection.engine.url), migrating=True)
    return found[0] if found else None


def check_revisions(
    found: Sequence[str],
    where: str,
    *,
    migrating: bool = False,
    known: Sequence[str] = SCHEMA_REVISIONS,
) -> None:
    """Whether the version-table rows ``found`` are a state this package can work with.

    ``migrating=False`` (a store): exactly the head, the last of ``known``.
    ``migrating=True`` (before an upgrade): no row, or one revision of ``known``.

    ``where`` names the database in the message (render it with
    :func:`~idemstore.db.engine.safe_url`). Raises :class:`SchemaNotReadyError` with one line
    naming the revisions found and the one this package needs: an older known revision or
    no schema says to run ``idemstore migrate``; an unknown (newer) revision, or more than
    one row, says what to do instead, since migrating cannot help.
    """
    head = known[-1]
    refused = "; nothing was migrated" if migrating else ""
    if len(found) > 1:
        listed = ", ".join(repr(revision) for revision in found)
        raise SchemaNotReadyError(
            f"database {where} has {len(found)} rows in idemstore's version table "
            f"{VERSION_TABLE} ({listed}); this idemstore ({__version__}) needs one, "
            f"{head!r}: delete the rows of the revisions its schema is not at{refused}"
        )
    if found and found[0] not in known:
        raise SchemaNotReadyError(
            f"database {where} is at idemstore schema revision {found[0]!r}, which this "
            f"idemstore ({__version__}) does not know (it needs {head!r}): a newer idemstore "
            f"migrated it; use that version{refused}"
        )
    if migrating or tuple(found) == (head,):
        return
    state = f"is at idemstore schema revision {found[0]!r}" if found else "has no idemstore schema"
    raise SchemaNotReadyError(
        f"database {where} {state}; this idemstore needs revision {head!r}: run "
        "`idemstore migrate` (or `alembic upgrade head`, or open the store with migrate=True)"
    )


def lock_for_migration(connection: sa.Connection) -> None:
    """Make the migration about to run on ``connection`` (in its transaction) the only one
    on its database until that transaction ends. Call it before anything reads the version
    table; calling it again in the same transaction does nothing more.

    PostgreSQL: ``pg_advisory_xact_lock`` keyed on idemstore and the current schema (other
    instances wait for this transaction to end, however long it takes, whatever the
    connection's ``lock_timeout``, which applies again to the DDL after). SQLite: the write
    lock, taken with ``BEGIN IMMEDIATE`` unless the connection's transaction has begun at the
    driver already (idemstore's engines begin every transaction that way).
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        # Another instance's migration may take longer than the connection's lock_timeout
        # (idemstore's engines set it to busy_timeout_ms): wait for it without limit, then
        # put the setting back for the DDL, which should not queue the app's traffic for long.
        (previous,) = connection.exec_driver_sql("SHOW lock_timeout").one()
        connection.exec_driver_sql("SELECT set_config('lock_timeout', '0', true)")
        connection.exec_driver_sql(
            f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY}, "
            "hashtext(coalesce(current_schema(), '')))"
        )
        connection.execute(
            sa.text("SELECT set_config('lock_timeout', :previous, true)"),
            {"previous": str(previous)},
        )
    elif dialect == "sqlite":
        driver_connection = connection.connection.driver_connection
        if not getattr(driver_connection, "in_transaction", True):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def _prepare(connection: sa.Connection) -> str | None:
    """Take the migration lock, check the version table; the revision found (None: none)."""
    lock_for_migration(connection)
    found = current_revisions(connection)
    check_revisions(found, safe_url(connection.engine.url), migrating=True)
    return found[0] if found else None


@contextlib.contextmanager
def _outer_alembic_kept() -> Iterator[None]:
    """Keep an Alembic run that is already going on (an application's ``env.py`` calling
    :func:`upgrade`) working after idemstore's run nested in it.

    Alembic publishes the running environment and operations as module globals
    (``alembic.context``, ``alembic.op``); a nested run removes them when it ends, and the
    outer one then fails as it ends (``KeyError: 'config'``). They are put back here."""
    from alembic import context as environment_module
    from alembic import op as operations_module

    modules = (environment_module, operations_module)
    outer: list[tuple[Any, Any]] = [(m, vars(m).get("_proxy")) for m in modules]
    try:
        yield
    finally:
        for module, proxy in outer:
            if proxy is not None and vars(module).get("_proxy") is not proxy:
                proxy._install_proxy()


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Upgrade the database behind ``connection`` (in its transaction) to ``revision``.

    Safe to run from many instances at once (:func:`lock_for_migration`), and from an
    application's own Alembic ``env.py`` (see :func:`upgrade_with_app`). Raises
    :class:`SchemaNotReadyError`, changing nothing, when the database is at a revision this
    package does not know or its version table has more than one row."""
    _upgrade(connection, revision)


def _upgrade(connection: sa.Connection, revision: str) -> str | None:
    """:func:`upgrade`; the revision the database was at before (None: no schema)."""
    from alembic import command

    before = _prepare(connection)
    with _outer_alembic_kept():
        command.upgrade(alembic_config(connection), revision)
    return before


def downgrade(connection: sa.Connection, revision: str) -> None:
    """Downgrade the database behind ``connection`` (in its transaction) to ``revision``
    (under the same lock and checks as :func:`upgrade`)."""
    from alembic import command

    _prepare(connection)
    with _outer_alembic_kept():
        command.downgrade(alembic_config(connection), revision)


def upgrade_with_app(context: EnvironmentContext | ModuleType, connection: sa.Connection) -> bool:
    """From an application's own Alembic ``env.py``, after its ``context.run_migrations()``:
    when the command is an upgrade (``alembic upgrade ...``, or ``command.upgrade`` from
    code), upgrade idemstore's schema to its head on the same ``connection``, with
    idemstore's own version table: in the application's transaction when one is open (with
    transactional DDL, as on PostgreSQL, Alembic keeps one open), else in one of its own.
    Other commands (``current``, ``check``, ``revision --autogenerate``, ``downgrade``,
    ``stamp``) and offline (``--sql``) runs leave idemstore's schema alone.

    ``context``: ``alembic.context`` as ``env.py`` has it, configured. Returns whether it
    upgraded. Raises :class:`SchemaNotReadyError` as :func:`upgrade` does."""
    if context.is_offline_mode():
        return False
    # The function Alembic's command gave the environment: ``upgrade`` for an upgrade.
    command = context.get_context().opts.get("fn")
    if getattr(command, "__name__", None) != "upgrade":
        return False
    if connection.in_transaction():
        upgrade(connection)  # the application's transaction commits it
    else:
        # Alembic commits each step itself where DDL is not transactional (SQLite): nothing
        # would commit this one.
        with connection.begin():
            upgrade(connection)
    return True


def exclude_idemstore_tables(name: str | None, type_: str, parent_names: Any) -> bool:
    """An ``include_name`` hook for an application's ``context.configure(...)``: its
    autogenerate (``alembic revision --autogenerate``, ``alembic check``) then leaves
    idemstore's tables and version table alone, which its own migrations manage. Returns
    False for them, True for every other name."""
    return not (type_ == "table" and (name or "").startswith("idemstore_"))


def migrate_engine(engine: sa.Engine) -> tuple[str | None, str | None]:
    """Upgrade ``engine``'s database to idemstore's head revision, in one transaction.
    Returns the revision it was at before (None: it had no idemstore schema) and the one it
    is at after, both read under the migration lock (another instance may have migrated it
    first: then both are the head)."""
    with engine.begin() as connection:
        before = _upgrade(connection, "head")
        return before, current_revision(connection)


@dataclass(frozen=True, slots=True)
class Revision:
    """One of idemstore's schema revisions, as ``migrations/versions`` has it."""

    revision: str
    #: The first line of its docstring.
    message: str
    #: Whether the database has it (its revision is this one or a later one).
    applied: bool


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's idemstore schema is (:func:`schema_status`)."""

    #: The database, as it may be printed.
    database: str
    #: The rows of the version table: none before the first migration, one normally.
    current: tuple[str, ...]
    #: The revision this idemstore needs.
    head: str
    #: Every revision this idemstore knows, the first (base) first.
    history: tuple[Revision, ...]
    #: For a SQLite file that does not exist: its path (nothing was created).
    missing_file: str | None = None

    @property
    def at_head(self) -> bool:
        """Whether the database is at the head (the store can open it)."""
        return self.current == (self.head,)


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def schema_status(engine: sa.Engine) -> SchemaStatus:
    """The revision ``engine``'s database is at, the head, and the history, read without
    writing anything (open the engine read-only): a SQLite file that does not exist is
    reported, not created. A revision this idemstore does not know is listed as current, and
    none of the history counts as applied below it."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = head_revision()
    path = sqlite_file(engine.url)
    missing = os.path.abspath(path) if path is not None and not os.path.exists(path) else None
    current: tuple[str, ...] = ()
    if missing is None:
        with translated_errors(engine.dialect, None), engine.connect() as connection:
            current = current_revisions(connection)
    applied: set[str] = set()
    known = {s.revision for s in script.walk_revisions()}
    for revision in current:
        if revision in known:
            applied.update(s.revision for s in script.iterate_revisions(revision, "base"))
    history = tuple(
        Revision(s.revision, _first_line(s.doc), s.revision in applied)
        for s in reversed(list(script.walk_revisions()))
    )
    return SchemaStatus(safe_url(engine.url), current, head, history, missing)


class SchemaGate:
    """Checks once per store that the database is at the revision this package needs
    (:func:`check_revisions`), with one plain ``SELECT`` of the version
    table: no Alembic, nothing written, and a missing SQLite file is reported, not created."""

    def __init__(self) -> None:
        self._ready = False

    @property
    def ready(self) -> bool:
        """Whether the schema was found (or made) ready."""
        return self._ready

    def mark_ready(self) -> None:
        """Record that the schema is at head (after a migration)."""
        self._ready = True

    def check(self, engine: sa.Engine, busy_timeout_ms: int | None) -> None:
        """Raise :class:`SchemaNotReadyError` (one line) unless ``engine``'s database is at
        head; a database that cannot be reached raises the driver's error."""
        # Idempotent and cheap, so racing first calls may both run it: no lock (a thread lock
        # would block the event loop under the async store's greenlet bridge).
        if self._ready:
            return
        where = safe_url(engine.url)
        path = sqlite_file(engine.url)
        if path is not None and not os.path.exists(path):
            # Connecting would create an empty database there (or fail, read-only).
            raise SchemaNotReadyError(
                f"database {where} has no idemstore schema: its file {os.path.abspath(path)} "
                "does not exist; run `idemstore migrate` to create it (or open the store with "
                "migrate=True), or check the URL"
            )
        # Connect first, so that a database that can't be reached is reported as such...
        with translated_errors(engine.dialect, busy_timeout_ms):
            engine.raw_connection().close()
        try:
            found = run_owned(engine, ops.schema_revisions(), busy_timeout_ms)
        except sa_exc.DBAPIError as error:  # ...and a failing statement as no version table.
            logger.debug("schema check failed on %s: %s", where, error)
            found = ()
        check_revisions(found, where)
        self._ready = True
