"""What importing idemstore costs: the pure modules load without SQLAlchemy, the package's
public names load on first use, and the sync SQLite path leaves Alembic, the ORM, the asyncio
extension and the PostgreSQL dialect alone. Each check runs in a fresh interpreter."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import idemstore

#: Modules that must not load unless the caller asks for what needs them.
HEAVY = (
    "alembic",
    "sqlalchemy.orm",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.dialects.postgresql",
    "idemstore.aio",
    "idemstore.bench",
)


def _loaded_after(code: str, watch: tuple[str, ...]) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of ``watch`` it imported."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json as _json, sys as _sys
        print(_json.dumps(sorted(m for m in {watch!r} if m in _sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    loaded: list[str] = json.loads(out.strip().splitlines()[-1])
    return loaded


def test_pure_modules_import_without_sqlalchemy():
    code = (
        "import idemstore, idemstore.transfer.reader, idemstore.transfer.writer, "
        "idemstore.transfer.rows, idemstore.db.codec, idemstore.rules, idemstore.ids, "
        "idemstore.model, idemstore.errors"
    )
    assert _loaded_after(code, ("sqlalchemy", *HEAVY)) == []


def test_public_names_resolve_lazily():
    assert set(idemstore.__all__) == set(idemstore._SOURCES)
    for name, source in idemstore._SOURCES.items():
        module = importlib.import_module(f"idemstore.{source}")
        assert getattr(idemstore, name) is getattr(module, name)
    assert set(idemstore.__all__) <= set(dir(idemstore))
    assert idemstore.__version__ == "0.1.0"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        idemstore.nope  # noqa: B018


def test_from_idemstore_import_star_gets_every_public_name():
    code = """
        from idemstore import *
        import idemstore
        missing = [n for n in idemstore.__all__ if n not in globals()]
        assert not missing, missing
    """
    assert _loaded_after(code, ()) == []


def test_sync_sqlite_path_leaves_heavy_modules_alone(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with idemstore.IdempotencyStore.from_url(url, migrate=True):
        pass
    path = tmp_path / "keys.json"
    with idemstore.IdempotencyStore.from_url(url) as store:
        idemstore.export_file(store, path)
    code = f"""
        from idemstore import IdempotencyStore, TenantContext, import_file
        from idemstore.cli import main

        with IdempotencyStore.from_url({url!r}) as store:
            store.reserve(TenantContext.local_implicit(), "op", "k", "o", "fp")
            import_file(store, {str(path)!r})
        for argv in (["stats"], ["get", "op", "k"], ["import", {str(path)!r}]):
            assert main(["--database-url", {url!r}, *argv]) == 0
    """
    assert _loaded_after(code, HEAVY) == []


def test_cli_help_leaves_the_bench_alone():
    code = """
        from idemstore.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
    """
    assert _loaded_after(code, HEAVY) == []


def test_dir_lists_the_public_api_only():
    """``dir(idemstore)`` (what a REPL completes and ``help`` shows) is the public API: no
    ``TYPE_CHECKING``, ``annotations``, ``importlib`` or submodules, also after the submodules
    have loaded; ``from idemstore import *`` binds exactly the same names (``__version__``
    aside, which a star import never binds)."""
    code = """
        import json, sys
        import idemstore, idemstore.model, idemstore.db.engine, idemstore.migrate
        idemstore.IdempotencyStore  # a name resolved (and cached) on first use
        before = set(globals())
        exec("from idemstore import *")
        star = sorted(set(globals()) - before - {"before"})
        print(json.dumps({"dir": dir(idemstore), "star": star, "all": idemstore.__all__}))
    """
    script = textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    seen = json.loads(out.strip().splitlines()[0])
    assert seen["dir"] == sorted({*seen["all"], "__version__"})
    assert seen["star"] == sorted(seen["all"])
    assert not {"TYPE_CHECKING", "annotations", "importlib", "model", "db"} & set(seen["dir"])
