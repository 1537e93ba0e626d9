"""A FastAPI app behind :class:`~idemstore.asgi.IdempotencyMiddleware`, for tests/test_asgi.py,
tests/test_asgi_server.py (under uvicorn, from the environment) and tests/bench_asgi.py.

Each handler that does work appends one line to the ``runs`` file (``path key``) before it
answers: the tests count the app's runs there, not in their own memory.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from idemstore import AsyncIdempotencyStore
from idemstore.asgi import IdempotencyMiddleware

#: Binary, not UTF-8: stored as base64, replayed byte for byte.
BINARY = bytes(range(256)) * 4


def build_app(
    store: AsyncIdempotencyStore | None,
    runs: Path,
    *,
    hook: Callable[[Request], Awaitable[None]] | None = None,
    lifespan: Any = None,
    **options: Any,
) -> FastAPI:
    """The test app; with ``store`` None, without the middleware (the bench's baseline)."""
    app = FastAPI(lifespan=lifespan)
    app.state.gate = None  # an asyncio.Event the streaming handler waits on after its first part

    async def ran(request: Request) -> int:
        """Count this run in the file; the number of runs so far."""
        key = request.headers.get("idempotency-key", "-")
        with runs.open("a", encoding="utf-8") as file:
            file.write(f"{request.url.path} {key}\n")
        if hook is not None:
            await hook(request)
        return len(runs.read_text(encoding="utf-8").splitlines())

    @app.post("/orders/{order_id}")
    async def create_order(order_id: str, request: Request) -> Response:
        body = await request.body()
        n = await ran(request)
        response = JSONResponse(
            {"order_id": order_id, "run": n, "body": body.decode()},
            status_code=201,
            headers={"x-order": order_id, "location": f"/orders/{order_id}"},
        )
        response.set_cookie("session", f"s{n}")
        response.headers["connection"] = "x-hop"
        response.headers["x-hop"] = "only-this-hop"
        return response

    @app.get("/orders/{order_id}")
    async def read_order(order_id: str, request: Request) -> dict[str, Any]:
        return {"order_id": order_id, "run": await ran(request)}

    @app.post("/binary")
    async def binary(request: Request) -> Response:
        await ran(request)
        return Response(BINARY, media_type="application/octet-stream")

    @app.post("/status/{code}")
    async def status(code: int, request: Request) -> Response:
        n = await ran(request)
        return JSONResponse({"run": n}, status_code=code)

    @app.post("/boom")
    async def boom(request: Request) -> Response:
        await ran(request)
        raise RuntimeError("the handler failed")

    @app.post("/big/{size}")
    async def big(size: int, request: Request) -> Response:
        await ran(request)
        return Response(b"x" * size, media_type="text/plain")

    @app.post("/slow")
    async def slow(request: Request, seconds: float = 0.3) -> dict[str, Any]:
        """Sleeps ``seconds``, or the X-Sleep header's seconds (not in the fingerprint)."""
        n = await ran(request)
        await asyncio.sleep(float(request.headers.get("x-sleep", seconds)))
        return {"run": n}

    @app.post("/stream")
    async def stream(request: Request, parts: int = 3) -> Response:
        n = await ran(request)

        async def body() -> AsyncIterator[bytes]:
            for i in range(parts):
                yield f"part {i} of run {n}\n".encode()
                if i == 0 and app.state.gate is not None:
                    await app.state.gate.wait()

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/trivial")
    async def trivial() -> dict[str, bool]:
        return {"ok": True}

    if store is not None:
        app.add_middleware(IdempotencyMiddleware, store=store, **options)
    return app


def app_from_env() -> FastAPI:
    """The app as uvicorn serves it (``--factory``): the store at ``$IDEMSTORE_ASGI_URL`` (in
    schema ``$IDEMSTORE_ASGI_SCHEMA`` on PostgreSQL), runs counted in ``$IDEMSTORE_ASGI_RUNS``,
    lease ``$IDEMSTORE_ASGI_LEASE_MS``; without the middleware when ``$IDEMSTORE_ASGI_PLAIN``
    is 1. The store is closed at shutdown."""
    runs = Path(os.environ["IDEMSTORE_ASGI_RUNS"])
    if os.environ.get("IDEMSTORE_ASGI_PLAIN") == "1":
        return build_app(None, runs)
    options: dict[str, Any] = {}
    schema = os.environ.get("IDEMSTORE_ASGI_SCHEMA")
    if schema:
        options["connect_args"] = {"server_settings": {"search_path": schema}}
    store = AsyncIdempotencyStore.from_url(os.environ["IDEMSTORE_ASGI_URL"], **options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await store.close()

    lease_ms = int(os.environ.get("IDEMSTORE_ASGI_LEASE_MS", "10000"))
    return build_app(store, runs, lifespan=lifespan, lease=lease_ms)
