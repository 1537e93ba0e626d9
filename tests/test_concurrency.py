"""Concurrency proof: real processes (one SQLite file, one PostgreSQL schema) and hundreds of
asyncio tasks on one ``AsyncIdempotencyStore`` race on a few shared keys.

Reservations, per key (no expiry here, so one generation): exactly one ``Reserved``; every
``Duplicate`` has the reserving fingerprint and every ``Conflict`` another one; the number of
``Conflict`` results equals the stored ``conflict_count``, and the counts they returned are
exactly 1..n (each conflict was counted once, none lost); the stored conflict fingerprints
have no duplicates, are the set of conflicting fingerprints seen, and every ``Conflict`` saw
a prefix of them (first-seen order holds). No error, no ``LockTimeoutError`` on SQLite.

The async race runs with group commit too (SQLite): the racing calls then share
transactions, each in its savepoint, with the same answers.

Release against complete, per reserved key: exactly one side wins. Either one release
returned True, every complete returned None and the key is gone; or every complete returned
the record, every release returned False and the key is stored completed.

``IDEMSTORE_PROOF_SCALE`` (default 1) multiplies processes' work and the number of tasks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import idemstore
from idemstore import IdempotencyRecord, Outcome, RecordStatus, Reserved
from tests.conftest import ENGINES, Database
from tests.proof_worker import OPERATION, OTHER_ACTOR, TENANT, reservation_row

SCALE = float(os.environ.get("IDEMSTORE_PROOF_SCALE", "1"))
PROCESSES = max(8, int(8 * SCALE))
RESERVES_PER_PROCESS = max(10, int(40 * SCALE))
TASKS = max(200, int(256 * SCALE))
RACE_KEYS = max(10, int(30 * SCALE))
KEYS = [f"shared-{i}" for i in range(4)]
FINGERPRINTS = ["fp-a", "fp-b", "fp-c"]

WORKER = Path(__file__).with_name("proof_worker.py")
ROOT = Path(idemstore.__file__).resolve().parent.parent


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def worker_command(job: Mapping[str, Any]) -> list[str]:
    return [sys.executable, str(WORKER), json.dumps(job)]


def db_job(db: Database, **job: Any) -> dict[str, Any]:
    return {"url": db.url, "schema": db.schema, **job}


def run_workers(
    jobs: Sequence[Mapping[str, Any]], timeout: float = 120
) -> list[list[dict[str, Any]]]:
    """Start every worker; for each phase wait until all are ready, say go, collect their
    JSON results. Returns results[phase][worker]."""
    procs = [
        subprocess.Popen(
            worker_command(job),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=worker_env(),
        )
        for job in jobs
    ]
    try:
        results = []
        for _ in jobs[0]["phases"]:
            for proc in procs:
                assert proc.stdout is not None and proc.stderr is not None
                line = proc.stdout.readline()
                assert line.strip() == "ready", f"worker failed: {line}{proc.stderr.read()}"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            results.append([json.loads(proc.stdout.readline()) for proc in procs])  # type: ignore[union-attr]
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def check_reservations(
    rows: Sequence[Mapping[str, Any]], stored: Mapping[str, IdempotencyRecord | None]
) -> dict[str, int]:
    """The reservation invariants (module docstring); returns conflicts per key."""
    by_key: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_key[row["key"]].append(row)
    conflicts_per_key = {}
    for key, key_rows in by_key.items():
        record = stored[key]
        assert record is not None, key
        reserved = [r for r in key_rows if r["kind"] == "reserved"]
        assert len(reserved) == 1, (key, reserved)
        owner_fingerprint = reserved[0]["fingerprint"]
        assert record.request_fingerprint == owner_fingerprint
        for row in key_rows:
            assert row["request_fingerprint"] == owner_fingerprint
            if row["kind"] == "duplicate":
                assert row["fingerprint"] == owner_fingerprint
        conflicts = [r for r in key_rows if r["kind"] == "conflict"]
        assert all(r["fingerprint"] != owner_fingerprint for r in conflicts)
        assert record.conflict_count == len(conflicts)
        assert sorted(r["conflict_count"] for r in conflicts) == list(range(1, len(conflicts) + 1))
        stored_fingerprints = list(record.conflict_fingerprints)
        assert len(set(stored_fingerprints)) == len(stored_fingerprints)
        assert set(stored_fingerprints) == {r["fingerprint"] for r in conflicts}
        for row in conflicts:
            seen = row["conflict_fingerprints"]
            assert row["fingerprint"] in seen
            assert seen == stored_fingerprints[: len(seen)]
        expected_status = RecordStatus.CONFLICTED if conflicts else RecordStatus.RESERVED
        assert record.status is expected_status
        conflicts_per_key[key] = len(conflicts)
    return conflicts_per_key


def check_release_complete_race(
    keys: Sequence[str],
    releases: Mapping[str, Sequence[bool]],
    completes: Mapping[str, Sequence[str | None]],
    stored: Mapping[str, IdempotencyRecord | None],
) -> tuple[int, int]:
    """Exactly one of release and complete wins each key; returns (released, completed)."""
    released = completed = 0
    for key in keys:
        release_won = sum(releases[key])
        complete_results = completes[key]
        assert release_won <= 1, key
        if release_won:
            assert all(status is None for status in complete_results), key
            assert stored[key] is None, key
            released += 1
        else:
            assert all(status == "completed" for status in complete_results), key
            record = stored[key]
            assert record is not None and record.status is RecordStatus.COMPLETED, key
            assert record.outcome is not None and record.outcome.details == {"k": key}
            completed += 1
    return released, completed


@pytest.mark.parametrize("engine_name", ENGINES)
def test_processes_race(engine_name: str, make_database: Callable[[str], Database]) -> None:
    """Phase 1: reservations on shared keys. Phase 2: release against complete."""
    db = make_database(engine_name)
    store = db.sync_store()
    race_keys = [f"race-{i}" for i in range(RACE_KEYS)]
    for key in race_keys:
        assert isinstance(store.reserve(TENANT, OPERATION, key, "owner", "fp-a"), Reserved)
    roles = ["release", "complete"] * (PROCESSES // 2) + ["complete"] * (PROCESSES % 2)
    hammer = {"action": "hammer", "count": RESERVES_PER_PROCESS}
    race = {"action": "race", "keys": race_keys, "fingerprint": "fp-a"}
    jobs = [
        db_job(
            db,
            phases=[
                {**hammer, "seed": i, "keys": KEYS, "fingerprints": FINGERPRINTS},
                {**race, "seed": i, "role": role, "name": f"w{i}"},
            ],
        )
        for i, role in enumerate(roles)
    ]
    hammer_results, race_results = run_workers(jobs)
    errors = [error for result in hammer_results + race_results for error in result["errors"]]
    assert errors == []

    rows = [row for result in hammer_results for row in result["rows"]]
    assert len(rows) == PROCESSES * RESERVES_PER_PROCESS
    stored = {key: store.get(TENANT, OPERATION, key) for key in KEYS}
    conflicts = check_reservations(rows, stored)
    assert sum(conflicts.values()) > 0  # the race had conflicts to count

    releases: dict[str, list[bool]] = defaultdict(list)
    completes: dict[str, list[str | None]] = defaultdict(list)
    for role, result in zip(roles, race_results, strict=True):
        target = releases if role == "release" else completes
        for key, value in result["rows"]:
            target[key].append(value)
    stored = {key: store.get(TENANT, OPERATION, key) for key in race_keys}
    released, completed = check_release_complete_race(race_keys, releases, completes, stored)
    assert released + completed == len(race_keys)
    assert store.stats().total == len(KEYS) + completed
    store.close()


@pytest.mark.parametrize(
    ("engine_name", "group_commit"),
    [("sqlite", False), ("sqlite", True), ("postgresql", False)],
    ids=["sqlite", "sqlite-group-commit", "postgresql"],
)
def test_async_tasks_race_on_one_store(
    engine_name: str, group_commit: bool, make_database: Callable[[str], Database]
) -> None:
    db = make_database(engine_name)

    async def scenario() -> None:
        store = db.async_store(group_commit=group_commit)
        await store.migrate()
        try:
            start = asyncio.Event()

            async def reserve(seed: int) -> dict[str, Any]:
                rng = random.Random(seed)
                key, fingerprint = rng.choice(KEYS), rng.choice(FINGERPRINTS)
                tenant = rng.choice((TENANT, OTHER_ACTOR))
                await start.wait()
                result = await store.reserve(tenant, OPERATION, key, "task", fingerprint)
                return reservation_row(key, fingerprint, result)

            tasks = [asyncio.create_task(reserve(seed)) for seed in range(TASKS)]
            await asyncio.sleep(0)
            start.set()
            rows = await asyncio.gather(*tasks)
            stored = {key: await store.get(TENANT, OPERATION, key) for key in KEYS}
            check_reservations(rows, stored)

            # release against complete, two of each per key, all at once
            keys = [f"race-{i}" for i in range(TASKS // 4)]
            for key in keys:
                await store.reserve(TENANT, OPERATION, key, "owner", "fp-a")
            releases: dict[str, list[bool]] = defaultdict(list)
            completes: dict[str, list[str | None]] = defaultdict(list)
            go = asyncio.Event()

            async def release(key: str) -> None:
                await go.wait()
                releases[key].append(await store.release(TENANT, OPERATION, key, "fp-a"))

            async def complete(key: str) -> None:
                await go.wait()
                outcome = Outcome("accepted", 1, details={"k": key})
                record = await store.complete(OTHER_ACTOR, OPERATION, key, outcome)
                completes[key].append(None if record is None else record.status.value)

            racers = [f(key) for key in keys for f in (release, complete, release, complete)]
            random.Random(7).shuffle(racers)
            race_tasks = [asyncio.create_task(racer) for racer in racers]
            await asyncio.sleep(0)
            go.set()
            await asyncio.gather(*race_tasks)
            stored = {key: await store.get(TENANT, OPERATION, key) for key in keys}
            check_release_complete_race(keys, releases, completes, stored)
            if group_commit:  # the racing calls did share transactions
                assert store._offload.grouped_calls > len(keys), store._offload.grouped_calls
        finally:
            await store.close()

    asyncio.run(scenario())
