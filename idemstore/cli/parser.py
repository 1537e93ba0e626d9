"""The ``idemstore`` command's ONE argparse definition.

It imports nothing heavy: the handlers' modules (:mod:`idemstore.cli.database`,
:mod:`idemstore.cli.transfer`) load the store only when a handler runs, and the bench's options
are added only when ``bench`` is chosen. So the command can parse its arguments, and start an
import's parse workers (:func:`idemstore.cli.prestart`), before SQLAlchemy loads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from ..defaults import ENV_VAR
from ..model import TenantSource
from ..rules import DEFAULT_PURGE_BATCH
from ..version import __version__
from . import database, transfer

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


def add_global_options(parser: argparse.ArgumentParser, *, command: str | None = None) -> None:
    """The options every command takes, before or after its name: on the top parser
    (``command`` None) with their defaults, and again on each command's parser with
    ``argparse.SUPPRESS`` as default, so that a value given before the command is kept unless
    one is given after it. ``bench`` defines its own ``--database-url`` (with its own help)."""
    suppress = command is not None
    if command != "bench":
        parser.add_argument(
            "--database-url",
            metavar="URL",
            default=argparse.SUPPRESS if suppress else None,
            help=f"database URL (default: ${ENV_VAR}, else sqlite:///idemstore.db)",
        )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="log what happens (to stderr)",
    )


def _command(
    commands: Any, name: str, summary: str, description: str, **kwargs: Any
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description, **kwargs
    )
    add_global_options(parser, command=name)
    return parser


def _add_tenant_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "tenant (default: the local_implicit tenant, org local and workspace local)"
    )
    group.add_argument(
        "--org",
        default=None,
        metavar="ORG",
        help=f"the tenant's org_id (default: {database.DEFAULT_ORG})",
    )
    group.add_argument(
        "--workspace",
        default=None,
        metavar="WS",
        help=f"the tenant's workspace_id (default: {database.DEFAULT_WORKSPACE})",
    )
    group.add_argument(
        "--deployment",
        default=None,
        metavar="D",
        help="the tenant's deployment_id (default: none)",
    )
    group.add_argument(
        "--actor",
        default=None,
        metavar="ACTOR",
        help="the tenant's actor_id: stored with a new record (reserve), not part of the key",
    )
    group.add_argument(
        "--source",
        default=TenantSource.LOCAL_IMPLICIT.value,
        choices=[s.value for s in TenantSource],
        help="the tenant's source: stored with a new record (reserve), not part of the key "
        "(default: local_implicit)",
    )


def _add_key(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    nargs = "?" if optional else None
    parser.add_argument(
        "operation",
        nargs=nargs,
        metavar="OPERATION",
        help="the operation the key belongs to, e.g. webhook.provider_event",
    )
    parser.add_argument(
        "key", nargs=nargs, metavar="KEY", help="the idempotency key within the operation"
    )


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def _add_token(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--token",
        default=None,
        metavar="T",
        help=f"the token reserve printed: {what} only while that reservation still holds the "
        "key (its lease not re-claimed by another)",
    )


def _add_database_commands(commands: Any) -> None:
    migrate = _command(
        commands,
        "migrate",
        "create or upgrade the schema to head; --status shows where it is",
        "Create idemstore's tables, or upgrade them to the revision this idemstore needs "
        "(its head), and say which it did. Safe to run from many places at once. With "
        "--status: change nothing, show the database's revision, the head, and every "
        "revision with its message and whether it is applied.",
    )
    migrate.add_argument(
        "--status",
        action="store_true",
        help="show the current revision, the head and the history; migrate nothing",
    )
    _add_json(migrate, "what it did, or the status,")
    migrate.set_defaults(handler=database.cmd_migrate)

    stats = _command(
        commands,
        "stats",
        "record counts by status and operation",
        "Count the records by operation and status (reserved, completed, conflicted). Reads only.",
    )
    _add_json(stats, "the counts")
    stats.set_defaults(handler=database.cmd_stats)

    get = _command(
        commands,
        "get",
        "show one record as JSON",
        "Show one record as the JSON key file has it: by tenant, operation and key, or by "
        "record id. Exit 1 when there is none. Reads only.",
    )
    _add_tenant_options(get)
    get.add_argument(
        "--record-id",
        metavar="ID",
        default=None,
        help="look the record up by its record id (idem_...: the key it is stored under, "
        "as `export` writes it) instead of OPERATION KEY and a tenant",
    )
    _add_key(get, optional=True)
    get.set_defaults(handler=database.cmd_get)

    reserve = _command(
        commands,
        "reserve",
        "reserve a key and print the result kind",
        "Reserve a key, as the library's reserve() does, and print what happened: Reserved "
        "(the key is yours: do the work; its token follows, for complete and release "
        "--token), Duplicate (same request seen before) or Conflict (same key, another "
        "request fingerprint). Exit 0 for each of them.",
    )
    _add_tenant_options(reserve)
    reserve.add_argument(
        "--owner", required=True, help="who reserves the key (a service or worker name)"
    )
    reserve.add_argument(
        "--fingerprint",
        required=True,
        metavar="F",
        help="the request fingerprint (e.g. a hash of the request): a later reserve with "
        "another one is a Conflict",
    )
    reserve.add_argument(
        "--event-id",
        default=None,
        metavar="E",
        help="the id of the event that first asked for this key (e.g. a webhook delivery "
        "id), stored as first_seen_event_id",
    )
    reserve.add_argument(
        "--expires-at-ms",
        type=int,
        default=None,
        metavar="MS",
        help="when the record may be purged, in milliseconds since the Unix epoch (default: never)",
    )
    reserve.add_argument(
        "--lease-ms",
        type=int,
        default=None,
        metavar="MS",
        help="hold the key for MS milliseconds: after that, a reserve with the same "
        "fingerprint re-claims it (default: no lease, never re-claimed)",
    )
    reserve.add_argument(
        "--ttl-ms",
        type=int,
        default=None,
        metavar="MS",
        help="expire the record MS milliseconds from now (sets expires_at_ms; not with "
        "--expires-at-ms)",
    )
    _add_json(reserve, "the result (with the token)")
    _add_key(reserve)
    reserve.set_defaults(handler=database.cmd_reserve)

    complete = _command(
        commands,
        "complete",
        "record the outcome of a reserved key",
        "Complete a key: store its outcome (replayed to later duplicates) and set the record "
        "completed, as the library's complete() does. Exit 1 when the tenant has no such "
        "record, or the --token no longer holds it (nothing written).",
    )
    _add_tenant_options(complete)
    complete.add_argument(
        "--outcome-kind",
        required=True,
        metavar="KIND",
        help="what the work produced, e.g. accepted, sent, rejected",
    )
    complete.add_argument(
        "--completed-at-ms",
        type=int,
        default=None,
        metavar="MS",
        help="when the work finished, in milliseconds since the Unix epoch (default: now)",
    )
    complete.add_argument(
        "--primary-ref",
        metavar="KIND:ID",
        default=None,
        help="what the work made, as KIND:ID, e.g. message:msg-42 (stored as "
        "primary_ref_kind and primary_ref_id)",
    )
    complete.add_argument(
        "--secondary-ref",
        metavar="KIND:ID",
        default=None,
        help="a second reference, as KIND:ID (secondary_ref_kind, secondary_ref_id)",
    )
    complete.add_argument(
        "--details",
        metavar="JSON|@FILE",
        default=None,
        help="outcome details: a JSON value, or @FILE to read it from FILE (@- for stdin)",
    )
    _add_token(complete, "complete")
    _add_json(complete, "the completed record")
    _add_key(complete)
    complete.set_defaults(handler=database.cmd_complete)

    release = _command(
        commands,
        "release",
        "delete a still-reserved key so that a retry starts clean",
        "Release a key whose work failed: delete its record if it is still reserved (not "
        "completed) and its request fingerprint is F, as the library's release() does. Exit "
        "1 when nothing was released (also when the --token no longer holds the key).",
    )
    _add_tenant_options(release)
    release.add_argument(
        "--fingerprint",
        required=True,
        metavar="F",
        help="the request fingerprint the key was reserved with",
    )
    _add_token(release, "release")
    _add_json(release, "whether it released")
    _add_key(release)
    release.set_defaults(handler=database.cmd_release)

    purge = _command(
        commands,
        "purge-expired",
        "delete records whose expiry has passed",
        "Delete every record whose expires_at_ms is at or before now, in batches (one "
        "transaction each), and print how many.",
    )
    purge.add_argument(
        "--now-ms",
        type=int,
        default=None,
        metavar="MS",
        help="the clock, in milliseconds since the Unix epoch (default: now)",
    )
    purge.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_PURGE_BATCH,
        metavar="N",
        help=f"records deleted per transaction (default: {DEFAULT_PURGE_BATCH})",
    )
    purge.set_defaults(handler=database.cmd_purge_expired)


def _add_transfer_commands(commands: Any) -> None:
    parser = _command(
        commands,
        "import",
        "import JSON key files (legacy or versioned), each in one transaction",
        "Import the Rust store's JSON key files. Each file is one transaction: all of it "
        "or, on any error, nothing. Re-running is safe: identical records count as "
        "unchanged; a record the database has with other content is kept (reported) "
        "unless --replace.",
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="the JSON key files, imported in this order"
    )
    parser.add_argument(
        "--replace", action="store_true", help="overwrite records the database has differently"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a file where a record's id differs from its map key",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and report, write nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that parse a big file while this one writes (default: one per core, "
        "up to 4, for files of 8 MB or more; 0: parse here)",
    )
    parser.set_defaults(handler=transfer.cmd_import)

    export = _command(
        commands,
        "export",
        "write every record to a versioned JSON key file (Rust-readable)",
        "Write every record to a versioned JSON key file, as the Rust store writes it "
        "(records in record id order; through a temporary file, fsynced, then renamed). "
        "Reads only.",
    )
    export.add_argument(
        "file", metavar="FILE", help="the file to write (replaced whole); - for standard output"
    )
    export.set_defaults(handler=transfer.cmd_export)


def _bench_options(parser: argparse.ArgumentParser) -> None:
    # Added when ``bench`` is chosen: the bench imports the async store (asyncio,
    # sqlalchemy.ext.asyncio, sqlalchemy.orm), multiprocessing and more.
    from ..bench import command

    command.add_arguments(parser)
    parser.set_defaults(handler=command.run)


def build_parser() -> argparse.ArgumentParser:
    """The ``idemstore`` command's parser: global options (also accepted after the command),
    then one command whose ``handler`` (in the parsed arguments) runs it."""
    parser = argparse.ArgumentParser(
        prog="idemstore",
        description="Idempotency keys in SQL: migrate, inspect, reserve and complete keys, "
        "import and export the Rust store's JSON key files.",
        epilog="Exit status: 0 done; 1 not found or not done (get, complete, release); "
        "2 a mistake or a database error (one line on stderr; nothing written); 130 interrupted; "
        "141 the reader of the output went away.",
    )
    parser.add_argument("--version", action="version", version=f"idemstore {__version__}")
    add_global_options(parser)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_database_commands(commands)
    _add_transfer_commands(commands)
    _command(
        commands,
        "bench",
        "measure the store against the bare driver and the JSON file",
        "Measure idemstore in one run: each figure as a ratio to a baseline measured in the "
        "same run (the bare database driver running the same statements, the Rust store's "
        "JSON file emulated). A benchmark, not a test.",
        populate=_bench_options,
    )
    return parser
