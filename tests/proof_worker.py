"""A worker process for the concurrency and crash proofs (run as a script, not collected).

``python proof_worker.py '<json job>'``; the job names the database and what to do:

- ``hammer``: reserve a few shared keys with mixed fingerprints, ``count`` times;
- ``race``: ``release`` or ``complete`` (the job's ``role``) every given key, in random order;
- ``crash``: print ``ready``, wait for ``go``, open the store and reserve / conflict / complete
  new keys until killed, printing each acknowledged step (``R key``, ``C key``, ``D key``)
  and flushing before the next one. With ``"group": true``: an async store with group commit
  and ``WRITERS`` tasks doing the same, each on its own keys (``run<n>-w<task>-<i>``).

Otherwise the job lists ``phases`` (``hammer`` or ``race``), run in turn: for each the worker
prints ``ready``, waits for ``go`` on stdin (so that all workers start together) and prints one
JSON line of results. Every exception, a
``LockTimeoutError`` included, is reported in ``errors`` rather than raised.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import traceback
from typing import Any

from idemstore import (
    AsyncIdempotencyStore,
    Conflict,
    Duplicate,
    IdempotencyStore,
    Outcome,
    Reserved,
    TenantContext,
)

OPERATION = "outbox.send"
TENANT = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-1")
#: Same org/workspace/deployment, other actor: the same records.
OTHER_ACTOR = TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-2")


def open_store(job: dict[str, Any]) -> IdempotencyStore:
    options: dict[str, Any] = {}
    if job.get("schema"):
        options["connect_args"] = {"options": f"-csearch_path={job['schema']}"}
    return IdempotencyStore.from_url(job["url"], **options)


def reservation_row(key: str, fingerprint: str, result: Any) -> dict[str, Any]:
    kind = {Reserved: "reserved", Duplicate: "duplicate", Conflict: "conflict"}[type(result)]
    record = result.record
    return {
        "key": key,
        "kind": kind,
        "fingerprint": fingerprint,
        "request_fingerprint": record.request_fingerprint,
        "conflict_count": record.conflict_count,
        "conflict_fingerprints": list(record.conflict_fingerprints),
    }


def hammer(store: IdempotencyStore, job: dict[str, Any], rng: random.Random) -> list[Any]:
    rows = []
    for _ in range(job["count"]):
        key = rng.choice(job["keys"])
        fingerprint = rng.choice(job["fingerprints"])
        tenant = rng.choice((TENANT, OTHER_ACTOR))
        result = store.reserve(tenant, OPERATION, key, "worker", fingerprint)
        rows.append(reservation_row(key, fingerprint, result))
    return rows


def race(store: IdempotencyStore, job: dict[str, Any], rng: random.Random) -> list[Any]:
    keys = list(job["keys"])
    rng.shuffle(keys)
    rows: list[Any] = []
    for key in keys:
        if job["role"] == "release":
            rows.append([key, store.release(TENANT, OPERATION, key, job["fingerprint"])])
        else:
            outcome = Outcome("accepted", 1, primary_ref_id=job["name"], details={"k": key})
            record = store.complete(OTHER_ACTOR, OPERATION, key, outcome)
            rows.append([key, None if record is None else record.status.value])
    return rows


def crash(store: IdempotencyStore, job: dict[str, Any]) -> None:
    i = 0
    while True:
        key = f"run{job['run']}-{i}"
        store.reserve(TENANT, OPERATION, key, "writer", "fp-a")
        print("R", key, flush=True)
        if i % 2:
            assert isinstance(store.reserve(TENANT, OPERATION, key, "writer", "fp-b"), Conflict)
            print("C", key, flush=True)
            store.complete(TENANT, OPERATION, key, Outcome("accepted", i))
            print("D", key, flush=True)
        i += 1


#: Concurrent tasks of a group-commit crash writer.
WRITERS = 8


async def crash_in_groups(job: dict[str, Any]) -> None:
    store = AsyncIdempotencyStore.from_url(job["url"], group_commit=True)
    await store.check_schema()

    async def writer(w: int) -> None:
        i = 0
        while True:
            key = f"run{job['run']}-w{w}-{i}"
            await store.reserve(TENANT, OPERATION, key, "writer", "fp-a")
            print("R", key, flush=True)
            if i % 2:
                conflict = await store.reserve(TENANT, OPERATION, key, "writer", "fp-b")
                assert isinstance(conflict, Conflict)
                print("C", key, flush=True)
                await store.complete(TENANT, OPERATION, key, Outcome("accepted", i))
                print("D", key, flush=True)
            i += 1

    await asyncio.gather(*(writer(w) for w in range(WRITERS)))


def main() -> None:
    job = json.loads(sys.argv[1])
    if job.get("action") == "crash":
        # Imported, not yet opened: the test starts the next writer while this one runs.
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        if job.get("group"):
            asyncio.run(crash_in_groups(job))
        else:
            crash(open_store(job), job)
        return
    store = open_store(job)
    try:
        store.check_schema()  # connect and warm up before the start line
        for phase in job["phases"]:
            print("ready", flush=True)
            assert sys.stdin.readline().strip() == "go"
            rng = random.Random(phase["seed"])
            errors: list[str] = []
            rows: list[Any] = []
            try:
                run = hammer if phase["action"] == "hammer" else race
                rows = run(store, phase, rng)
            except Exception:
                errors.append(traceback.format_exc())
            print(json.dumps({"rows": rows, "errors": errors}), flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main()
