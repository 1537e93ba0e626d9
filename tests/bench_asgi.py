"""Requests per second of a trivial FastAPI handler through uvicorn, with and without
:class:`~idemstore.asgi.IdempotencyMiddleware`, as ratios measured in one run.

    python -m tests.bench_asgi [--seconds 3] [--rounds 3] [--connections 16] [--url URL]

Two uvicorn servers serve tests/asgi_app.py (one process each, one worker): ``plain`` without
the middleware, and one with it on the store at ``--url`` (default: a fresh SQLite file,
``synchronous=FULL``). A keep-alive HTTP/1.1 client (raw asyncio streams, far cheaper than
the servers it drives) keeps ``--connections`` requests in flight to ``POST /trivial``:

- ``plain``: no middleware (the baseline; requests carry a key the app ignores);
- ``fresh``: a new key per request (reserve with a lease, run, complete: two commits);
- ``replay``: the same few keys again (reserve finds the stored response: one upsert).

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

from idemstore import IdempotencyStore
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
            figures: dict[str, list[float]] = {"plain": [], "fresh": [], "replay": []}
            tag = f"{os.getpid()}"
            for variant in figures:  # warm-up, not counted
                server = servers["plain" if variant == "plain" else "guarded"]
                asyncio.run(_load(server.url, args.connections, 0.5, variant, f"{tag}w"))
            for round_ in range(args.rounds):
                for variant in figures:
                    server = servers["plain" if variant == "plain" else "guarded"]
                    rate = asyncio.run(
                        _load(server.url, args.connections, args.seconds, variant, f"{tag}{round_}")
                    )
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
    print(f"{'variant':<8} {'req/s':>8} {'vs plain':>9}   rounds")
    for variant, rates in figures.items():
        median = statistics.median(rates)
        shown = ", ".join(f"{r:.0f}" for r in rates)
        print(f"{variant:<8} {median:>8.0f} {median / plain:>9.2f}   {shown}")


if __name__ == "__main__":
    main()
