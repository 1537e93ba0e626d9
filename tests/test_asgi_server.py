"""IdempotencyMiddleware behind a real uvicorn server on 127.0.0.1 (a subprocess serving
tests/asgi_app.py), on SQLite and PostgreSQL: concurrent clients with one key, a client that
disconnects, a server SIGKILLed in the middle of a request. The app's runs are counted in a
file the server writes, not in the test's memory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from idemstore import TenantContext, now_ms
from tests.conftest import ENGINES, Database

REPO = Path(__file__).resolve().parent.parent
LOCAL = TenantContext.local_implicit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]


def server_env(db: Database, runs: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "IDEMSTORE_ASGI_URL": db.url,
        "IDEMSTORE_ASGI_SCHEMA": db.schema or "",
        "IDEMSTORE_ASGI_RUNS": str(runs),
        "PYTHONPATH": str(REPO),
        **extra,
    }


def start_server(env: dict[str, str], log: Path) -> Server:
    """uvicorn serving ``tests.asgi_app:app_from_env`` on a free port, once it answers."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "uvicorn", "tests.asgi_app:app_from_env", "--factory"),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"uvicorn exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/docs", timeout=1).status_code == 200:
                return Server(url, process)
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"uvicorn did not answer: {log.read_text()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture(params=ENGINES)
def served(
    request: pytest.FixtureRequest, make_database: Callable[[str], Database], tmp_path: Path
) -> Iterator[Callable[..., tuple[Database, Path, Callable[[], Server]]]]:
    """``served(**env)``: a migrated database, the runs file, and a function that starts a
    server on them (stopped at the end)."""
    started: list[Server] = []

    def make(**extra: str) -> tuple[Database, Path, Callable[[], Server]]:
        db = make_database(request.param)
        db.sync_store().close()  # migrated
        runs = tmp_path / "runs.txt"
        runs.touch()
        env = server_env(db, runs, **extra)

        def start() -> Server:
            server = start_server(env, tmp_path / "uvicorn.log")
            started.append(server)
            return server

        return db, runs, start

    yield make
    for server in started:
        stop_server(server)


def count(runs: Path) -> int:
    return len(runs.read_text(encoding="utf-8").splitlines())


async def test_twenty_clients_with_one_key_at_once_run_the_handler_once(served):
    _, runs, start = served()
    server = start()
    clients = [httpx.AsyncClient(base_url=server.url, timeout=30) for _ in range(20)]
    try:
        # Each client's own connection is open before the requests go, so they arrive at once.
        await asyncio.gather(*(c.get("/docs") for c in clients))
        headers = {"Idempotency-Key": "same-key"}
        answers = await asyncio.gather(
            *(c.post("/slow?seconds=0.5", content=b"{}", headers=headers) for c in clients)
        )
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert count(runs) == 1
    fresh = [a for a in answers if a.status_code == 200 and "idempotent-replayed" not in a.headers]
    replayed = [a for a in answers if a.headers.get("idempotent-replayed") == "true"]
    busy = [a for a in answers if a.status_code == 409]
    assert len(fresh) == 1 and len(fresh) + len(replayed) + len(busy) == 20
    assert all(a.content == fresh[0].content for a in replayed)
    assert all(a.headers["content-type"] == "application/problem+json" for a in busy)
    assert not [a for a in answers if a.status_code >= 500]
    assert busy, "20 clients at once: some found the first one still running"


def raw_post(url: str, path: str, key: str, extra: str = "") -> socket.socket:
    """Send a POST with ``key`` on a socket of its own and return the socket, unread."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: {key}\r\n{extra}"
        "Content-Length: 0\r\n\r\n".encode()
    )
    return sock


async def test_a_client_that_disconnects_does_not_lose_the_stored_response(served):
    db, runs, start = served()
    server = start()
    sock = raw_post(server.url, "/slow?seconds=0.6", "gone")
    while count(runs) == 0:
        await asyncio.sleep(0.01)
    sock.close()  # gone while the handler runs
    store = db.async_store()
    try:
        for _ in range(300):
            record = await store.get(LOCAL, "POST /slow", "gone")
            if record is not None and record.outcome is not None:
                break
            await asyncio.sleep(0.02)
    finally:
        await store.close()
    assert record is not None and record.outcome is not None, "the response was stored"
    async with httpx.AsyncClient(base_url=server.url) as http:
        again = await http.post("/slow?seconds=0.6", headers={"Idempotency-Key": "gone"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == {"run": 1} and count(runs) == 1


async def test_a_server_killed_mid_request_leaves_the_key_to_a_retry_after_the_lease(served):
    db, runs, start = served(IDEMSTORE_ASGI_LEASE_MS="8000")
    server = start()
    sock = raw_post(server.url, "/slow", "killed", "X-Sleep: 60\r\n")
    while count(runs) == 0:
        await asyncio.sleep(0.01)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    sock.close()
    server = start()
    headers = {"Idempotency-Key": "killed", "X-Sleep": "0"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        store = db.async_store()
        try:
            record = await store.get(LOCAL, "POST /slow", "killed")
        finally:
            await store.close()
        assert record is not None and record.lease_expires_at_ms is not None
        assert now_ms() < record.lease_expires_at_ms - 1000, "the restart outlasted the lease"
        busy = await http.post("/slow", headers=headers)  # the dead holder's lease still runs
        assert busy.status_code == 409 and 1 <= int(busy.headers["retry-after"]) <= 8
        await asyncio.sleep(max(0, record.lease_expires_at_ms - now_ms()) / 1000 + 0.05)
        retry = await http.post("/slow", headers=headers)
        replay = await http.post("/slow", headers=headers)
    assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
    assert retry.json() == {"run": 2} and count(runs) == 2
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == retry.content
