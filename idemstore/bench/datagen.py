"""The one data generator: sample idempotency records and JSON key files, deterministic from a
seed, for the tests and the bench alike.

Importable (``from idemstore.bench import datagen``) and runnable::

    python -m idemstore.bench.datagen --count 100000 --form versioned /tmp/keys.json

``write_versioned_file`` writes the canonical form (what Rust writes, via
:func:`idemstore.transfer.writer.write_records`); ``write_legacy_file`` writes the old bare map with
``json.dumps`` (ASCII escapes, so ``\\uXXXX`` and surrogate pairs get exercised) and omits the
fields a legacy file may lack (record ``schema_version``, ``conflict_count`` 0, and
``tenant_context`` when it is the legacy default tenant); ``write_realistic_file`` writes
FORMAT.md-shaped records from a text template (fast, for big files). The bench's records are
:func:`synthetic_record` (one tenant and operation, completed), written by
:func:`write_synthetic_file`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..ids import idempotency_fingerprint, idempotency_record_id
from ..model import (
    U64_MAX,
    IdempotencyRecord,
    JSONValue,
    Outcome,
    RecordStatus,
    TenantContext,
)
from ..rules import now_ms
from ..transfer.writer import record_to_json, write_records
from .harness import OPERATION, OWNER, TENANT

BASE_MS = 1_782_900_000_000
LEGACY_TENANT = TenantContext.explicit_user_workspace("local", "default", None, "system")
WEIRD_KEY = 'quote " backslash \\ newline \n tab \t emoji \U0001f389 \u00fcn\u00efc\u00f8de'

_TENANTS = (
    TenantContext.local_implicit(),
    LEGACY_TENANT,
    TenantContext.explicit_user_workspace("org-a", "ws-a", None, "actor-a"),
    TenantContext.explicit_user_workspace("org-b", "ws-b", "dep-1", "actor-b"),
    TenantContext("\u7d44\u7e54", "w\u00f6rkspace", "d\u00e9ploiement", None),
)


def _details(rng: random.Random, i: int) -> JSONValue:
    pick = rng.randrange(8)
    if pick == 0:
        return None
    if pick == 1:
        return {
            "delivery_id": f"delivery-{i:x}",
            "nested": {"z": [1, 2, {"deep": True}], "a": None, "\u00e9t\u00e9": "\u2603"},
            "big": U64_MAX,
            "neg": -5,
            "empty_obj": {},
            "empty_list": [],
        }
    if pick == 2:
        return f"plain string {i}"
    if pick == 3:
        return [i, "two", False, None]
    return {
        "delivery_id": f"delivery-{i:x}",
        "dedupe_result": "accepted",
        "dedupe_reason_code": "accepted_provider_event_id",
        "woken_wait_id": None if i % 2 else f"wait-{i}",
    }


def make_record(rng: random.Random, i: int) -> IdempotencyRecord:
    """One pseudo-random record; ``i`` makes ids unique."""
    tenant = _TENANTS[rng.randrange(len(_TENANTS))]
    trigger = f"whtr_{rng.getrandbits(128):032x}"
    if rng.randrange(50) == 0:
        operation, key = "webhook.body_digest", f"trigger:{trigger}:body:{WEIRD_KEY}{i}"
    elif rng.randrange(2):
        digest = idempotency_fingerprint([str(i)])
        operation, key = "webhook.body_digest", f"trigger:{trigger}:body:{digest}"
    else:
        operation, key = "webhook.provider_event", f"trigger:{trigger}:provider_event:evt_{i}"
    first = BASE_MS + i
    big = rng.randrange(40) == 0
    last = U64_MAX if big else first + rng.randrange(1000)
    status = (RecordStatus.RESERVED, RecordStatus.COMPLETED, RecordStatus.CONFLICTED)[
        rng.randrange(3)
    ]
    outcome = None
    if status is not RecordStatus.RESERVED or rng.randrange(4) == 0:
        full = rng.randrange(2) == 0
        outcome = Outcome(
            outcome_kind=("accepted", "duplicate", "woken", "rejected")[rng.randrange(4)],
            completed_at_ms=U64_MAX if big else last,
            primary_ref_kind="delivery" if full else None,
            primary_ref_id=f"delivery-{i:x}" if full else None,
            secondary_ref_kind="run" if full else None,
            secondary_ref_id=f"run-{i:x}" if full else None,
            details=_details(rng, i),
        )
    fingerprints: tuple[str, ...] = ()
    count = 0
    if status is RecordStatus.CONFLICTED:
        fingerprints = tuple(idempotency_fingerprint([str(i), str(n)]) for n in range(1, 3))
        count = U64_MAX if big else len(fingerprints) + rng.randrange(3)
    return IdempotencyRecord(
        schema_version=1,
        record_id=idempotency_record_id(tenant, operation, key),
        tenant_context=tenant,
        operation=operation,
        key=key,
        owner=f"automation_webhook:{trigger}",
        request_fingerprint=idempotency_fingerprint([operation, key]),
        status=status,
        first_seen_at_ms=first,
        last_seen_at_ms=last,
        first_seen_event_id=f"evt_{i}" if rng.randrange(2) else None,
        expires_at_ms=(U64_MAX if big else last + 86_400_000) if rng.randrange(5) == 0 else None,
        outcome=outcome,
        conflict_count=count,
        conflict_fingerprints=fingerprints,
    )


def iter_records(n: int, seed: int = 0) -> Iterator[IdempotencyRecord]:
    """``n`` pseudo-random records, lazily (for big files)."""
    rng = random.Random(seed)
    for i in range(n):
        yield make_record(rng, i)


def generate_records(n: int, seed: int = 0) -> list[IdempotencyRecord]:
    """``n`` pseudo-random records."""
    return list(iter_records(n, seed))


def sample_records() -> list[IdempotencyRecord]:
    """A small fixed set covering every optional field present and absent, unicode,
    nested details, floats and 2^64-1 integers."""
    tenant = TenantContext.explicit_user_workspace("org-\u00e9", "ws", "dep", "actor")
    full = IdempotencyRecord(
        record_id=idempotency_record_id(tenant, "webhook.provider_event", WEIRD_KEY),
        tenant_context=tenant,
        operation="webhook.provider_event",
        key=WEIRD_KEY,
        owner="automation_webhook:whtr_\u00fc",
        request_fingerprint=idempotency_fingerprint(["full"]),
        status=RecordStatus.CONFLICTED,
        first_seen_at_ms=0,
        last_seen_at_ms=U64_MAX,
        first_seen_event_id="evt_\U0001f600",
        expires_at_ms=U64_MAX,
        outcome=Outcome(
            "accepted",
            U64_MAX,
            "delivery",
            "delivery-1",
            "run",
            "run-1",
            {
                "z": {"b": [1, 2.5, 1e-07, 1e16, 1.5e300, -0.0], "a": "\u0000\u001f\u007f"},
                "a": {"\u00e9": True, "e": False, "n": None},
                "M": U64_MAX,
            },
        ),
        conflict_count=U64_MAX,
        conflict_fingerprints=(idempotency_fingerprint(["x"]), idempotency_fingerprint(["y"])),
    )
    minimal = IdempotencyRecord(
        record_id=idempotency_record_id(LEGACY_TENANT, "op", "k"),
        tenant_context=LEGACY_TENANT,
        operation="op",
        key="k",
        owner="o",
        request_fingerprint="fp",
        status=RecordStatus.RESERVED,
        first_seen_at_ms=1,
        last_seen_at_ms=1,
    )
    local = TenantContext.local_implicit()
    completed_null_details = IdempotencyRecord(
        record_id=idempotency_record_id(local, "webhook.body_digest", "trigger:t:body:x"),
        tenant_context=local,
        operation="webhook.body_digest",
        key="trigger:t:body:x",
        owner="automation_webhook:t",
        request_fingerprint="sha256:00",
        status=RecordStatus.COMPLETED,
        first_seen_at_ms=BASE_MS,
        last_seen_at_ms=BASE_MS + 1,
        outcome=Outcome("suppressed", BASE_MS + 1),
    )
    return [full, minimal, completed_null_details, *generate_records(5, seed=7)]


# ------------------------------------------------------------------------------------------
# Files


def legacy_record_json(record: IdempotencyRecord) -> dict[str, Any]:
    """The record as an old file may hold it: defaults left out."""
    d: dict[str, Any] = record_to_json(record)
    if record.schema_version == 1:
        del d["schema_version"]
    if record.tenant_context == LEGACY_TENANT:
        del d["tenant_context"]
    if record.conflict_count == 0:
        del d["conflict_count"]
    return d


def write_legacy_file(path: str | os.PathLike[str], records: Iterable[IdempotencyRecord]) -> int:
    """A legacy bare map ``{"<record_id>": {record}}``, one record at a time."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("{")
        for record in records:
            body = json.dumps(legacy_record_json(record), indent=2, ensure_ascii=True)
            body = body.replace("\n", "\n  ")
            out.write(("," if count else "") + f"\n  {json.dumps(record.record_id)}: {body}")
            count += 1
        out.write("\n}\n")
    return count


def write_versioned_file(path: str | os.PathLike[str], records: Iterable[IdempotencyRecord]) -> int:
    """The canonical versioned file (what Rust writes)."""
    if not isinstance(records, list | tuple):
        records = list(records)  # write_records sorts sequences
    return write_records(path, records)


def write_realistic_file(path: str | os.PathLike[str], n: int) -> int:
    """``n`` records shaped like the FORMAT.md example (what the webhook callers write), as
    ``write_records`` would write them, from a text template: fast enough for big files."""
    tenant = TenantContext.local_implicit()
    operation = "webhook.provider_event"
    trigger = "whtr_0123456789abcdef0123456789abcdef"
    entries = []
    for i in range(n):
        key = f"trigger:{trigger}:provider_event:evt_{i}"
        entries.append((idempotency_record_id(tenant, operation, key), i))
    entries.sort()
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write('{\n  "schema_version": 1,\n  "records": {')
        sep = "\n"
        for record_id, i in entries:
            fingerprint = idempotency_fingerprint([operation, str(i)])
            first = BASE_MS + i * 7
            out.write(
                f'{sep}    "{record_id}": {{\n'
                '      "schema_version": 1,\n'
                f'      "record_id": "{record_id}",\n'
                '      "tenant_context": {\n'
                '        "org_id": "local",\n'
                '        "workspace_id": "local",\n'
                '        "source": "local_implicit"\n'
                "      },\n"
                f'      "operation": "{operation}",\n'
                f'      "key": "trigger:{trigger}:provider_event:evt_{i}",\n'
                f'      "owner": "automation_webhook:{trigger}",\n'
                f'      "request_fingerprint": "{fingerprint}",\n'
                '      "status": "completed",\n'
                f'      "first_seen_at_ms": {first},\n'
                f'      "last_seen_at_ms": {first + 42},\n'
                f'      "first_seen_event_id": "evt_{i}",\n'
                '      "outcome": {\n'
                '        "outcome_kind": "accepted",\n'
                f'        "completed_at_ms": {first + 42},\n'
                '        "primary_ref_kind": "delivery",\n'
                f'        "primary_ref_id": "delivery-{i:x}",\n'
                '        "secondary_ref_kind": "run",\n'
                f'        "secondary_ref_id": "run-{i:x}",\n'
                '        "details": {\n'
                '          "dedupe_reason_code": "accepted_provider_event_id",\n'
                '          "dedupe_result": "accepted"\n'
                "        }\n"
                "      },\n"
                '      "conflict_count": 0\n'
                "    }"
            )
            sep = ",\n"
        out.write("\n  }\n}" if n else "}\n}")
    return n


def synthetic_record(i: int, now: int) -> IdempotencyRecord:
    """The bench's record ``i``: a completed one of the bench tenant and operation, as an
    application would leave it."""
    key = f"pre-{i}"
    return IdempotencyRecord(
        record_id=idempotency_record_id(TENANT, OPERATION, key),
        tenant_context=TENANT,
        operation=OPERATION,
        key=key,
        owner=OWNER,
        request_fingerprint=f"sha256:{i:064x}",
        status=RecordStatus.COMPLETED,
        first_seen_at_ms=now,
        last_seen_at_ms=now + 1,
        first_seen_event_id=f"event-{i}",
        outcome=Outcome(
            outcome_kind="accepted",
            completed_at_ms=now + 1,
            primary_ref_kind="delivery",
            primary_ref_id=f"delivery-{i}",
            details={"dedupe_result": "accepted"},
        ),
    )


def write_synthetic_file(path: Path, count: int) -> int:
    """A versioned Rust key file of ``count`` :func:`synthetic_record` s, in the order a hash
    map gives them (``json.dumps``, two-space indent); its size in bytes."""
    now = now_ms()
    records = {
        r["record_id"]: r for r in (record_to_json(synthetic_record(i, now)) for i in range(count))
    }
    payload = json.dumps({"schema_version": 1, "records": records}, indent=2).encode()
    path.write_bytes(payload)
    return len(payload)


SAMPLE_FILES = {
    "sample_versioned.json": write_versioned_file,
    "sample_legacy.json": write_legacy_file,
}


def write_samples(directory: str | os.PathLike[str]) -> list[str]:
    """(Re)generate the committed fixtures in ``tests/data``."""
    written = []
    for name, writer in SAMPLE_FILES.items():
        path = os.path.join(directory, name)
        writer(path, sample_records())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m idemstore.bench.datagen``: write a generated file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--form",
        choices=("versioned", "legacy", "realistic"),
        default="versioned",
        help="realistic: FORMAT.md-shaped records from a template (fast, for big files)",
    )
    parser.add_argument("--samples", metavar="DIR", help="regenerate the sample fixtures")
    args = parser.parse_args(argv)
    if args.samples:
        print("\n".join(write_samples(args.samples)))
        return
    if not args.path:
        parser.error("path is required")
    started = time.perf_counter()
    records = iter_records(args.count, args.seed)
    if args.form == "realistic":
        n = write_realistic_file(args.path, args.count)
    elif args.form == "legacy":
        n = write_legacy_file(args.path, records)
    else:
        # sorted, like write_records wants: ids are hashes, so sort the ids in memory
        n = write_versioned_file(args.path, sorted(records, key=lambda r: r.record_id))
    print(f"wrote {n} records to {args.path} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
