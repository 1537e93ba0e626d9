"""Where the bench writes: fresh SQLite files in a temporary directory beside the configured
database, or fresh PostgreSQL schemas, removed at the end."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from ..aio import AsyncIdempotencyStore
from ..db.engine import resolve_url, safe_url, sync_url
from ..errors import ConfigurationError
from ..store import IdempotencyStore
from .baselines import BareSync, open_bare_sqlite, psycopg_module
from .harness import BenchSettings

# -- databases ---------------------------------------------------------------------------


class Target:
    """Where the bench writes: fresh SQLite files in a temporary directory beside the
    configured database, or fresh PostgreSQL schemas (dropped at the end)."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.url = resolve_url(settings.database_url)
        self.backend = self.url.get_backend_name()
        if self.backend not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"idemstore bench measures SQLite or PostgreSQL, not {self.backend!r}"
            )
        self.sqlite = self.backend == "sqlite"
        self._schemas: list[str] = []
        self.directory: Path | None = None
        if self.sqlite:
            database = self.url.database
            parent = (
                Path(database).resolve().parent if database not in (None, "", ":memory:") else None
            )
            try:
                if parent is not None:
                    parent.mkdir(parents=True, exist_ok=True)
                self.directory = Path(tempfile.mkdtemp(prefix="idemstore-bench-", dir=parent))
            except OSError as error:
                raise ConfigurationError(
                    f"cannot create the bench's files beside {safe_url(self.url)}: "
                    f"{error.strerror or error}"
                ) from None
        else:
            self._check_server()

    def _check_server(self) -> None:
        """Connect once, so that a server that cannot be reached is one line, not a trace."""
        psycopg = psycopg_module()
        try:
            psycopg.connect(self.conninfo(), connect_timeout=10).close()
        except psycopg.Error as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ConfigurationError(f"cannot connect to {safe_url(self.url)}: {reason}") from None

    # SQLite ------------------------------------------------------------------------------

    def sqlite_path(self, name: str) -> str:
        assert self.directory is not None
        return str(self.directory / f"{name}.db")

    # PostgreSQL --------------------------------------------------------------------------

    def conninfo(self) -> str:
        return sync_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def new_schema(self) -> str:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg_module().connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        self._schemas.append(schema)
        return schema

    # both --------------------------------------------------------------------------------

    def database(self, name: str) -> tuple[str, str | None]:
        """A fresh database: (url, schema or None)."""
        if self.sqlite:
            return f"sqlite:///{self.sqlite_path(name)}", None
        return self.url.render_as_string(hide_password=False), self.new_schema()

    def sync_options(self, schema: str | None) -> dict[str, Any]:
        return {} if schema is None else {"connect_args": {"options": f"-csearch_path={schema}"}}

    def async_options(self, schema: str | None) -> dict[str, Any]:
        if schema is None:
            return {}
        return {"connect_args": {"server_settings": {"search_path": schema}}}

    def sync_store(self, url: str, schema: str | None, **options: Any) -> IdempotencyStore:
        return IdempotencyStore.from_url(
            url,
            synchronous=self.settings.synchronous,
            busy_timeout_ms=self.settings.busy_timeout_ms,
            **self.sync_options(schema),
            **options,
        )

    def async_store(self, url: str, schema: str | None, **options: Any) -> AsyncIdempotencyStore:
        return AsyncIdempotencyStore.from_url(
            url,
            synchronous=self.settings.synchronous,
            busy_timeout_ms=self.settings.busy_timeout_ms,
            **self.async_options(schema),
            **options,
        )

    def bare_sync(self, url: str, schema: str | None, dialect: Dialect) -> BareSync:
        if self.sqlite:
            path = make_path(url)
            conn = open_bare_sqlite(path, self.settings.synchronous, self.settings.busy_timeout_ms)
            return BareSync(conn, dialect)
        conn = psycopg_module().connect(self.conninfo(), options=f"-csearch_path={schema}")
        return BareSync(conn, dialect)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._schemas:
            with psycopg_module().connect(self.conninfo(), autocommit=True) as conn:
                for schema in self._schemas:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def make_path(url: str) -> str:
    database = sa.make_url(url).database
    assert database
    return database
