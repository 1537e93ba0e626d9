"""Requests per second of a trivial FastAPI handler through uvicorn, with and without
:class:`~idemstore.asgi.IdempotencyMiddleware`, as ratios measured in one run.

    python -m tests.bench_asgi [--seconds 3] [--rounds 3] [--connections 16] [--url URL]

Two uvicorn servers serve tests/asgi_app.py (one process each, one worker): ``plain`` without
the middleware, and one with it on the store at ``--url`` (default: a fresh SQLite file,
``synchronous=FULL``). A keep-alive HTTP/1.1 client (raw asyncio streams, far cheaper than
the servers it drives) keeps ``--connections`` requests in flight to ``POST /trivial``:

- ``plain``: no middleware (the baseline; requests carry a key the app ignores);
- ``fresh``: a new key per request (reserve with a lease, run, complete: two commits);
- ``replay``: the same few keys again (reserve finds the stored response: one upsert);
- ``store``: the store's part of a first request alone (reserve with a lease, complete with
  the token), no HTTP, from this process at the same concurrency: ``fresh vs store`` says how
  close the middleware runs to the store's write rate.

Rounds alternate the variants and each figure is the median round. This is a benchmark, not
a test: the machine is shared, so only the ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from idemstore import AsyncIdempotencyStore, IdempotencyStore, Reserved, TenantContext
from idemstore.asgi import DEFAULT_LEASE, DEFAULT_TTL, stored_response
from tests.test_asgi_server import Server, server_env, start_server, stop_server


class _Db:
    """What server_env needs of a database: on PostgreSQL a schema of its own, migrated, and
    dropped by :meth:`drop`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.schema: str | None = None
        options: dict[str, Any] = {}
        if url.startswith("postgresql"):
            self.schema = f"bench_asgi_{os.getpid()}"
            with sa.create_engine(url).begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA "{self.schema}"')
            options["connect_args"] = {"options": f"-csearch_path={self.schema}"}
        IdempotencyStore.from_url(url, migrate=True, **options).close()

    def drop(self) -> None:
        if self.schema is not None:
            with sa.create_engine(self.url).begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{self.schema}" CASCADE')


async def _connection(
    host: str, port: int, keys: itertools.count[int] | None, prefix: str, until: float
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    done = 0
    try:
        while time.monotonic() < until:
            key = f"{prefix}-{next(keys)}" if keys is not None else f"{prefix}-{done % 8}"
            writer.write(
                f"POST /trivial HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: {key}\r\n"
                "Content-Length: 2\r\n\r\n{}".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status >= 300:
                raise RuntimeError(f"unexpected answer {head.decode(errors='replace')}")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)
            done += 1
    finally:
        writer.close()
    return done


async def _load(url: str, connections: int, seconds: float, variant: str, tag: str) -> float:
    host, port = url.removeprefix("http://").split(":")
    keys = itertools.count() if variant == "fresh" else None
    start = time.monotonic()
    until = start + seconds
    counts = await asyncio.gather(
        *(_connection(host, int(port), keys, f"{tag}-{i}", until) for i in range(connections))
    )
    return sum(counts) / (time.monotonic() - start)


async def _store_only(db: _Db, connections: int, seconds: float, tag: str) -> float:
    """The store's part of a first request, without HTTP: reserve with the middleware's lease
    and ttl, complete with the token; from this process, ``connections`` at a time."""
    options: dict[str, Any] = {}
    if db.schema is not None:
        options["connect_args"] = {"server_settings": {"search_path": db.schema}}
    store = AsyncIdempotencyStore.from_url(db.url, **options)
    tenant = TenantContext.local_implicit()
    keys = itertools.count()
    lease, ttl = DEFAULT_LEASE, DEFAULT_TTL

    async def worker(until: float) -> int:
        done = 0
        while time.monotonic() < until:
            key = f"{tag}-{next(keys)}"
            reserved = await store.reserve(
                tenant, "POST /store", key, "bench", "sha256:x", lease=lease, ttl=ttl
            )
            assert isinstance(reserved, Reserved)
            outcome = stored_response(200, [(b"content-type", b"application/json")], b"{}")
            await store.complete(tenant, "POST /store", key, outcome, token=reserved.token)
            done += 1
        return done

    try:
        start = time.monotonic()
        counts = await asyncio.gather(*(worker(start + seconds) for _ in range(connections)))
        return sum(counts) / (time.monotonic() - start)
    finally:
        await store.close()


def _measure(
    variant: str,
    servers: dict[str, Server],
    db: _Db,
    args: argparse.Namespace,
    seconds: float,
    tag: str,
) -> float:
    if variant == "store":
        return asyncio.run(_store_only(db, args.connections, seconds, tag))
    server = servers["plain" if variant == "plain" else "guarded"]
    return asyncio.run(_load(server.url, args.connections, seconds, variant, tag))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--url", help="the store's database (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        runs = Path(tmp) / "runs.txt"
        db = _Db(url)
        servers: dict[str, Server] = {}
        try:
            servers["plain"] = start_server(
                server_env(db, runs, IDEMSTORE_ASGI_PLAIN="1"), Path(tmp) / "plain.log"
            )
            servers["guarded"] = start_server(server_env(db, runs), Path(tmp) / "guarded.log")
            figures: dict[str, list[float]] = {"plain": [], "fresh": [], "replay": [], "store": []}
            tag = f"{os.getpid()}"
            for variant in figures:  # warm-up, not counted
                _measure(variant, servers, db, args, 0.5, f"{tag}w")
            for round_ in range(args.rounds):
                for variant in figures:
                    rate = _measure(variant, servers, db, args, args.seconds, f"{tag}{round_}")
                    figures[variant].append(rate)
        finally:
            for server in servers.values():
                stop_server(server)
            db.drop()
    plain = statistics.median(figures["plain"])
    print(
        f"store: {url.split('://')[0]}, {args.connections} connections, "
        f"{args.rounds} rounds x {args.seconds:g} s, median round"
    )
    print(f"{'variant':<8} {'req/s':>8} {'ratio':>6} {'vs':<6}  rounds")
    store = statistics.median(figures["store"])
    for variant, rates in figures.items():
        median = statistics.median(rates)
        base, name = (store, "store") if variant == "store" else (plain, "plain")
        shown = ", ".join(f"{r:.0f}" for r in rates)
        print(f"{variant:<8} {median:>8.0f} {median / base:>6.2f} {name:<6}  {shown}")
    print(f"fresh vs store: {statistics.median(figures['fresh']) / store:.2f}")
    print("plain: no middleware; fresh: a new key per request; replay: 8 keys per connection")
    print("again; store: reserve(lease, ttl) + complete(token) alone, no HTTP, same concurrency")


if __name__ == "__main__":
    main()
