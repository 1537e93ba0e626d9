"""Bad files and bad arguments on the command line: one line naming what to fix, exit 2, never
a traceback or a hang; and an import never mixes two versions of a file.

The commands run as a user runs them: the installed ``idemstore`` script in a new process.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from idemstore import (
    AsyncIdempotencyStore,
    ConfigurationError,
    FileFormatError,
    IdempotencyStore,
    InvalidInputError,
    TenantContext,
    export_file,
    import_file,
)
from idemstore.bench import datagen
from idemstore.db import bulk, codec, ops
from idemstore.db.codec import record_row
from idemstore.transfer.importer import import_call
from tests.faultkit import (
    ROOT,
    as_ordinary_user,
    max_depth,
    near_recursion_limit,
    nested_text,
    one_line_error,
    run_cli,
)

TENANT = TenantContext.local_implicit()


def _url(db: Path) -> str:
    return f"sqlite:///{db}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "keys.db"
    IdempotencyStore.from_url(_url(path), migrate=True).close()
    return path


def _count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM idemstore_records").fetchone()[0])


# --------------------------------------------------------------------------------------------
# Only regular files are imported, checked before any lock is taken


def test_import_of_a_fifo_returns_at_once(tmp_path: Path, db: Path) -> None:
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    try:
        proc = run_cli("--database-url", _url(db), "import", str(fifo), timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug: it waits for a writer
        pytest.fail("idemstore import of a FIFO did not return")
    line = one_line_error(proc)
    assert str(fifo) in line and "not a regular file (a FIFO)" in line
    assert _count(db) == 0


def test_fifo_is_refused_before_the_write_lock(tmp_path: Path, db: Path) -> None:
    """Another writer holds the lock: the check comes first, so the import neither waits for
    the lock nor makes anyone wait for it."""
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with IdempotencyStore.from_url(_url(db), busy_timeout_ms=100) as store:
            with pytest.raises(FileFormatError) as caught:
                import_file(store, fifo)
            assert "not a regular file" in str(caught.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize(
    ("kind", "path"), [("a directory", None), ("a character device", "/dev/null")]
)
def test_import_of_a_file_that_is_not_regular(
    tmp_path: Path, db: Path, kind: str, path: str | None
) -> None:
    target = path or str(tmp_path)
    line = one_line_error(run_cli("--database-url", _url(db), "import", target, timeout=30))
    assert f"not a regular file ({kind})" in line and target in line


# --------------------------------------------------------------------------------------------
# A file that changes while it is read is refused, nothing written


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("changing") / "keys.json"
    datagen.write_realistic_file(path, 5000)  # 3 batches, and parts for 2 workers
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _replace(path: Path) -> None:
    """Another version of the file, renamed over it (how the Rust store writes it)."""
    other = path.with_name("other.json")
    datagen.write_realistic_file(other, 4000)
    os.replace(other, path)


def _append(path: Path) -> None:
    """The same file written to in place (here: trailing whitespace, still valid JSON)."""
    with open(path, "ab") as f:
        f.write(b"\n\n")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("change", [_replace, _append], ids=["replaced", "rewritten"])
def test_file_changed_while_it_is_read(
    tmp_path: Path, db: Path, keys_file: Path, workers: int, change: Any
) -> None:
    path = _copy(keys_file, tmp_path / "keys.json")
    changed: list[int] = []

    def progress(records: int, done: int, total: int) -> None:
        if not changed:  # after the first batch: the readers are mid-file
            changed.append(records)
            change(path)

    with IdempotencyStore.from_url(_url(db)) as store, pytest.raises(FileFormatError) as caught:
        import_file(store, path, workers=workers, progress=progress)
    assert changed and changed[0] < 5000
    error = caught.value
    assert error.path == str(path) and "changed while it was read" in str(error)
    assert "\n" not in str(error)
    assert _count(db) == 0


def test_file_replaced_before_the_workers_open_it(
    tmp_path: Path, db: Path, keys_file: Path
) -> None:
    """The workers open the file by its path on their own: they must find the file the import
    was started on."""
    path = _copy(keys_file, tmp_path / "keys.json")
    call = import_call(path, workers=2)
    _replace(path)
    with IdempotencyStore.from_url(_url(db)) as store, pytest.raises(FileFormatError) as caught:
        store.run(call)
    assert "changed while it was read" in str(caught.value)
    assert _count(db) == 0


def test_unchanged_file_imports(tmp_path: Path, db: Path, keys_file: Path) -> None:
    with IdempotencyStore.from_url(_url(db)) as store:
        for workers in (0, 2):
            assert import_file(store, keys_file, workers=workers).read == 5000


# --------------------------------------------------------------------------------------------
# Mistakes on the command line: one line, exit 2


def test_export_to_a_path_that_cannot_be_written(tmp_path: Path, db: Path) -> None:
    url = _url(db)
    for target, fix in (
        (tmp_path / "missing" / "out.json", "no such folder"),
        (tmp_path, "it is a directory"),
    ):
        line = one_line_error(run_cli("--database-url", url, "export", str(target)))
        assert str(target) in line and fix in line
    if not as_ordinary_user():  # pragma: no cover
        pytest.skip("cannot run the command bound by file permissions here")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = run_cli("--database-url", url, "export", str(locked / "out.json"), ordinary=True)
    line = one_line_error(proc)
    assert f"cannot write {locked / 'out.json'}: Permission denied" in line
    assert list(locked.iterdir()) == []


def test_negative_workers(db: Path) -> None:
    sample = ROOT / "tests" / "data" / "sample_versioned.json"
    line = one_line_error(
        run_cli("--database-url", _url(db), "import", "--workers", "-1", str(sample))
    )
    assert "workers must be 0 or more" in line


def test_unreadable_big_file(tmp_path: Path, db: Path) -> None:
    """8 MB or more: the command starts parse workers before it opens the database."""
    if not as_ordinary_user():  # pragma: no cover
        pytest.skip("cannot run the command bound by file permissions here")
    big = tmp_path / "big.json"
    datagen.write_realistic_file(big, 7000)
    assert big.stat().st_size >= 8 << 20
    big.chmod(0)
    for workers in ([], ["--workers", "2"], ["--workers", "0"]):
        proc = run_cli("--database-url", _url(db), "import", *workers, str(big), ordinary=True)
        line = one_line_error(proc)
        assert f"{big}: cannot read the file: Permission denied" in line
    assert _count(db) == 0


def _shadow(folder: Path, *modules: str) -> dict[str, str]:
    """PYTHONPATH with packages that cannot be imported, as when they are not installed."""
    for name in modules:
        package = folder / name
        package.mkdir()
        (package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r}'!r}, name={name!r})\n"
        )
    return {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}


def test_postgresql_without_the_extra(tmp_path: Path) -> None:
    env = _shadow(tmp_path, "psycopg", "asyncpg")
    for command in (["migrate"], ["stats"], ["bench", "--quick"]):
        proc = run_cli("--database-url", "postgresql://app:secret@127.0.0.1/x", *command, env=env)
        line = one_line_error(proc)
        assert "pip install 'idemstore[postgresql]'" in line and "secret" not in line


def test_async_store_without_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigurationError) as caught:
        AsyncIdempotencyStore.from_url("postgresql://app@127.0.0.1/x")
    assert "pip install 'idemstore[postgresql]'" in str(caught.value)


@pytest.mark.parametrize(
    "url", ["postgresql://app:secret@[::1/x", "postgresql://app:secret@db:port/x"]
)
def test_malformed_database_url(url: str) -> None:
    for command in (["stats"], ["bench", "--quick"], ["export", "out.json"]):
        line = one_line_error(run_cli("--database-url", url, *command))
        assert "not a database URL" in line and "secret" not in line
    with pytest.raises(ConfigurationError):
        IdempotencyStore.from_url(url)


def test_bench_with_a_database_it_cannot_use(tmp_path: Path) -> None:
    for url, fix in (
        ("postgresql://app:secret@127.0.0.1:1/x", "cannot connect to"),
        ("mysql://app@127.0.0.1/x", "SQLite or PostgreSQL"),
    ):
        line = one_line_error(run_cli("--database-url", url, "bench", "--quick", timeout=60))
        assert fix in line and "secret" not in line
    line = one_line_error(run_cli("bench", "--sections", "nope"))
    assert "unknown bench section(s) nope" in line


# --------------------------------------------------------------------------------------------
# A record stored deeper than the limit (before idemstore checked it) can still be read


def _store_raw_details(store: IdempotencyStore, details_text: str) -> None:
    """Write a record whose details bypass today's checks (as an older version could)."""
    store.reserve(TENANT, "op", "deep", "owner", "fp")
    record = store.get(TENANT, "op", "deep")
    assert record is not None
    row = list(record_row(record))
    at = codec.RECORD_COLUMNS.index("outcome_details")
    row[at - 6 : at + 1] = ["done", 1 - 2**63, None, None, None, None, details_text]
    row[codec.RECORD_COLUMNS.index("status")] = "completed"

    def write(d: Any) -> None:
        bulk.delete_records(d, [record.record_id])
        bulk.insert_rows(d, [(*row, 1)], [])

    store.run(ops.Call("write", write))


def test_deep_record_written_by_an_older_version(tmp_path: Path, db: Path) -> None:
    text = nested_text(900)
    with IdempotencyStore.from_url(_url(db)) as store:
        _store_raw_details(store, text)
        got = near_recursion_limit(lambda: store.get(TENANT, "op", "deep"))
        assert got is not None and got.outcome is not None
        assert isinstance(got.outcome.details, list)  # nested_text(900): a list outside
        with pytest.raises(InvalidInputError) as caught:
            export_file(store, tmp_path / "out.json")
        assert "123" in str(caught.value) and got.record_id in str(caught.value)
        assert not (tmp_path / "out.json").exists()
    proc = run_cli("--database-url", _url(db), "get", "op", "deep")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert max_depth(proc.stdout) == 2 + 900  # the record, its outcome, the details
    line = one_line_error(run_cli("--database-url", _url(db), "export", str(tmp_path / "o.json")))
    assert "123" in line
