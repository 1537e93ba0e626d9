"""The commands on the database: ``migrate``, ``stats``, ``get``, ``reserve``, ``complete``,
``release`` and ``purge-expired``, what they print, and how their options become values (the
tenant, ``KIND:ID`` references, ``--details``).

The store (and with it SQLAlchemy) is imported when a command runs, not when this module is:
the command line parses its arguments before the database layer loads (see
:mod:`idemstore.cli.parser`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Final

from ..errors import InvalidInputError, LeaseLostError
from ..model import (
    IdempotencyRecord,
    JSONValue,
    Outcome,
    RecordStatus,
    TenantContext,
    TenantSource,
)

if TYPE_CHECKING:
    from ..store import IdempotencyStore

#: The tenant options' defaults: the ``local_implicit`` tenant.
DEFAULT_ORG: Final = "local"
DEFAULT_WORKSPACE: Final = "local"


def open_store(
    args: argparse.Namespace, *, migrate: bool = False, read_only: bool = False
) -> IdempotencyStore:
    """The store at ``--database-url``; ``read_only`` for commands that only read (nothing
    is created or changed, not even SQLite's journal mode)."""
    from ..store import IdempotencyStore

    return IdempotencyStore.from_url(args.database_url, migrate=migrate, read_only=read_only)


def database_name(args: argparse.Namespace) -> str:
    """The database of ``--database-url`` as it may be printed (no secrets)."""
    from ..db.engine import resolve_url, safe_url

    return safe_url(resolve_url(args.database_url))


def database_error(error: BaseException, url: str | None) -> str | None:
    """For a driver error (SQLAlchemy's wrapper): ``database error on URL: reason``, one line,
    secrets masked; None for any other error."""
    exc = sys.modules.get("sqlalchemy.exc")  # loaded if such an error can have happened
    if exc is None or not isinstance(error, exc.DBAPIError):
        return None
    from ..db.engine import redact, resolve_url, safe_url

    resolved = resolve_url(url)
    reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
    return f"database error on {safe_url(resolved)}: {redact(reason, resolved)}"


def _tenant(args: argparse.Namespace) -> TenantContext:
    return TenantContext(
        DEFAULT_ORG if args.org is None else args.org,
        DEFAULT_WORKSPACE if args.workspace is None else args.workspace,
        args.deployment,
        args.actor,
        TenantSource(args.source),
    )


def _tenant_named(args: argparse.Namespace) -> bool:
    """Whether the command line names a tenant (else it is the local_implicit one)."""
    return any(getattr(args, name) is not None for name in ("org", "workspace", "deployment"))


def describe_tenant(tenant: TenantContext) -> str:
    """``org 'a', workspace 'b'[, deployment 'c']`` (what finds a record, no more)."""
    text = f"org {tenant.org_id!r}, workspace {tenant.workspace_id!r}"
    if tenant.deployment_id is not None:
        text += f", deployment {tenant.deployment_id!r}"
    return text


def _no_record(args: argparse.Namespace, tenant: TenantContext) -> str:
    return (
        f"no such record: operation {args.operation!r}, key {args.key!r} "
        f"in tenant {describe_tenant(tenant)}"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    """``idemstore migrate``: upgrade the schema to head and say what that did (created,
    upgraded from one revision to another, already at head); ``--status``: show where the
    schema is, changing nothing."""
    if args.status:
        return _migrate_status(args)
    from ..db.migrate import migrate_engine

    with open_store(args) as store:
        before, after = migrate_engine(store.engine)
    where = database_name(args)
    if before is None:
        done = "created"
        line = f"{where}: created the idemstore schema at {after}"
    elif before != after:
        done = "upgraded"
        line = f"{where}: upgraded the idemstore schema from {before} to {after}"
    else:
        done = "nothing"
        line = f"{where}: the idemstore schema is already at {after} (head)"
    if args.json:
        payload = {"database": where, "done": done, "before": before, "after": after}
        print(json.dumps(payload, indent=2))
    else:
        print(line)
    return 0


def _refusal(found: tuple[str, ...], where: str) -> str:
    """Why a store would refuse a database at ``found`` (an unknown revision, several)."""
    from ..db.migrate import check_revisions
    from ..errors import SchemaNotReadyError

    try:
        check_revisions(found, where)
    except SchemaNotReadyError as error:
        return str(error)
    return "at head"  # pragma: no cover - the callers pass a state a store refuses


def _migrate_status(args: argparse.Namespace) -> int:
    from ..db.migrate import schema_status

    with open_store(args, read_only=True) as store:
        status = schema_status(store.engine)
    if args.json:
        payload = {
            "database": status.database,
            "current": list(status.current),
            "head": status.head,
            "at_head": status.at_head,
            "missing_file": status.missing_file,
            "history": [
                {"revision": r.revision, "message": r.message, "applied": r.applied}
                for r in status.history
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    if status.missing_file is not None:
        current = f"none (the file {status.missing_file} does not exist)"
    elif not status.current:
        current = "none (no idemstore schema)"
    else:
        current = ", ".join(status.current)
    if status.at_head:
        verdict = "at head"
    elif not status.current:
        verdict = "no schema: run `idemstore migrate` to create it"
    elif len(status.current) == 1 and any(r.revision == status.current[0] for r in status.history):
        verdict = "behind the head: run `idemstore migrate` to upgrade it"
    else:
        verdict = _refusal(status.current, status.database)
    print(f"database: {status.database}")
    print(f"current:  {current}")
    print(f"head:     {status.head}")
    print(f"state:    {verdict}")
    print("history (oldest first):")
    width = max(len(r.revision) for r in status.history)
    for r in status.history:
        mark = "applied" if r.applied else "pending"
        print(f"  {mark:<8} {r.revision:<{width}}  {r.message}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """``idemstore stats``: records by operation and status, as a table or JSON."""
    with open_store(args, read_only=True) as store:
        stats = store.stats()
    by_status = {status.value: n for status, n in stats.by_status().items()}
    if args.json:
        payload = {
            "database": database_name(args),
            "total": stats.total,
            "by_status": by_status,
            "by_operation": stats.by_operation(),
            "by_operation_and_status": [
                {"operation": op, "status": status.value, "count": n}
                for (op, status), n in sorted(stats.counts.items())
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(f"database: {database_name(args)}")
    print(f"records:  {stats.total}")
    print()
    statuses = [s.value for s in RecordStatus]
    width = max([len("operation"), *(len(op) for op in stats.by_operation())])
    print(f"{'operation':<{width}}  " + "  ".join(f"{s:>10}" for s in statuses) + f"  {'total':>8}")
    for operation, total in sorted(stats.by_operation().items()):
        cells = [stats.counts.get((operation, RecordStatus(s)), 0) for s in statuses]
        print(f"{operation:<{width}}  " + "  ".join(f"{n:>10}" for n in cells) + f"  {total:>8}")
    print(
        f"{'(all)':<{width}}  "
        + "  ".join(f"{by_status[s]:>10}" for s in statuses)
        + f"  {stats.total:>8}"
    )
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    """``idemstore get``: one record as the file has it, by tenant, operation and key or by
    ``--record-id``; exit 1 when there is none (with a hint on stderr when no tenant was
    named: which one was searched, how to name another)."""
    from ..db import ops

    if args.record_id is not None:
        if args.operation is not None or _tenant_named(args):
            raise InvalidInputError(
                "get: --record-id names the record whatever its tenant: give it without "
                "OPERATION KEY and without --org/--workspace/--deployment"
            )
        with open_store(args, read_only=True) as store:
            record = store.run(ops.get_by_record_id(args.record_id))
        if record is None:
            _say(f"no such record: record id {args.record_id!r}")
            return 1
        return _print_record(record)
    if args.key is None:
        raise InvalidInputError("get: give OPERATION KEY (and the tenant), or --record-id ID")
    tenant = _tenant(args)
    with open_store(args, read_only=True) as store:
        record = store.get(tenant, args.operation, args.key)
        legacy = None
        if record is None and not _tenant_named(args):
            from ..transfer.fields import LEGACY_TENANT

            legacy = store.get(LEGACY_TENANT, args.operation, args.key)
    if record is not None:
        return _print_record(record)
    _say(_no_record(args, tenant))
    if not _tenant_named(args):
        _say(
            "hint: that is the default tenant (local_implicit); name another with "
            "--org ORG --workspace WS [--deployment D], or look the record up with "
            "--record-id ID"
        )
    if legacy is not None:
        _say(
            "hint: a record with this operation and key is under the legacy tenant (records "
            "imported from a file without tenant_context): add --org local --workspace "
            f"default, or --record-id {legacy.record_id}"
        )
    return 1


def _print_record(record: IdempotencyRecord) -> int:
    from ..transfer.writer import record_text  # as the file has it, whatever its depth

    print(record_text(record))
    return 0


def cmd_reserve(args: argparse.Namespace) -> int:
    """``idemstore reserve``: reserve a key; print the result kind and the record's state
    (``Reserved``: the token on a second line, and the lease's end)."""
    from ..model import Reserved

    with open_store(args) as store:
        result = store.reserve(
            _tenant(args),
            args.operation,
            args.key,
            args.owner,
            args.fingerprint,
            first_seen_event_id=args.event_id,
            expires_at_ms=args.expires_at_ms,
            lease=args.lease_ms,
            ttl=args.ttl_ms,
        )
    record = result.record
    token = result.token if isinstance(result, Reserved) else None
    if args.json:
        payload = {
            "result": type(result).__name__,
            "record_id": record.record_id,
            "status": record.status.value,
            "conflict_count": record.conflict_count,
            "token": token,
            "lease_expires_at_ms": record.lease_expires_at_ms,
            "expires_at_ms": record.expires_at_ms,
        }
        print(json.dumps(payload, indent=2))
        return 0
    print(
        f"{type(result).__name__}: {record.record_id} "
        f"(status {record.status.value}, conflicts {record.conflict_count})"
    )
    if token is not None:
        print(f"token: {token}")
    if record.in_progress_until_ms is not None:
        print(f"lease until: {record.in_progress_until_ms} (lease_expires_at_ms)")
    return 0


def reference(text: str | None, option: str) -> tuple[str | None, str | None]:
    """``KIND:ID`` as (kind, id) (None: (None, None)); both parts non-empty, split at the
    first colon (the id may hold more). :class:`InvalidInputError` naming ``option``."""
    if text is None:
        return None, None
    kind, colon, ident = text.partition(":")
    if not colon or not kind.strip() or not ident.strip():
        raise InvalidInputError(
            f"{option} takes KIND:ID, e.g. message:msg-42 (a kind, a colon, an id), not {text!r}"
        )
    return kind, ident


def details_value(text: str | None) -> JSONValue:
    """``--details``: a JSON value, ``@FILE`` (its text) or ``@-`` (standard input); None
    when not given. :class:`InvalidInputError` (one line) for a file that cannot be read,
    text that is not JSON, NaN or Infinity, or an object that repeats a key."""
    if text is None:
        return None
    where = "--details"
    if text.startswith("@"):
        name = text[1:]
        where = f"--details {text}"
        try:
            if name == "-":
                text = sys.stdin.read()
            else:
                with open(name, encoding="utf-8") as file:
                    text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise InvalidInputError(f"{where}: cannot read {name}: {reason}") from None
    try:
        return parse_json(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{where} is not JSON: {error}") from None
    except ValueError as error:  # NaN, a key twice
        raise InvalidInputError(f"{where}: {error}") from None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"an object repeats the key {key!r}")
        seen.add(key)
    return dict(pairs)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    from ..jsonvalue import OutOfRange, rust_float

    try:
        return rust_float(text)
    except OutOfRange:
        raise ValueError(f"the number {text} is out of range (beyond a float)") from None


def parse_json(text: str) -> JSONValue:
    """A JSON value as a caller's details: strict JSON (no NaN or Infinity, no number beyond
    a float, no key twice in an object, which serde_json would keep silently as the last).
    ``ValueError`` saying why not."""
    try:
        value: JSONValue = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float
        )
    except RecursionError:  # deeper than any details may be: complete() says so
        from ..jsonvalue import loads

        value = loads(text)
    return value


def cmd_complete(args: argparse.Namespace) -> int:
    """``idemstore complete``: store the outcome; print the record's state (``--json``: the
    record). Exit 1 when the tenant has no such record. Everything given is checked before
    the database is opened."""
    from ..rules import now_ms

    primary = reference(args.primary_ref, "--primary-ref")
    secondary = reference(args.secondary_ref, "--secondary-ref")
    outcome = Outcome(
        outcome_kind=args.outcome_kind,
        completed_at_ms=now_ms() if args.completed_at_ms is None else args.completed_at_ms,
        primary_ref_kind=primary[0],
        primary_ref_id=primary[1],
        secondary_ref_kind=secondary[0],
        secondary_ref_id=secondary[1],
        details=details_value(args.details),
    )
    tenant = _tenant(args)
    with open_store(args) as store:
        try:
            record = store.complete(tenant, args.operation, args.key, outcome, token=args.token)
        except LeaseLostError as error:
            _say(str(error))
            return 1
    if record is None:
        _say(_no_record(args, tenant))
        return 1
    if args.json:
        return _print_record(record)
    print(
        f"Completed: {record.record_id} (outcome {outcome.outcome_kind}, "
        f"completed_at_ms {outcome.completed_at_ms})"
    )
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """``idemstore release``: delete a still-reserved record with this fingerprint; exit 1
    when nothing was released."""
    from ..ids import idempotency_record_id
    from ..rules import rust_trim

    tenant = _tenant(args)
    with open_store(args) as store:
        released = store.release(
            tenant, args.operation, args.key, args.fingerprint, token=args.token
        )
    record_id = idempotency_record_id(tenant, rust_trim(args.operation), rust_trim(args.key))
    if args.json:
        print(json.dumps({"released": released, "record_id": record_id}, indent=2))
    elif released:
        print(f"Released: {record_id}")
    if not released:
        _say(
            f"nothing released: tenant {describe_tenant(tenant)} has no record for operation "
            f"{args.operation!r}, key {args.key!r} that is still reserved with fingerprint "
            f"{args.fingerprint!r}" + (" under this token" if args.token is not None else "")
        )
        return 1
    return 0


def cmd_purge_expired(args: argparse.Namespace) -> int:
    """``idemstore purge-expired``: delete expired records in batches; print how many."""
    with open_store(args) as store:
        removed = store.purge_expired(now_ms=args.now_ms, batch_size=args.batch_size)
    print(f"purged {removed} expired record(s)")
    return 0
