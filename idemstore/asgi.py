"""The ``Idempotency-Key`` header in front of any ASGI app: :class:`IdempotencyMiddleware`.

Pure ASGI (no framework is imported here): ``app.add_middleware(IdempotencyMiddleware,
store=store)`` in Starlette or FastAPI, or ``IdempotencyMiddleware(app, store=store)`` around
any ASGI app. It follows the IETF draft *The Idempotency-Key HTTP Header Field* and answers
with RFC 9457 problem details (``application/problem+json``):

======  ===============================================================================
status  meaning for the client
======  ===============================================================================
400     the key is missing where required, or malformed (empty, too long, sent twice,
        not printable ASCII): fix the request
409     a request with this key is still running (its lease is live): retry after
        ``Retry-After`` seconds; it was not run
413     the request body is larger than ``max_request_body``: it was not run
422     the key was used with another request (method, path, query or body differ):
        use a new key; it was not run
503     the key store could not be reached (``Retry-After: 1``): retry; it was not run
other   the app's answer; with the ``Idempotent-Replayed: true`` header it is the first
        answer to this key, replayed byte for byte (the app was not called again)
======  ===============================================================================

How a request with a key travels: the body is read (at most ``max_request_body`` bytes, kept
in memory) and fingerprinted; the key is reserved with a lease, and only once the reservation
has committed is the app called (with the body replayed to it). The lease is renewed every
third of its length while the app runs. The response is kept as it streams (up to
``max_body`` bytes) and stored with the reservation's token *before its last part is sent*,
so a client that disconnects late does not lose it. A 5xx answer, an exception, a response
larger than ``max_body`` or a response that never ends releases the key (with the token):
a retry runs the app again. 4xx answers are stored like 2xx.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .errors import ConfigurationError, IdemstoreError, InvalidInputError, LeaseLostError
from .ids import idempotency_fingerprint
from .model import Conflict, Duplicate, IdempotencyRecord, Outcome, TenantContext
from .rules import now_ms

if TYPE_CHECKING:
    from .aio import AsyncIdempotencyStore

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]
#: ``tenant=``: the request's tenant (a coroutine function is awaited).
TenantFunction: TypeAlias = Callable[[Scope], "TenantContext | Awaitable[TenantContext]"]
#: ``fingerprint=``: the parts to hash, from the request and the default parts.
FingerprintFunction: TypeAlias = Callable[[Scope, dict[str, str]], Mapping[str, str]]

logger = logging.getLogger(__name__)

#: How long a reservation holds its key without a renewal (renewed every third of it while the
#: app runs): the longest a retry waits (409) after the process running the first request died.
DEFAULT_LEASE: Final = timedelta(seconds=10)
#: How long a stored response is replayed (``expires_at_ms``; ``purge_expired`` deletes it).
DEFAULT_TTL: Final = timedelta(hours=24)
#: The largest response body stored (1 MiB). Larger ones are served, not stored.
DEFAULT_MAX_BODY: Final = 1 << 20
#: The largest request body read (and held in memory) to fingerprint it (1 MiB).
DEFAULT_MAX_REQUEST_BODY: Final = 1 << 20
#: The longest key accepted, in characters (the draft sets none; Stripe's is 255).
DEFAULT_MAX_KEY_LENGTH: Final = 255
#: ``outcome_kind`` of a stored HTTP response.
OUTCOME_KIND: Final = "http.response"
#: Prefix of the problem ``type`` URIs.
PROBLEM_TYPE: Final = "urn:idemstore:problem:"
#: Response headers never stored nor replayed: RFC 9110's connection-specific fields (and any
#: named in ``Connection``), and ``Set-Cookie`` (a session belongs to the first client only).
NOT_REPLAYED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
    }
)


class _Refusal(Exception):
    """A request answered with a problem instead of running (internal)."""

    def __init__(self, status: int, name: str, title: str, detail: str, retry_after: int = 0):
        super().__init__(detail)
        self.status, self.name, self.title, self.detail = status, name, title, detail
        self.retry_after = retry_after


def _milliseconds(value: timedelta | int, name: str) -> int:
    if isinstance(value, timedelta):
        value = value // timedelta(milliseconds=1)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"{name} must be a positive timedelta or int milliseconds, not {value!r}"
        )
    return value


def request_header(scope: Scope, name: str) -> str | None:
    """The value of the request header ``name`` (any case) in an ASGI ``scope``, or None; the
    values of a header sent more than once are joined with ``", "``. For ``fingerprint=`` and
    ``tenant=`` functions."""
    wanted = name.lower().encode("latin-1")
    values = [v.decode("latin-1") for n, v in scope.get("headers", ()) if n.lower() == wanted]
    return ", ".join(values) if values else None


def route_operation(scope: Scope, app: object = None) -> str:
    """The default operation: ``"METHOD /route/path"``. The path is the route's template
    (``/orders/{order_id}``) when the Starlette/FastAPI app in ``scope["app"]`` (or ``app``) has
    a route matching the request, found by its own ``matches``; otherwise the request's path."""
    template = None
    routes = getattr(scope.get("app", app), "routes", None)
    if routes is not None:
        try:
            template = _route_template(routes, scope, "")
        except Exception:  # duck typing on a router we do not know: fall back to the path
            logger.debug("route lookup failed for %s", scope.get("path"), exc_info=True)
    return f"{scope['method']} {template or scope['path']}"


def _route_template(routes: Iterable[Any], scope: Scope, prefix: str) -> str | None:
    for route in routes:
        match, child = route.matches(scope)
        if getattr(match, "name", None) != "FULL":
            continue
        path = prefix + getattr(route, "path", "")
        inner = getattr(route, "routes", None)
        if inner is None:
            return path
        found = _route_template(inner, {**scope, **child}, path)
        if found is not None:
            return found
    return None


def parse_key(values: list[bytes], max_length: int) -> str:
    """The key of the ``Idempotency-Key`` values sent (raises ``_Refusal`` for a malformed one).

    The draft makes the value a Structured Field string (``"abc"``); the bare form (``abc``)
    that most clients send is accepted too, and both name the same key."""
    if len(values) != 1:
        raise _malformed(f"was sent {len(values)} times; send it once")
    try:
        text = values[0].decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        raise _malformed("is not ASCII") from None
    if text.startswith('"'):
        key = _sf_string(text)
    else:
        if "," in text:
            raise _malformed("holds a comma (several values?); quote a key that has one")
        key = text
    if not key.strip():
        raise _malformed("is empty")
    if len(key) > max_length:
        raise _malformed(f"is {len(key)} characters long; at most {max_length}")
    if not all(" " <= c <= "~" for c in key):
        raise _malformed("holds a character that is not printable ASCII")
    return key


def _sf_string(text: str) -> str:
    """An RFC 8941 string: ``"..."`` with ``\\"`` and ``\\\\`` escapes, nothing after it."""
    out: list[str] = []
    chars = iter(text[1:])
    for c in chars:
        if c == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                raise _malformed("has a bad escape in its quoted string")
            out.append(escaped)
        elif c == '"':
            if next(chars, None) is not None:
                raise _malformed("has text after its quoted string")
            return "".join(out)
        else:
            out.append(c)
    raise _malformed("has an unterminated quoted string")


def _malformed(why: str) -> _Refusal:
    return _Refusal(400, "key-malformed", "Idempotency-Key is malformed", f"The key {why}.")


def stored_response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Outcome:
    """The :class:`Outcome` that stores a response: ``details`` holds the status, the headers
    to replay (as latin-1 text) and the body, as text when it is UTF-8 without NUL, else as
    base64 (``body_base64``: 4/3 of its size)."""
    connection = {
        token.strip().lower().encode("latin-1")
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    kept = [
        [name.decode("latin-1"), value.decode("latin-1")]
        for name, value in headers
        if name.lower() not in NOT_REPLAYED and name.lower() not in connection
    ]
    details: dict[str, Any] = {"status": status, "headers": kept}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        details["body"] = text
    else:
        details["body_base64"] = base64.b64encode(body).decode("ascii")
    return Outcome(OUTCOME_KIND, now_ms(), details=details)


def replayed_response(outcome: Outcome) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a response stored by :func:`stored_response` (ValueError
    if the outcome is not one)."""
    details = outcome.details
    if outcome.outcome_kind != OUTCOME_KIND or not isinstance(details, dict):
        raise ValueError(f"outcome {outcome.outcome_kind!r} is not a stored HTTP response")
    status, stored_headers = details.get("status"), details.get("headers")
    if not isinstance(status, int) or not isinstance(stored_headers, list):
        raise ValueError("the stored response has no status or headers")
    headers = []
    for pair in stored_headers:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        ):
            raise ValueError("a stored header is not a [name, value] pair")
        headers.append((str(pair[0]).encode("latin-1"), str(pair[1]).encode("latin-1")))
    text, encoded = details.get("body"), details.get("body_base64")
    if isinstance(text, str):
        body = text.encode("utf-8")
    elif isinstance(encoded, str):
        body = base64.b64decode(encoded)
    else:
        raise ValueError("the stored response has no body")
    return status, headers, body


@dataclass(slots=True)
class _Captured:
    """The app's response as it goes out."""

    start: Message | None = None  # held until the first body part
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    storable: bool = True
    finished: bool = False


class IdempotencyMiddleware:
    """Answer requests that carry an ``Idempotency-Key`` header once: the first runs the app
    and its response is stored; later ones with the same key and request get it replayed.

    Parameters (all but ``app`` and ``store`` keyword-only, with defaults):

    - ``app``: the ASGI app to guard; ``store``: an :class:`~idemstore.AsyncIdempotencyStore`
      (migrated; the middleware does not close it).
    - ``methods``: the methods guarded (default POST and PATCH); others pass through.
    - ``header``: the key's header (default ``Idempotency-Key``).
    - ``required``: whether a guarded request without the key is refused (400); a bool or a
      function of the ASGI scope (default False: such a request passes through unguarded).
    - ``tenant``: a function (or coroutine function) from the scope to the
      :class:`~idemstore.TenantContext` the key belongs to (default the local tenant). An
      :class:`~idemstore.InvalidInputError` it raises, or a tenant the store refuses, is a 400.
    - ``operation``: the operation the key is scoped to, a string or a function of the scope
      (default :func:`route_operation`: ``"POST /orders/{order_id}"``, the route template when
      the app is Starlette's/FastAPI's, else the request path).
    - ``fingerprint``: a function ``(scope, parts) -> parts`` to add or drop parts of the
      request fingerprint; ``parts`` is ``{"method", "path", "query", "body"}`` (the body as its
      SHA-256) and the result's names and values, in order, are hashed with
      :func:`~idemstore.idempotency_fingerprint`.
    - ``lease``: how long a reservation holds the key without renewal (default
      :data:`DEFAULT_LEASE`, renewed every third of it while the app runs): after the process
      died, a retry waits at most this long. ``ttl``: how long a stored response is replayed
      (default :data:`DEFAULT_TTL`; None: until deleted). Both ``timedelta`` or int ms.
    - ``max_body``: the largest response body stored (default 1 MiB); a larger response is
      served, not stored, and the key released. ``max_request_body``: the largest request body
      read (held in memory; default 1 MiB; None: no limit); a larger one gets 413.
    - ``replay_header``: the header (value ``true``) added to a replayed response (default
      ``Idempotent-Replayed``). ``owner``: the records' owner. ``max_key_length``: default 255.

    Raises :class:`~idemstore.ConfigurationError` for an option out of range.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: AsyncIdempotencyStore,
        methods: Collection[str] = ("POST", "PATCH"),
        header: str = "Idempotency-Key",
        required: bool | Callable[[Scope], bool] = False,
        tenant: TenantFunction | None = None,
        operation: str | Callable[[Scope], str] | None = None,
        fingerprint: FingerprintFunction | None = None,
        lease: timedelta | int = DEFAULT_LEASE,
        ttl: timedelta | int | None = DEFAULT_TTL,
        max_body: int = DEFAULT_MAX_BODY,
        max_request_body: int | None = DEFAULT_MAX_REQUEST_BODY,
        replay_header: str = "Idempotent-Replayed",
        owner: str = "idemstore.asgi",
        max_key_length: int = DEFAULT_MAX_KEY_LENGTH,
    ) -> None:
        self.app = app
        self.store = store
        self.methods = frozenset(m.upper() for m in methods)
        self.header = header
        self._header = header.lower().encode("latin-1")
        self.required = required
        self.tenant = tenant
        self.operation = operation
        self.fingerprint = fingerprint
        self.lease_ms = _milliseconds(lease, "lease")
        self.ttl_ms = None if ttl is None else _milliseconds(ttl, "ttl")
        for name, value in (("max_body", max_body), ("max_key_length", max_key_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an int >= 0, not {value!r}")
        if max_request_body is not None and (
            isinstance(max_request_body, bool)
            or not isinstance(max_request_body, int)
            or max_request_body < 0
        ):
            raise ConfigurationError(
                f"max_request_body must be an int >= 0 or None, not {max_request_body!r}"
            )
        self.max_body = max_body
        self.max_request_body = max_request_body
        self.max_key_length = max_key_length
        self.replay_header = replay_header.lower().encode("latin-1")
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope.get("headers", ()) if name.lower() == self._header]
        try:
            if not values:
                if self.required is True or (callable(self.required) and self.required(scope)):
                    raise _Refusal(
                        400,
                        "key-missing",
                        f"{self.header} is missing",
                        f"This operation requires an {self.header} header.",
                    )
                await self.app(scope, receive, send)
                return
            key = parse_key(values, self.max_key_length)
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client left before its request was read: nothing reserved
            await self._guard(scope, receive, send, key, body)
        except _Refusal as refusal:
            await self._problem(send, refusal)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_request_body
        length = request_header(scope, "content-length")
        if limit is not None and length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _guard(
        self, scope: Scope, receive: Receive, send: Send, key: str, body: bytes
    ) -> None:
        parts = {
            "method": str(scope["method"]),
            "path": str(scope["path"]),
            "query": bytes(scope.get("query_string", b"")).decode("latin-1"),
            "body": "sha256:" + hashlib.sha256(body).hexdigest(),
        }
        if self.fingerprint is not None:
            parts = dict(self.fingerprint(scope, parts))
        request_fingerprint = idempotency_fingerprint(itertools.chain.from_iterable(parts.items()))
        if self.operation is None:
            operation = route_operation(scope, self.app)
        elif isinstance(self.operation, str):
            operation = self.operation
        else:
            operation = self.operation(scope)
        try:
            tenant = await self._tenant(scope)
            result = await self.store.reserve(
                tenant,
                operation,
                key,
                owner=self.owner,
                request_fingerprint=request_fingerprint,
                lease=self.lease_ms,
                ttl=self.ttl_ms,
            )
        except InvalidInputError as error:
            raise _Refusal(400, "request-refused", "Request refused", str(error)) from None
        except IdemstoreError as error:
            logger.warning("idempotency key store unavailable: %s", error)
            raise _Refusal(
                503,
                "store-unavailable",
                "Idempotency key store unavailable",
                "The request was not run; retry it.",
                retry_after=1,
            ) from None
        if isinstance(result, Conflict):
            raise _Refusal(
                422,
                "key-reused",
                f"{self.header} is already used",
                f"This {self.header} was used with another request (method, path, query or "
                "body); use a new key for a new request.",
            )
        if isinstance(result, Duplicate):
            await self._replay(send, result.record)
            return
        run = _Run(self, scope, tenant, operation, key, request_fingerprint, result.token)
        await run.execute(body, receive, send)

    async def _tenant(self, scope: Scope) -> TenantContext:
        if self.tenant is None:
            return TenantContext.local_implicit()
        value = self.tenant(scope)
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, TenantContext):
            raise TypeError(f"tenant= returned {type(value).__name__}, not a TenantContext")
        return value

    async def _replay(self, send: Send, record: IdempotencyRecord) -> None:
        if record.outcome is None:
            until = record.lease_expires_at_ms
            wait = 1 if until is None else max(1, math.ceil((until - now_ms()) / 1000))
            raise _Refusal(
                409,
                "request-in-progress",
                f"A request is outstanding for this {self.header}",
                "A request with this key is still being processed; retry later.",
                retry_after=wait,
            )
        try:
            status, headers, body = replayed_response(record.outcome)
        except ValueError as error:
            raise _Refusal(
                422,
                "key-reused",
                f"{self.header} is already used",
                f"This key holds an outcome that is not an HTTP response ({error}).",
            ) from None
        headers.append((self.replay_header, b"true"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _problem(self, send: Send, refusal: _Refusal) -> None:
        body = json.dumps(
            {
                "type": PROBLEM_TYPE + refusal.name,
                "title": refusal.title,
                "status": refusal.status,
                "detail": refusal.detail,
            }
        ).encode("utf-8")
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if refusal.retry_after:
            headers.append((b"retry-after", str(refusal.retry_after).encode("ascii")))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _too_large(limit: int) -> _Refusal:
    return _Refusal(
        413,
        "request-too-large",
        "Request body too large",
        f"A request with an idempotency key may have at most {limit} bytes of body.",
    )


class _Run:
    """One request that holds its key: runs the app, keeps its response, stores or releases."""

    def __init__(
        self,
        middleware: IdempotencyMiddleware,
        scope: Scope,
        tenant: TenantContext,
        operation: str,
        key: str,
        request_fingerprint: str,
        token: str,
    ) -> None:
        self.m = middleware
        self.scope = scope
        self.where = (tenant, operation, key)
        self.request_fingerprint = request_fingerprint
        self.token = token
        self.response = _Captured()
        self.settled = False  # stored or released
        self.renewal: asyncio.Task[None] | None = None

    async def execute(self, body: bytes, receive: Receive, send: Send) -> None:
        body_given = False

        async def app_receive() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def app_send(message: Message) -> None:
            await self.send(message, send)

        self.renewal = asyncio.create_task(self.renew())
        try:
            await self.m.app(self.scope, app_receive, app_send)
        finally:
            # An exception, a cancellation, or an app that ended without finishing its
            # response: the key goes back (a retry runs again).
            await self.settle(store=False)

    async def send(self, message: Message, send: Send) -> None:
        response = self.response
        kind = message["type"]
        if kind == "http.response.start":
            response.start = message
            response.status = int(message["status"])
            response.headers = list(message.get("headers", ()))
            response.storable = response.status < 500
            return
        if kind == "http.response.body":
            chunk = bytes(message.get("body", b""))
            if response.storable:
                response.size += len(chunk)
                if response.size > self.m.max_body:
                    response.storable = False
                    response.chunks.clear()
                else:
                    response.chunks.append(chunk)
            if not message.get("more_body", False):
                response.finished = True
                await self.settle(store=response.storable)
        elif kind.startswith("http.response."):  # pathsend, trailers...: not stored
            response.storable = False
        if response.start is not None:
            start, response.start = response.start, None
            await send(start)
        await send(message)

    async def settle(self, *, store: bool) -> None:
        """Store the response or release the key, once, shielded from a cancellation."""
        if self.settled:
            return
        self.settled = True
        if self.renewal is not None:
            self.renewal.cancel()
            await asyncio.gather(self.renewal, return_exceptions=True)
        write = self.store() if store else self.release()
        task = asyncio.ensure_future(write)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.gather(task, return_exceptions=True)
            raise

    async def store(self) -> None:
        tenant, operation, key = self.where
        response = self.response
        outcome = stored_response(response.status, response.headers, b"".join(response.chunks))
        try:
            await self.m.store.complete(tenant, operation, key, outcome, token=self.token)
        except LeaseLostError:
            logger.warning(
                "%s %r: its lease ended before the response was stored (another request may "
                "have run it); served, not stored",
                operation,
                key,
            )
        except IdemstoreError as error:
            logger.error("%s %r: response not stored: %s", operation, key, error)

    async def release(self) -> None:
        tenant, operation, key = self.where
        try:
            await self.m.store.release(
                tenant, operation, key, self.request_fingerprint, token=self.token
            )
        except IdemstoreError as error:
            logger.error("%s %r: key not released: %s", operation, key, error)

    async def renew(self) -> None:
        tenant, operation, key = self.where
        every = self.m.lease_ms / 3000
        while True:
            await asyncio.sleep(every)
            try:
                await self.m.store.renew(tenant, operation, key, self.token, lease=self.m.lease_ms)
            except LeaseLostError:
                logger.warning("%s %r: lease lost while the app ran", operation, key)
                return
            except IdemstoreError as error:
                logger.warning("%s %r: lease not renewed: %s", operation, key, error)


__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_REQUEST_BODY",
    "DEFAULT_TTL",
    "IdempotencyMiddleware",
    "replayed_response",
    "request_header",
    "route_operation",
    "stored_response",
]
