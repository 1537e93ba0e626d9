"""Alembic, driven from code.

The migrations live in ``migrations/`` at the top of the repository and travel inside the wheel
as ``idemstore/migrations``. Alembic's ``Config`` is built here, so ``alembic.ini`` needs no URL
and ``idemstore migrate`` / ``store.migrate()`` work from an installed wheel.

Alembic is imported by the functions that use it: opening a store checks the schema revision
with a plain ``SELECT`` (:func:`idemstore.ops.schema_revision`) and never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigurationError
from .schema import VERSION_TABLE

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config


def migrations_dir() -> Path:
    """The migrations folder: inside the installed package, else the repository's."""
    here = Path(__file__).resolve().parent
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
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise ConfigurationError("idemstore's migrations have no head revision")
    return head


def current_revision(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Upgrade the database behind ``connection`` (in its transaction) to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(connection), revision)


def downgrade(connection: sa.Connection, revision: str) -> None:
    """Downgrade the database behind ``connection`` (in its transaction) to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(connection), revision)
