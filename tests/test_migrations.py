"""Alembic owns the schema: round trips, no autogenerate drift, the CLI, and the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from idemstore.db import migrate as idem_migrate
from idemstore.db.schema import SCHEMA_REVISION, VERSION_TABLE, metadata

REPO = Path(__file__).resolve().parent.parent
IDEM_TABLES = {"idemstore_records", "idemstore_conflict_fingerprints"}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_package_revision_is_the_migrations_head():
    assert idem_migrate.head_revision() == SCHEMA_REVISION


def test_upgrade_downgrade_upgrade(database):
    engine = database.sync_engine()
    with engine.begin() as conn:
        idem_migrate.upgrade(conn)
        assert idem_migrate.current_revision(conn) == SCHEMA_REVISION
    assert IDEM_TABLES | {VERSION_TABLE} <= _tables(engine)
    with engine.begin() as conn:
        idem_migrate.downgrade(conn, "base")
        assert idem_migrate.current_revision(conn) is None
    assert not (IDEM_TABLES & _tables(engine))
    with engine.begin() as conn:
        idem_migrate.upgrade(conn)
    assert _tables(engine) >= IDEM_TABLES


def test_models_match_the_migrations(database):
    engine = database.sync_engine()
    with engine.begin() as conn:
        idem_migrate.upgrade(conn)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, type_, parent: (
                    type_ != "table"
                    or ((name or "").startswith("idemstore_") and name != VERSION_TABLE)
                ),
            },
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_version_table_lives_beside_an_apps_alembic_history(database):
    engine = database.sync_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('app_rev_1')")
        idem_migrate.upgrade(conn)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == (
            "app_rev_1"
        )
        assert conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar() == (
            SCHEMA_REVISION
        )


def _env(database, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMSTORE_")}
    env.update(extra)
    if database.schema is not None:  # PostgreSQL: the test's own schema
        env["PGOPTIONS"] = f"-csearch_path={database.schema}"
    return env


def test_alembic_upgrade_head_from_the_repo_root(database):
    env = _env(database, IDEMSTORE_DATABASE_URL=database.url)
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert _tables(database.sync_engine()) >= IDEM_TABLES
    out = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={database.url}", "current"],
        cwd=REPO,
        env=_env(database),
        check=True,
        capture_output=True,
        text=True,
    )
    assert SCHEMA_REVISION in out.stdout


def test_idemstore_migrate_command(database):
    env = _env(database)
    out = subprocess.run(
        [sys.executable, "-m", "idemstore", "--database-url", database.url, "migrate"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"created the idemstore schema at {SCHEMA_REVISION}" in out.stdout
    assert _tables(database.sync_engine()) >= IDEM_TABLES


def test_migrate_from_a_wheel_in_a_clean_venv(tmp_path):
    """The migrations travel inside the wheel: build it, install it in a new virtual
    environment, run ``idemstore migrate`` away from the repository."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("idemstore-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEMSTORE_", "PYTHON"))}
    where = subprocess.run(
        [str(python), "-c", "import idemstore.db.migrate as m; print(m.migrations_dir())"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where.startswith(str(env_dir)), where
    db = workdir / "fresh.db"
    subprocess.run(
        [str(env_dir / "bin" / "idemstore"), "--database-url", f"sqlite:///{db}", "migrate"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
    )
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        assert _tables(engine) >= IDEM_TABLES
    finally:
        engine.dispose()
    # Alembic itself, with the minimal ini the README shows (no logging sections).
    (workdir / "alembic.ini").write_text(
        "[alembic]\nscript_location = idemstore:migrations\nsqlalchemy.url = sqlite:///a.db\n",
        encoding="utf-8",
    )
    subprocess.run(
        [str(env_dir / "bin" / "alembic"), "upgrade", "head"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
    )
    engine = sa.create_engine(f"sqlite:///{workdir / 'a.db'}")
    try:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()
        assert found == SCHEMA_REVISION
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", [["stats"], ["get", "op", "k"]])
def test_cli_refuses_an_unmigrated_database(tmp_path, command):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "idemstore",
            "--database-url",
            f"sqlite:///{tmp_path}/x.db",
            *command,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "run `idemstore migrate`" in out.stderr
