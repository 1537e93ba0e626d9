"""``idemstore.migrate.upgrade(connection)``: migrate idemstore's schema on a connection you
hold, inside its transaction (the README's public path). The implementation, with the
migration lock and the revision checks, is :mod:`idemstore.db.migrate`."""

from __future__ import annotations

from .db.migrate import downgrade, upgrade

__all__ = ["downgrade", "upgrade"]
