"""The ``idemstore`` command.

    idemstore [--database-url URL] migrate
    idemstore [--database-url URL] stats [--json]
    idemstore [--database-url URL] get [--org ORG --workspace WS --deployment D] OPERATION KEY
    idemstore [--database-url URL] reserve [tenant options] --owner O --fingerprint F OPERATION KEY
    idemstore [--database-url URL] purge-expired [--now-ms MS] [--batch-size N]

The URL comes from ``--database-url``, else ``$IDEMSTORE_DATABASE_URL``, else the embedded
default ``sqlite:///idemstore.db``. Passwords are never printed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc

from . import __version__, ops
from .config import ENV_VAR, redact, resolve_url, safe_url
from .errors import IdemstoreError
from .model import IdempotencyRecord, RecordStatus, TenantContext, TenantSource
from .store import IdempotencyStore

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser that may take its arguments only when it is chosen
    (``populate``), so that the module defining them, and what that module imports, loads
    only for that subcommand."""

    def __init__(
        self,
        *args: Any,
        populate: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def parse_known_args(  # type: ignore[override]  # one signature for the overloads
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)
        return super().parse_known_args(args, namespace)


def record_as_json(record: IdempotencyRecord) -> dict[str, Any]:
    """A record as the Rust module writes it (field names, order and omissions)."""
    from .jsonfile import record_to_json

    return record_to_json(record)


def _open(
    args: argparse.Namespace, *, migrate: bool = False, read_only: bool = False
) -> IdempotencyStore:
    """The store at ``--database-url``; ``read_only`` for commands that only read (nothing
    is created or changed, not even SQLite's journal mode)."""
    return IdempotencyStore.from_url(args.database_url, migrate=migrate, read_only=read_only)


def _tenant(args: argparse.Namespace) -> TenantContext:
    return TenantContext(
        args.org,
        args.workspace,
        args.deployment,
        args.actor,
        TenantSource(args.source),
    )


def cmd_migrate(args: argparse.Namespace) -> int:
    with _open(args, migrate=True) as store:
        store.check_schema()
    print(f"{safe_url(resolve_url(args.database_url))}: idemstore schema is at head")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        stats = store.stats()
    by_status = {status.value: n for status, n in stats.by_status().items()}
    if args.json:
        payload = {
            "database": safe_url(resolve_url(args.database_url)),
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
    print(f"database: {safe_url(resolve_url(args.database_url))}")
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
    with _open(args, read_only=True) as store:
        record = store.get(_tenant(args), args.operation, args.key)
    if record is None:
        print("no such record", file=sys.stderr)
        return 1
    from .jsonfile import record_text  # as the file has it, whatever the details' depth

    print(record_text(record))
    return 0


def cmd_reserve(args: argparse.Namespace) -> int:
    with _open(args) as store:
        result = store.reserve(
            _tenant(args),
            args.operation,
            args.key,
            args.owner,
            args.fingerprint,
            first_seen_event_id=args.event_id,
            expires_at_ms=args.expires_at_ms,
        )
    print(
        f"{type(result).__name__}: {result.record.record_id} "
        f"(status {result.record.status.value}, conflicts {result.record.conflict_count})"
    )
    return 0


def cmd_purge_expired(args: argparse.Namespace) -> int:
    with _open(args) as store:
        removed = store.purge_expired(now_ms=args.now_ms, batch_size=args.batch_size)
    print(f"purged {removed} expired record(s)")
    return 0


def _add_tenant_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tenant (defaults: the local_implicit tenant)")
    group.add_argument("--org", default="local", help="org_id (default: local)")
    group.add_argument("--workspace", default="local", help="workspace_id (default: local)")
    group.add_argument("--deployment", default=None, help="deployment_id (default: none)")
    group.add_argument("--actor", default=None, help="actor_id, stored with new records")
    group.add_argument(
        "--source",
        default=TenantSource.LOCAL_IMPLICIT.value,
        choices=[s.value for s in TenantSource],
        help="tenant source, stored with new records",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idemstore",
        description="Idempotency keys in SQL: migrate, inspect, import and export.",
    )
    parser.add_argument("--version", action="version", version=f"idemstore {__version__}")
    parser.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help=f"database URL (default: ${ENV_VAR}, else sqlite:///idemstore.db)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    migrate = commands.add_parser("migrate", help="create or upgrade the schema (to head)")
    migrate.set_defaults(handler=cmd_migrate)

    stats = commands.add_parser("stats", help="record counts by status and operation")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=cmd_stats)

    get = commands.add_parser("get", help="show one record as JSON")
    _add_tenant_options(get)
    get.add_argument("operation")
    get.add_argument("key")
    get.set_defaults(handler=cmd_get)

    reserve = commands.add_parser("reserve", help="reserve a key and print the result kind")
    _add_tenant_options(reserve)
    reserve.add_argument("--owner", required=True)
    reserve.add_argument("--fingerprint", required=True, help="request fingerprint")
    reserve.add_argument("--event-id", default=None, help="first_seen_event_id")
    reserve.add_argument("--expires-at-ms", type=int, default=None)
    reserve.add_argument("operation")
    reserve.add_argument("key")
    reserve.set_defaults(handler=cmd_reserve)

    purge = commands.add_parser("purge-expired", help="delete records whose expiry has passed")
    purge.add_argument("--now-ms", type=int, default=None, help="the clock (default: now)")
    purge.add_argument("--batch-size", type=int, default=ops.DEFAULT_PURGE_BATCH)
    purge.set_defaults(handler=cmd_purge_expired)

    for extension in _EXTENSIONS:
        extension(commands)
    return parser


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(f"idemstore.{name}")
    except ModuleNotFoundError:  # pragma: no cover - both ship with the package
        return None


def _extension_bench(commands: Any) -> None:
    # Its options are added when ``bench`` is chosen: idemstore.bench imports the async store
    # (asyncio, sqlalchemy.ext.asyncio, sqlalchemy.orm), multiprocessing and more.
    if importlib.util.find_spec("idemstore.bench") is None:  # pragma: no cover - it ships
        return
    commands.add_parser("bench", help="measure the store against its limits", populate=_bench)


def _bench(parser: argparse.ArgumentParser) -> None:
    bench = importlib.import_module("idemstore.bench")
    bench.add_arguments(parser)
    parser.set_defaults(handler=bench.run)


def _extension_transfer(commands: Any) -> None:
    importer = _optional_module("importer")
    if importer is not None:
        importer.add_commands(commands)


_EXTENSIONS: list[Callable[[Any], None]] = [_extension_transfer, _extension_bench]


def main(argv: Sequence[str] | None = None, *, prestarted: Any = None) -> int:
    """The command. ``prestarted``: parse workers :mod:`idemstore._entry` started for
    ``import`` before this module was loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prestarted = prestarted
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except IdemstoreError as error:
        print(f"idemstore: error: {error}", file=sys.stderr)
        return 2
    except sa_exc.DBAPIError as error:
        url = resolve_url(args.database_url)
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        print(
            f"idemstore: database error on {safe_url(url)}: {redact(reason, url)}",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # The reader went away (``idemstore stats | head``): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("idemstore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
