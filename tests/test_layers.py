"""The layering rule of docs/ARCHITECTURE.md, held against the code: data flows one way, the
store never loads the importer, the command line or the bench, and no module reaches for
another's private names. Static checks read the package's imports; the run-time ones use a
fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "idemstore"
#: The values at the top: they import nothing of the package beyond each other.
VALUES = {"model", "errors", "ids", "rules", "jsonvalue", "defaults", "version"}
WINGS = ("idemstore.transfer", "idemstore.cli", "idemstore.bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module imported, names taken from it)`` for every import in ``path``, absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_values_import_only_each_other() -> None:
    for path in _package_files():
        name = _module_name(path)
        if name.split(".")[-1] not in VALUES or name.count(".") != 1:
            continue
        for module, names in _imports(path):
            if module == "idemstore":  # from . import x
                assert set(names) <= VALUES, f"{name} imports {names}"
            elif module.startswith("idemstore."):
                assert module.split(".")[1] in VALUES, f"{name} imports {module}"


def test_nothing_under_db_imports_transfer_cli_or_bench() -> None:
    for path in _package_files():
        name = _module_name(path)
        if not name.startswith("idemstore.db"):
            continue
        for module, names in _imports(path):
            targets = [module, *(f"{module}.{n}" for n in names)]
            assert not any(t.startswith(WINGS) for t in targets), f"{name} imports {module}"
            assert not module.startswith(("idemstore.store", "idemstore.aio")), name


def test_no_private_name_is_imported_from_another_module() -> None:
    for path in _package_files():
        for module, names in _imports(path):
            if module.startswith("idemstore"):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{_module_name(path)} imports {private} from {module}"


def _loaded(code: str) -> list[str]:
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _json, sys as _sys
        print(_json.dumps(sorted(m for m in _sys.modules if m.startswith("idemstore"))))
        print(_json.dumps("sqlalchemy" in _sys.modules))
        """
    )
    out = (
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()
    )
    modules: list[str] = json.loads(out[-2])
    return modules + (["sqlalchemy"] if json.loads(out[-1]) else [])


def test_a_reservation_loads_no_transfer_cli_or_bench(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    loaded = _loaded(
        f"""
        import asyncio
        from idemstore import AsyncIdempotencyStore, IdempotencyStore, TenantContext

        tenant = TenantContext.local_implicit()
        with IdempotencyStore.from_url({url!r}, migrate=True) as store:
            store.reserve(tenant, "op", "k", "owner", "fp")

        async def main():
            store = AsyncIdempotencyStore.from_url({url!r})
            await store.reserve(tenant, "op", "k2", "owner", "fp")
            await store.close()

        asyncio.run(main())
        """
    )
    assert "idemstore.db.ops" in loaded  # it did run the operations
    assert [m for m in loaded if m.startswith(WINGS)] == []


def test_the_command_line_parses_before_sqlalchemy_loads() -> None:
    loaded = _loaded(
        """
        from idemstore.cli.parser import build_parser

        args = build_parser().parse_args(["--database-url", "sqlite:///x.db", "import", "a.json"])
        assert args.command == "import" and args.files == ["a.json"]
        """
    )
    assert "sqlalchemy" not in loaded
    heavy = [
        m for m in loaded if m.startswith(("idemstore.db.", "idemstore.store", "idemstore.aio"))
    ]
    assert heavy == []
