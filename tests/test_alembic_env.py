"""Alembic the way Alembic users run it: ``alembic upgrade head`` finds the database where
Alembic users put it (``-x url``, the environment, ``sqlalchemy.url`` in the ini, the
default, in that order), a minimal ini runs idemstore's ``env.py``, and an application with an
Alembic history of its own runs idemstore's revisions from its own ``env.py`` (the README's
recipe, taken from the README and run in a small host application)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa

from idemstore.db.schema import SCHEMA_REVISION, VERSION_TABLE

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
IDEM_TABLES = {"idemstore_records", "idemstore_conflict_fingerprints"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEMSTORE_", "PGOPTIONS"))}
    env.update(extra)
    return env


def _alembic(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=cwd,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _revision(path: Path) -> str | None:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()
    finally:
        engine.dispose()


def test_alembic_url_order_x_argument_environment_ini_default(tmp_path: Path) -> None:
    """The repository's own ``alembic.ini``, with ``sqlalchemy.url`` set in it, run from
    another folder: each source of the URL wins over the ones after it."""
    ini = (REPO / "alembic.ini").read_text(encoding="utf-8")
    (tmp_path / "migrations").symlink_to(REPO / "migrations")
    with_url = ini.replace("[alembic]\n", "[alembic]\nsqlalchemy.url = sqlite:///ini.db\n", 1)
    assert with_url != ini
    (tmp_path / "alembic.ini").write_text(with_url, encoding="utf-8")
    cases = [
        (["-x", "url=sqlite:///x.db"], {"IDEMSTORE_DATABASE_URL": "sqlite:///env.db"}, "x.db"),
        ([], {"IDEMSTORE_DATABASE_URL": "sqlite:///env.db"}, "env.db"),
        ([], {}, "ini.db"),
    ]
    logs = []
    for args, extra, expected in cases:
        logs.append(_alembic(tmp_path, *args, "upgrade", "head", env=_env(**extra)))
        created = sorted(p.name for p in tmp_path.glob("*.db"))
        assert created == [expected], (args, extra, created)
        assert _revision(tmp_path / expected) == SCHEMA_REVISION
        (tmp_path / expected).unlink()
    (tmp_path / "alembic.ini").write_text(ini, encoding="utf-8")
    logs.append(_alembic(tmp_path, "upgrade", "head"))
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["idemstore.db"]
    # Each run says which database it used, and why.
    assert "database sqlite:///x.db (from -x url)" in logs[0]
    assert "database sqlite:///env.db (from $IDEMSTORE_DATABASE_URL)" in logs[1]
    assert "database sqlite:///ini.db (from sqlalchemy.url)" in logs[2]
    assert "database sqlite:///idemstore.db (from the default)" in logs[3]


def test_a_minimal_ini_without_logging_sections_runs(tmp_path: Path) -> None:
    """An ini with only ``script_location`` and ``sqlalchemy.url`` (no ``[loggers]``,
    ``[handlers]`` or ``[formatters]``): env.py leaves logging alone instead of failing in
    ``fileConfig``. (The same ini from an installed wheel, with ``idemstore:migrations``, is in
    ``test_migrations.py::test_migrate_from_a_wheel_in_a_clean_venv``.)"""
    (tmp_path / "alembic.ini").write_text(
        f"[alembic]\nscript_location = {REPO / 'migrations'}\nsqlalchemy.url = sqlite:///m.db\n",
        encoding="utf-8",
    )
    _alembic(tmp_path, "upgrade", "head")
    assert _revision(tmp_path / "m.db") == SCHEMA_REVISION


# -- an application with its own Alembic environment ----------------------------------------


def readme_block(marker: str) -> str:
    """The README's ```python block right after the ``<!-- fragment: ... -->`` line that
    mentions ``marker``."""
    pattern = r"<!-- fragment:[^>]*" + re.escape(marker) + r"[^>]*-->\n```python\n(.*?)```"
    found = re.findall(pattern, README, flags=re.S)
    assert len(found) == 1, f"README has {len(found)} blocks marked with {marker}"
    return str(found[0])


HOST_MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "app_orders"
    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
"""

HOST_REVISION = '''
"""The application's first revision."""
import sqlalchemy as sa
from alembic import op

revision = "app0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("app_orders", sa.Column("id", sa.String(40), primary_key=True))


def downgrade():
    op.drop_table("app_orders")
'''


def _host_app(root: Path, url: str) -> None:
    """An application's Alembic environment: its own ini (with logging sections, as
    ``alembic init`` writes them), the README's env.py, one revision, its models."""
    (root / "myapp").mkdir()
    (root / "myapp" / "__init__.py").write_text("", encoding="utf-8")
    (root / "myapp" / "models.py").write_text(HOST_MODELS, encoding="utf-8")
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(readme_block("test_alembic_env.py"), "utf-8")
    (root / "migrations" / "versions" / "app0001.py").write_text(HOST_REVISION, "utf-8")
    (root / "alembic.ini").write_text(
        textwrap.dedent(
            f"""\
            [alembic]
            script_location = %(here)s/migrations
            prepend_sys_path = .
            sqlalchemy.url = {url}

            [loggers]
            keys = root

            [handlers]
            keys = console

            [formatters]
            keys = generic

            [logger_root]
            level = WARNING
            handlers = console

            [handler_console]
            class = StreamHandler
            args = (sys.stderr,)
            formatter = generic

            [formatter_generic]
            format = %%(levelname)s [%%(name)s] %%(message)s
            """
        ),
        encoding="utf-8",
    )


def _versions(engine: sa.Engine) -> tuple[str | None, str | None]:
    names = set(sa.inspect(engine).get_table_names())
    with engine.connect() as conn:
        app = (
            conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            if "alembic_version" in names
            else None
        )
        idem = (
            conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()
            if VERSION_TABLE in names
            else None
        )
    return app, idem


def test_an_app_runs_idemstore_revisions_from_its_own_env_py(database, tmp_path: Path) -> None:
    """``alembic upgrade head`` of the application runs its revision and idemstore's, each
    history in its own version table; reading commands (``current``, ``check``) leave
    idemstore's schema alone and autogenerate does not see idemstore's tables; a downgrade of
    the application leaves idemstore's tables in place."""
    _host_app(tmp_path, database.url)
    env = _env(PGOPTIONS=f"-csearch_path={database.schema}") if database.schema else _env()
    engine = database.sync_engine()

    out = _alembic(tmp_path, "current", env=env)  # a read: creates nothing of idemstore's
    assert not IDEM_TABLES & set(sa.inspect(engine).get_table_names()), out
    _alembic(tmp_path, "upgrade", "head", env=env)
    assert _versions(engine) == ("app0001", SCHEMA_REVISION)
    assert {"app_orders", *IDEM_TABLES} <= set(sa.inspect(engine).get_table_names())
    # Autogenerate compares the app's models with the app's tables only.
    assert "No new upgrade operations detected" in _alembic(tmp_path, "check", env=env)
    _alembic(tmp_path, "upgrade", "head", env=env)  # again: nothing to do, no error
    assert _versions(engine) == ("app0001", SCHEMA_REVISION)

    _alembic(tmp_path, "downgrade", "base", env=env)
    assert _versions(engine) == (None, SCHEMA_REVISION)
    assert "app_orders" not in sa.inspect(engine).get_table_names()
    assert set(sa.inspect(engine).get_table_names()) >= IDEM_TABLES
