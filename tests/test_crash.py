"""Crash proof: a writer process is SIGKILLed at random points, again and again.

The writer (``proof_worker.py crash``) reserves new keys, makes every other one conflict and
completes it, and prints each step only after the call returned (``R``/``C``/``D key``); on
SQLite also an async writer with group commit, whose tasks write at once and share
transactions (each task its own keys). After each kill the next writer reopens the database
and must make progress. At the end:

- SQLite: ``PRAGMA integrity_check`` is ``ok`` (after every kill too) and
  ``foreign_key_check`` is empty;
- every acknowledged step is in the database: reserved keys exist with their fingerprint,
  conflicted ones have the conflict counted and its fingerprint listed, completed ones are
  completed; each writer (each task) holds exactly its acknowledged keys, plus at most the
  one in flight;
- the store still works (a reservation after the last kill).

A SIGKILL loses the process, not the OS page cache: this proves atomicity and
acknowledge-after-commit, not the fsync settings (``synchronous=FULL`` is the default the
writer runs with). ``IDEMSTORE_PROOF_SCALE`` multiplies the number of kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from idemstore import RecordStatus, Reserved
from tests.conftest import Database
from tests.proof_worker import OPERATION, TENANT
from tests.test_concurrency import worker_command, worker_env

SCALE = float(os.environ.get("IDEMSTORE_PROOF_SCALE", "1"))
KILLS = {"sqlite": max(10, int(10 * SCALE)), "postgresql": max(4, int(5 * SCALE))}


def start_writer(db: Database, run: int, group: bool) -> subprocess.Popen[str]:
    job = {"action": "crash", "url": db.url, "schema": db.schema, "run": run, "group": group}
    return subprocess.Popen(
        worker_command(job),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )


def sqlite_path(db: Database) -> str:
    database = sa.make_url(db.url).database
    assert database
    return database


def sqlite_checks(db: Database) -> None:
    with sqlite3.connect(sqlite_path(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def kill_writers(
    db: Database, kills: int, rng: random.Random, group: bool = False
) -> dict[str, dict[int, set[str]]]:
    """Run ``kills`` writers one after another, each SIGKILLed at a random point after its
    first acknowledged step. Returns acknowledged keys: {"R"|"C"|"D": {run: keys}}."""
    acked: dict[str, dict[int, set[str]]] = {kind: defaultdict(set) for kind in "RCD"}
    upcoming = start_writer(db, 0, group)
    try:
        for run in range(kills):
            proc = upcoming
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
            proc.stdin.write("go\n")
            proc.stdin.flush()
            # the next writer imports while this one writes (it opens nothing before "go")
            upcoming = start_writer(db, run + 1, group)
            first = proc.stdout.readline()
            assert first.startswith("R "), f"run {run} made no progress: {first!r}"
            time.sleep(rng.uniform(0.0, 0.25))
            assert proc.poll() is None, f"writer died on its own: {proc.communicate()[1]}"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
            # read through the same buffered stream as readline (communicate() would read the
            # pipe underneath and miss what readline had already buffered)
            out = proc.stdout.read()
            proc.stdin.close()
            proc.stdout.close()
            proc.stderr.close()  # type: ignore[union-attr]
            for line in (first + out).splitlines(keepends=True):
                if line.endswith("\n"):  # a torn last line is not an acknowledgement
                    kind, key = line.split()
                    acked[kind][run].add(key)
            if db.engine_name == "sqlite":
                sqlite_checks(db)
    finally:
        upcoming.kill()
        upcoming.communicate()
    return acked


def stored_keys(db: Database) -> set[str]:
    engine = db.sync_engine(poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        return {row[0] for row in conn.exec_driver_sql("SELECT key FROM idemstore_records")}


@pytest.mark.parametrize(
    ("engine_name", "group"),
    [("sqlite", False), ("sqlite", True), ("postgresql", False)],
    ids=["sqlite", "sqlite-group-commit", "postgresql"],
)
def test_sigkilled_writers_lose_no_acknowledged_write(
    engine_name: str, group: bool, make_database: Callable[[str], Database]
) -> None:
    db = make_database(engine_name)
    store = db.sync_store()  # migrates
    kills = KILLS[engine_name]
    seed = int(os.environ.get("IDEMSTORE_PROOF_SEED") or random.randrange(2**32))
    print(f"IDEMSTORE_PROOF_SEED={seed}")  # shown when the test fails
    acked = kill_writers(db, kills, random.Random(seed), group)

    if engine_name == "sqlite":
        sqlite_checks(db)
    reserved = {run: keys for run, keys in acked["R"].items()}
    assert len(reserved) == kills  # every writer reopened the store and went on
    for key in set().union(*acked["R"].values()):
        record = store.get(TENANT, OPERATION, key)
        assert record is not None, key
        assert record.request_fingerprint == "fp-a"
    for key in set().union(*acked["C"].values()):
        record = store.get(TENANT, OPERATION, key)
        assert record is not None and record.conflict_count == 1, key
        assert record.conflict_fingerprints == ("fp-b",)
    for key in set().union(*acked["D"].values()):
        record = store.get(TENANT, OPERATION, key)
        assert record is not None and record.status is RecordStatus.COMPLETED, key

    # each writer (run, or task of a run): exactly its acknowledged keys, plus at most the
    # one in flight when killed
    def by_writer(keys: set[str]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = defaultdict(set)
        for key in keys:
            found[key.rsplit("-", 1)[0]].add(key)
        return found

    stored = by_writer(stored_keys(db))
    acknowledged = by_writer(set().union(*reserved.values()))
    assert set(acknowledged) <= set(stored)
    for writer in stored:
        mine = acknowledged.get(writer, set())
        assert mine == {f"{writer}-{i}" for i in range(len(mine))}, writer
        extra = stored[writer] - mine
        assert extra <= {f"{writer}-{len(mine)}"}, (writer, extra)

    assert isinstance(store.reserve(TENANT, OPERATION, "after", "me", "fp"), Reserved)
    store.close()
    counts = {kind: sum(map(len, runs.values())) for kind, runs in acked.items()}
    print(json.dumps({"kills": kills, "acknowledged": counts}))
