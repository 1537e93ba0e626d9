"""What idemstore uses when not told otherwise: the database URL, SQLite's durability and the
wait for a lock. Plain values, no SQLAlchemy: the command line reads them before it loads the
database layer."""

from __future__ import annotations

import os
from typing import Final

#: The environment variable that names the database when no URL is given.
ENV_VAR: Final = "IDEMSTORE_DATABASE_URL"
#: The database when neither a URL nor the environment names one: SQLite, embedded.
DEFAULT_URL: Final = "sqlite:///idemstore.db"
#: SQLite's ``synchronous`` levels, and the default (as durable as the Rust store's fsyncs).
SQLITE_SYNCHRONOUS: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
DEFAULT_SYNCHRONOUS: Final = "FULL"
#: How long a statement waits for a lock: SQLite's busy timeout, PostgreSQL's lock_timeout.
DEFAULT_BUSY_TIMEOUT_MS: Final = 5000


def url_text(url: str | None = None) -> str:
    """The database URL as text: ``url``, else ``$IDEMSTORE_DATABASE_URL``, else
    :data:`DEFAULT_URL`."""
    return url if url is not None else os.environ.get(ENV_VAR) or DEFAULT_URL


def is_postgresql_text(url: str | None) -> bool:
    """Whether the URL text (see :func:`url_text`) names PostgreSQL, read without parsing it."""
    return url_text(url).split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")
