"""Alembic environment for idemstore.

The connection comes from ``config.attributes["connection"]`` when idemstore (or an
application's own env.py, through :func:`idemstore.migrate.upgrade`) runs the migrations on a
connection it holds (Alembic cookbook). Otherwise the URL is, in this order: ``-x url=...``,
``$IDEMSTORE_DATABASE_URL``, ``sqlalchemy.url`` in the ini, ``sqlite:///idemstore.db``; the
one used is logged with where it came from (password masked). Async URLs run through
``AsyncConnection.run_sync``. Only idemstore's tables are compared by autogenerate, so the
schema can live beside an application's own.

The ini's logging sections configure logging when the ini has them; a minimal ini
(``script_location = idemstore:migrations`` and a URL) leaves logging as it is.

Every run takes idemstore's migration lock in its transaction before Alembic reads the version
table (:func:`idemstore.db.migrate.lock_for_migration`), so that ``alembic upgrade head`` from
many instances at once is safe too.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
from typing import Any

import sqlalchemy as sa
from alembic import context

from idemstore.db.engine import create_async_engine, create_engine, resolve_url, safe_url
from idemstore.db.migrate import lock_for_migration
from idemstore.db.schema import VERSION_TABLE, metadata
from idemstore.defaults import DEFAULT_URL, ENV_VAR

logger = logging.getLogger("idemstore")
config = context.config
LOGGING_SECTIONS = ("loggers", "handlers", "formatters")
if (
    config.config_file_name is not None
    and config.attributes.get("connection") is None
    and all(config.file_config.has_section(name) for name in LOGGING_SECTIONS)
):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "table":
        return name is not None and name.startswith("idemstore_") and name != VERSION_TABLE
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        render_as_batch=True,
        **kwargs,
    )


def _url() -> sa.URL:
    """The database: ``-x url=...``, else ``$IDEMSTORE_DATABASE_URL``, else ``sqlalchemy.url``
    in the ini, else idemstore's default."""
    given = context.get_x_argument(as_dictionary=True).get("url")
    source = "-x url"
    if given is None and os.environ.get(ENV_VAR):
        given, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    if given is None:
        given, source = config.get_main_option("sqlalchemy.url") or None, "sqlalchemy.url"
    if given is None:
        given, source = DEFAULT_URL, "the default"
    url = resolve_url(given)
    logger.info("database %s (from %s)", safe_url(url), source)
    return url


def run_on(connection: sa.Connection) -> None:
    lock_for_migration(connection)
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: sa.URL) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = _url()
    if url.get_dialect().is_async:
        asyncio.run(_run_async(url))
        return
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            run_on(conn)
    finally:
        engine.dispose()


def run_offline() -> None:
    _configure(url=_url().render_as_string(hide_password=False), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
