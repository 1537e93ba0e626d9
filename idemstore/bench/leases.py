"""The bench's ``leases`` section: what a lease and ``run_once`` cost, as ratios to the plain
reserve of a fresh key, measured in the same rounds on the same database (sync and async
store each against its own plain reserve).

Variants, each on a fresh key per operation:

- ``reserve`` (the baseline): ``reserve`` without a lease, the Rust store's call;
- ``reserve, lease``: ``reserve(..., lease=30 s)``: the same upsert, one more column bound and
  the re-claim branch in its CASE expressions;
- ``reserve + complete``: what a caller does by hand (two transactions), for reference;
- ``run_once, lease``: ``run_once`` with a trivial work and a 30 s lease: reserve, a renewer
  started and stopped (a thread or a task), the fenced complete.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Final

from ..aio import AsyncIdempotencyStore
from ..store import IdempotencyStore
from .harness import (
    FINGERPRINT,
    OPERATION,
    OUTCOME,
    OWNER,
    TENANT,
    BenchResult,
    BenchSettings,
    Variant,
    figures_from,
    run_rounds,
)
from .target import Target

WORKLOAD: Final = "fresh key"
LEASE: Final = timedelta(seconds=30)


def _sync_runners(store: IdempotencyStore) -> dict[str, Any]:
    def reserve(key: str) -> object:
        return store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)

    def reserve_lease(key: str) -> object:
        return store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT, lease=LEASE)

    def by_hand(key: str) -> object:
        store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
        return store.complete(TENANT, OPERATION, key, OUTCOME)

    def run_once(key: str) -> object:
        return store.run_once(
            TENANT,
            OPERATION,
            key,
            lambda: OUTCOME,
            owner=OWNER,
            request_fingerprint=FINGERPRINT,
            lease=LEASE,
        )

    return {
        "reserve": reserve,
        "reserve, lease": reserve_lease,
        "reserve + complete": by_hand,
        "run_once, lease": run_once,
    }


def _async_runners(store: AsyncIdempotencyStore) -> dict[str, Any]:
    async def reserve(key: str) -> object:
        return await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)

    async def reserve_lease(key: str) -> object:
        return await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT, lease=LEASE)

    async def by_hand(key: str) -> object:
        await store.reserve(TENANT, OPERATION, key, OWNER, FINGERPRINT)
        return await store.complete(TENANT, OPERATION, key, OUTCOME)

    async def run_once(key: str) -> object:
        return await store.run_once(
            TENANT,
            OPERATION,
            key,
            lambda: OUTCOME,
            owner=OWNER,
            request_fingerprint=FINGERPRINT,
            lease=LEASE,
        )

    return {
        "reserve": reserve,
        "reserve, lease": reserve_lease,
        "reserve + complete": by_hand,
        "run_once, lease": run_once,
    }


def _variants(sync_store: IdempotencyStore, async_store: AsyncIdempotencyStore) -> list[Variant]:
    variants = []
    for flavour, runners in (
        ("sync", _sync_runners(sync_store)),
        ("async", _async_runners(async_store)),
    ):
        baseline = f"idemstore {flavour} reserve"
        for what, fn in runners.items():
            name = f"idemstore {flavour} {what}"

            def make(tag: str, fn: Any = fn) -> dict[str, Any]:
                return {WORKLOAD: lambda i: fn(f"{tag}-{i}")}

            variants.append(
                Variant(
                    name,
                    None if name == baseline else baseline,
                    sync=make if flavour == "sync" else None,
                    aio=make if flavour == "async" else None,
                    workloads=(WORKLOAD,),
                )
            )
    return variants


def bench_leases(target: Target, settings: BenchSettings, result: BenchResult) -> None:
    """The ``leases`` section's figures, added to ``result``."""
    url, schema = target.database("leases")
    loop = asyncio.new_event_loop()
    sync_store = target.sync_store(url, schema, migrate=True)
    async_store = target.async_store(url, schema)
    try:
        loop.run_until_complete(async_store.check_schema())
        variants = _variants(sync_store, async_store)
        samples = run_rounds(variants, loop, settings, (WORKLOAD,), "leases")
        result.figures += figures_from("leases", variants, samples)
    finally:
        sync_store.close()
        loop.run_until_complete(async_store.close())
        loop.close()


__all__ = ["LEASE", "WORKLOAD", "bench_leases"]
