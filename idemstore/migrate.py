"""idemstore's schema migrations from code.

``idemstore.migrate.upgrade(connection)``: migrate idemstore's schema on a connection you hold,
inside its transaction. From an application's own Alembic ``env.py``:
``upgrade_with_app(context, connection)`` after its migrations, and
``include_name=exclude_idemstore_tables`` in its ``context.configure`` (the README's
Migrations section). The implementation, with the migration lock and the revision checks, is
:mod:`idemstore.db.migrate`."""

from __future__ import annotations

from .db.migrate import downgrade, exclude_idemstore_tables, upgrade, upgrade_with_app

__all__ = ["downgrade", "exclude_idemstore_tables", "upgrade", "upgrade_with_app"]
