"""IdempotencyMiddleware in front of a real FastAPI app (tests/asgi_app.py), through
``httpx.ASGITransport`` (or the ASGI calls themselves where the test must see the parts of a
response as they go out), on SQLite and on PostgreSQL: every answer of issue 13."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from idemstore import (
    AsyncIdempotencyStore,
    ConfigurationError,
    InvalidInputError,
    RecordStatus,
    TenantContext,
    idempotency_fingerprint,
    now_ms,
)
from idemstore.asgi import (
    DEFAULT_TTL,
    IdempotencyMiddleware,
    request_header,
    route_operation,
)
from tests.asgi_app import BINARY, build_app
from tests.conftest import ENGINES, Database

LOCAL = TenantContext.local_implicit()


@pytest.fixture(params=ENGINES)
def database(request: pytest.FixtureRequest, make_database: Callable[[str], Database]) -> Database:
    return make_database(request.param)


@pytest.fixture
async def store(database: Database) -> AsyncIterator[AsyncIdempotencyStore]:
    store = database.async_store()
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    path = tmp_path / "runs.txt"
    path.touch()
    return path


def count(runs: Path) -> int:
    return len(runs.read_text(encoding="utf-8").splitlines())


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def assert_problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["type"] == f"urn:idemstore:problem:{name}"
    assert problem["title"] and problem["detail"]
    return problem


KEY = {"Idempotency-Key": "key-1"}


async def test_a_retry_gets_the_first_response_replayed_byte_for_byte(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        first = await http.post("/orders/7", content=b'{"n": 1}', headers=KEY)
        again = await http.post("/orders/7", content=b'{"n": 1}', headers=KEY)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content and json.loads(first.content)["run"] == 1
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-order"] == "7" and again.headers["location"] == "/orders/7"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["content-length"] == first.headers["content-length"]
    assert count(runs) == 1


async def test_replay_drops_set_cookie_and_connection_specific_headers(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        first = await http.post("/orders/7", headers=KEY)
        again = await http.post("/orders/7", headers=KEY)
    assert "set-cookie" in first.headers and first.headers["x-hop"] == "only-this-hop"
    for name in ("set-cookie", "connection", "x-hop"):
        assert name not in again.headers, name
    kept = {k for k in first.headers if k not in ("set-cookie", "connection", "x-hop")}
    assert kept | {"idempotent-replayed"} == set(again.headers)


async def test_a_binary_body_is_replayed_byte_for_byte(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        first = await http.post("/binary", headers=KEY)
        again = await http.post("/binary", headers=KEY)
    assert first.content == again.content == BINARY
    assert again.headers["idempotent-replayed"] == "true" and count(runs) == 1
    record = await store.get(LOCAL, "POST /binary", "key-1")
    assert record is not None and record.outcome is not None
    assert set(record.outcome.details) == {"status", "headers", "body_base64"}  # type: ignore[arg-type]


async def test_a_missing_key_is_400_where_required_and_passes_through_otherwise(store, runs):
    optional = build_app(store, runs)
    required = build_app(store, runs, required=True)
    on_orders = build_app(store, runs, required=lambda scope: scope["path"].startswith("/orders"))
    async with client(optional) as a, client(required) as b, client(on_orders) as c:
        assert (await a.post("/orders/1")).status_code == 201
        assert (await a.post("/orders/1")).status_code == 201  # not guarded: runs again
        assert_problem(await b.post("/orders/1"), 400, "key-missing")
        assert_problem(await c.post("/orders/1"), 400, "key-missing")
        assert (await c.post("/binary")).status_code == 200
    assert count(runs) == 3
    assert (await store.stats()).total == 0


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "")],
        [("Idempotency-Key", "   ")],
        [("Idempotency-Key", '""')],
        [("Idempotency-Key", "k" * 256)],
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [("Idempotency-Key", "a, b")],
        [("Idempotency-Key", '"unterminated')],
        [("Idempotency-Key", '"a" tail')],
        [("Idempotency-Key", "caf\u00e9".encode())],
    ],
    ids=[
        "empty",
        "blank",
        "empty-quoted",
        "too-long",
        "twice",
        "comma",
        "open-quote",
        "tail",
        "utf8",
    ],
)
async def test_a_malformed_key_is_400_and_runs_nothing(store, runs, headers):
    app = build_app(store, runs)
    async with client(app) as http:
        assert_problem(await http.post("/orders/1", headers=headers), 400, "key-malformed")
    assert count(runs) == 0 and (await store.stats()).total == 0


async def test_a_quoted_key_is_the_same_key_and_255_characters_are_accepted(store, runs):
    app = build_app(store, runs)
    long = "k" * 255
    async with client(app) as http:
        assert (await http.post("/orders/1", headers={"Idempotency-Key": "a,b"})).status_code == 400
        first = await http.post("/orders/1", headers={"Idempotency-Key": '"a\\"b"'})
        again = await http.post("/orders/1", headers={"Idempotency-Key": 'a"b'})
        assert (await http.post("/orders/1", headers={"Idempotency-Key": long})).status_code == 201
    assert first.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert await store.get(LOCAL, "POST /orders/{order_id}", 'a"b') is not None
    assert count(runs) == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [("/orders/1", b"other body"), ("/orders/1?x=1", b"body"), ("/orders/2", b"body")],
    ids=["body", "query", "path"],
)
async def test_the_same_key_with_another_request_is_422_and_not_run(store, runs, path, body):
    app = build_app(store, runs)
    async with client(app) as http:
        assert (await http.post("/orders/1", content=b"body", headers=KEY)).status_code == 201
        assert_problem(await http.post(path, content=body, headers=KEY), 422, "key-reused")
        replay = await http.post("/orders/1", content=b"body", headers=KEY)
    assert replay.headers["idempotent-replayed"] == "true"
    assert count(runs) == 1


async def test_the_same_key_while_the_first_runs_is_409_with_retry_after(store, runs):
    started = asyncio.Event()

    async def wait_started(request: Request) -> None:
        started.set()
        await asyncio.sleep(0.5)

    app = build_app(store, runs, lease=timedelta(seconds=5), hook=wait_started)
    async with client(app) as http:
        first = asyncio.create_task(http.post("/orders/1", headers=KEY))
        await started.wait()
        busy = await http.post("/orders/1", headers=KEY)
        assert_problem(busy, 409, "request-in-progress")
        assert 1 <= int(busy.headers["retry-after"]) <= 5
        assert (await first).status_code == 201
        assert (await http.post("/orders/1", headers=KEY)).headers["idempotent-replayed"] == "true"
    assert count(runs) == 1


def request_fingerprint(method: str, path: str, body: bytes, query: str = "") -> str:
    """The middleware's default fingerprint of a request (its documented parts)."""
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return idempotency_fingerprint(["method", method, "path", path, "query", query, "body", digest])


async def test_a_request_with_another_body_does_not_keep_a_dead_servers_key(store, runs):
    # The first request's server reserved the key and died before it answered.
    operation, fingerprint = (
        "POST /orders/{order_id}",
        request_fingerprint("POST", "/orders/1", b"body"),
    )
    held = await store.reserve(LOCAL, operation, "key-1", "dead-server", fingerprint, lease=400)
    app = build_app(store, runs, lease=timedelta(seconds=5))
    async with client(app) as http:
        assert_problem(
            await http.post("/orders/1", content=b"other", headers=KEY), 422, "key-reused"
        )
        busy = await http.post("/orders/1", content=b"body", headers=KEY)
        assert_problem(busy, 409, "request-in-progress")  # the lease still runs
        await asyncio.sleep(max(0, held.record.lease_expires_at_ms - now_ms() + 20) / 1000)
        retry = await http.post("/orders/1", content=b"body", headers=KEY)
        assert retry.status_code == 201, retry.text
        assert "idempotent-replayed" not in retry.headers and retry.json()["run"] == 1
        again = await http.post("/orders/1", content=b"body", headers=KEY)
        assert again.headers["idempotent-replayed"] == "true" and again.content == retry.content
        assert_problem(
            await http.post("/orders/1", content=b"other", headers=KEY), 422, "key-reused"
        )
    assert count(runs) == 1
    record = await store.get(LOCAL, operation, "key-1")
    assert record.outcome is not None and record.conflict_fingerprints != ()


async def test_a_5xx_answer_stores_nothing_and_a_retry_runs_again(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        first = await http.post("/status/503", headers=KEY)
        assert await store.get(LOCAL, "POST /status/{code}", "key-1") is None  # released
        again = await http.post("/status/503", headers=KEY)
    assert first.status_code == again.status_code == 503
    assert "idempotent-replayed" not in again.headers
    assert (first.json()["run"], again.json()["run"]) == (1, 2)


async def test_an_exception_stores_nothing_and_a_retry_runs_again(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        assert (await http.post("/boom", headers=KEY)).status_code == 500
        assert await store.get(LOCAL, "POST /boom", "key-1") is None
        assert (await http.post("/boom", headers=KEY)).status_code == 500
    assert count(runs) == 2


async def test_a_4xx_answer_is_stored_and_replayed(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        first = await http.post("/status/404", headers=KEY)
        again = await http.post("/status/404", headers=KEY)
    assert first.status_code == again.status_code == 404
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert count(runs) == 1


async def call_asgi(app: Any, path: str, key: str, sent: list[dict[str, Any]]) -> None:
    """One POST straight through ASGI, every message it sends kept in ``sent``."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"idempotency-key", key.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    request = {"type": "http.request", "body": b"", "more_body": False}
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal request
        if request is not None:
            message, request = request, None
            return message
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)


async def test_a_streamed_response_goes_out_as_it_streams_and_is_stored_at_its_end(store, runs):
    app = build_app(store, runs)
    app.state.gate = asyncio.Event()
    sent: list[dict[str, Any]] = []
    first = asyncio.create_task(call_asgi(app, "/stream", "s", sent))
    for _ in range(200):
        if any(m.get("body", b"").startswith(b"part 0") for m in sent):
            break
        await asyncio.sleep(0.01)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    record = await store.get(LOCAL, "POST /stream", "s")
    assert record is not None and record.status is RecordStatus.RESERVED  # not completed yet
    async with client(app) as http:
        assert_problem(
            await http.post("/stream", headers={"Idempotency-Key": "s"}), 409, "request-in-progress"
        )
        app.state.gate.set()
        await first
        replay = await http.post("/stream", headers={"Idempotency-Key": "s"})
    streamed = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert streamed == b"part 0 of run 1\npart 1 of run 1\npart 2 of run 1\n"
    assert replay.content == streamed and replay.headers["idempotent-replayed"] == "true"
    assert count(runs) == 1


async def test_the_response_is_stored_before_its_last_part_is_sent(store, runs):
    seen: list[Any] = []
    app = build_app(store, runs)

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def check(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                seen.append(await store.get(LOCAL, "POST /orders/{order_id}", "key-1"))
            await send(message)

        await app(scope, receive, check)

    async with client(recording) as http:
        assert (await http.post("/orders/1", headers=KEY)).status_code == 201
    [record] = seen
    assert record.status is RecordStatus.COMPLETED and record.outcome.details["status"] == 201


async def test_a_response_over_max_body_is_served_not_stored_and_the_key_released(store, runs):
    app = build_app(store, runs, max_body=1000)
    async with client(app) as http:
        small = await http.post("/big/1000", headers={"Idempotency-Key": "small"})
        first = await http.post("/big/1001", headers=KEY)
        assert await store.get(LOCAL, "POST /big/{size}", "key-1") is None
        again = await http.post("/big/1001", headers=KEY)
        small_again = await http.post("/big/1000", headers={"Idempotency-Key": "small"})
    assert first.content == again.content == b"x" * 1001
    assert "idempotent-replayed" not in again.headers and count(runs) == 3
    assert small.content == small_again.content and small_again.headers["idempotent-replayed"]


async def test_the_app_runs_after_the_reservation_commits(database, store, runs):
    seen: list[Any] = []
    other = database.async_store()  # its own connections: sees only what has committed

    async def look(request: Request) -> None:
        seen.append(await other.get(LOCAL, "POST /orders/{order_id}", "key-1"))

    app = build_app(store, runs, hook=look, lease=timedelta(seconds=20))
    try:
        async with client(app) as http:
            before = now_ms()
            assert (await http.post("/orders/1", headers=KEY)).status_code == 201
    finally:
        await other.close()
    [record] = seen
    assert record.status is RecordStatus.RESERVED and record.outcome is None
    assert before + 19_000 <= record.lease_expires_at_ms <= now_ms() + 20_000


async def test_the_lease_is_renewed_while_a_long_handler_runs(store, runs):
    app = build_app(store, runs, lease=timedelta(milliseconds=600))
    async with client(app) as http:
        first = asyncio.create_task(http.post("/slow?seconds=2", headers=KEY))
        await asyncio.sleep(1.3)  # twice the first lease (600 ms): renewals hold it
        busy = await http.post("/slow?seconds=2", headers=KEY)
        assert_problem(busy, 409, "request-in-progress")
        assert (await first).status_code == 200
    assert count(runs) == 1


async def test_a_stored_response_lives_for_ttl(store, runs):
    app = build_app(store, runs, ttl=timedelta(minutes=5))
    default = build_app(store, runs)
    async with client(app) as http, client(default) as http2:
        before = now_ms()
        await http.post("/orders/1", headers=KEY)
        await http2.post("/orders/2", headers={"Idempotency-Key": "k2"})
    record = await store.get(LOCAL, "POST /orders/{order_id}", "key-1")
    assert before + 300_000 <= record.expires_at_ms <= now_ms() + 300_000
    record = await store.get(LOCAL, "POST /orders/{order_id}", "k2")
    ttl = DEFAULT_TTL // timedelta(milliseconds=1)
    assert before + ttl <= record.expires_at_ms <= now_ms() + ttl
    assert await store.purge_expired(now_ms=now_ms() + 300_001) == 1


def tenant_from_header(scope: Any) -> TenantContext:
    org = request_header(scope, "x-org")
    if not org:
        raise InvalidInputError("send the X-Org header")
    return TenantContext.explicit_user_workspace(org, "main", None, "api")


async def test_tenants_from_a_header_keep_equal_keys_apart(store, runs):
    app = build_app(store, runs, tenant=tenant_from_header)
    async with client(app) as http:
        a = await http.post("/orders/1", headers={**KEY, "x-org": "org-a"})
        b = await http.post("/orders/1", headers={**KEY, "x-org": "org-b"})
        a2 = await http.post("/orders/1", headers={**KEY, "x-org": "org-a"})
        b2 = await http.post("/orders/1", headers={**KEY, "x-org": "org-b"})
        blank = await http.post("/orders/1", headers=KEY)  # no org: the tenant refuses it
    assert (a.json()["run"], b.json()["run"]) == (1, 2)
    assert (a2.content, b2.content) == (a.content, b.content)
    assert a2.headers["idempotent-replayed"] == b2.headers["idempotent-replayed"] == "true"
    assert assert_problem(blank, 400, "request-refused")["detail"] == "send the X-Org header"
    assert count(runs) == 2


async def test_the_fingerprint_hook_adds_and_drops_parts(store, runs):
    def with_header_without_body(scope: Any, parts: dict[str, str]) -> dict[str, str]:
        del parts["body"]
        return {**parts, "account": request_header(scope, "x-account") or ""}

    app = build_app(store, runs, fingerprint=with_header_without_body)
    async with client(app) as http:
        first = await http.post("/orders/1", content=b"one", headers={**KEY, "x-account": "1"})
        other_body = await http.post("/orders/1", content=b"two", headers={**KEY, "x-account": "1"})
        other_account = await http.post(
            "/orders/1", content=b"one", headers={**KEY, "x-account": "2"}
        )
    assert first.status_code == 201 and other_body.headers["idempotent-replayed"] == "true"
    assert_problem(other_account, 422, "key-reused")


async def test_the_operation_is_the_route_template_or_the_path_or_given(store, runs):
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bare"})

    async with client(build_app(store, runs)) as http:
        await http.post("/orders/42", headers=KEY)
    async with client(IdempotencyMiddleware(bare, store=store)) as http:
        await http.post("/orders/42", headers=KEY)
    named = build_app(store, runs, operation=lambda scope: "orders.create")
    async with client(named) as http:
        await http.post("/orders/42", headers=KEY)
    operations = set((await store.stats()).by_operation())
    assert operations == {"POST /orders/{order_id}", "POST /orders/42", "orders.create"}


def test_route_operation_reads_a_mounted_app_s_routes():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    async def endpoint(request: Any) -> Response:
        return Response()

    inner = Starlette(routes=[Route("/items/{item_id:int}", endpoint, methods=["POST"])])
    app = Starlette(routes=[Mount("/v1", app=inner)])
    scope = {"type": "http", "method": "POST", "path": "/v1/items/3", "root_path": "", "app": app}
    assert route_operation(scope) == "POST /v1/items/{item_id:int}"
    assert route_operation({**scope, "path": "/nowhere"}) == "POST /nowhere"


async def test_methods_not_guarded_pass_through(store, runs):
    app = build_app(store, runs)
    async with client(app) as http:
        one = await http.get("/orders/1", headers=KEY)
        two = await http.get("/orders/1", headers=KEY)
    assert (one.json()["run"], two.json()["run"]) == (1, 2)
    assert (await store.stats()).total == 0


async def test_a_request_body_over_max_request_body_is_413_and_not_run(store, runs):
    app = build_app(store, runs, max_request_body=10)
    async with client(app) as http:
        assert_problem(
            await http.post("/orders/1", content=b"x" * 11, headers=KEY), 413, "request-too-large"
        )

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as read
            for _ in range(3):
                yield b"xxxx"

        assert_problem(
            await http.post("/orders/1", content=chunks(), headers=KEY), 413, "request-too-large"
        )
        assert (await http.post("/orders/1", content=b"x" * 10, headers=KEY)).status_code == 201
    assert count(runs) == 1


async def test_a_store_that_cannot_be_reached_is_503_and_runs_nothing(database, runs):
    closed = database.async_store()
    await closed.close()
    app = build_app(closed, runs)
    async with client(app) as http:
        response = await http.post("/orders/1", headers=KEY)
    assert_problem(response, 503, "store-unavailable")
    assert response.headers["retry-after"] == "1" and count(runs) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"lease": 0},
        {"lease": timedelta(seconds=-1)},
        {"ttl": "1h"},
        {"max_body": -1},
        {"max_request_body": 1.5},
        {"lease": True},
    ],
)
def test_options_out_of_range_are_refused_in_one_line(options):
    with pytest.raises(ConfigurationError) as refused:
        IdempotencyMiddleware(lambda *a: None, store=None, **options)  # type: ignore[arg-type]
    assert "\n" not in str(refused.value) and next(iter(options)) in str(refused.value)


async def test_header_methods_and_replay_header_are_options(store, runs):
    app = build_app(
        store, runs, header="X-Request-Key", methods=("patch",), replay_header="X-Again"
    )
    async with client(app) as http:
        posted = [await http.post("/orders/1", headers={"X-Request-Key": "k"}) for _ in range(2)]
        first = await http.patch("/orders/1", headers={"X-Request-Key": "k"})  # no such route
        again = await http.patch("/orders/1", headers={"X-Request-Key": "k"})
        missing = build_app(store, runs, header="X-Request-Key", methods=("POST",), required=True)
    async with client(missing) as http:
        problem = assert_problem(await http.post("/orders/1"), 400, "key-missing")
    assert [p.json()["run"] for p in posted] == [1, 2]  # POST is not guarded here
    assert first.status_code == again.status_code == 405 and again.headers["x-again"] == "true"
    assert "X-Request-Key" in problem["title"]


def test_the_module_imports_no_framework_and_no_sqlalchemy():
    code = (
        "import sys, idemstore.asgi\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'httpx', 'uvicorn', 'sqlalchemy')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_an_app_cancelled_mid_response_releases_the_key(store, runs):
    app = build_app(store, runs)
    app.state.gate = asyncio.Event()  # never set: the stream stops after its first part
    sent: list[dict[str, Any]] = []
    first = asyncio.create_task(call_asgi(app, "/stream", "c", sent))
    while len(sent) < 2:
        await asyncio.sleep(0.01)
    first.cancel()  # as a server does when the client is gone
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await store.get(LOCAL, "POST /stream", "c") is None
    app.state.gate.set()
    async with client(app) as http:
        again = await http.post("/stream", headers={"Idempotency-Key": "c"})
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers
    assert count(runs) == 2
