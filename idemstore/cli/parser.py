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


def _add_database_commands(commands: Any) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the schema (to head)")
    migrate.set_defaults(handler=database.cmd_migrate)

    stats = commands.add_parser("stats", help="record counts by status and operation")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=database.cmd_stats)

    get = commands.add_parser("get", help="show one record as JSON")
    _add_tenant_options(get)
    get.add_argument("operation")
    get.add_argument("key")
    get.set_defaults(handler=database.cmd_get)

    reserve = commands.add_parser("reserve", help="reserve a key and print the result kind")
    _add_tenant_options(reserve)
    reserve.add_argument("--owner", required=True)
    reserve.add_argument("--fingerprint", required=True, help="request fingerprint")
    reserve.add_argument("--event-id", default=None, help="first_seen_event_id")
    reserve.add_argument("--expires-at-ms", type=int, default=None)
    reserve.add_argument("operation")
    reserve.add_argument("key")
    reserve.set_defaults(handler=database.cmd_reserve)

    purge = commands.add_parser("purge-expired", help="delete records whose expiry has passed")
    purge.add_argument("--now-ms", type=int, default=None, help="the clock (default: now)")
    purge.add_argument("--batch-size", type=int, default=DEFAULT_PURGE_BATCH)
    purge.set_defaults(handler=database.cmd_purge_expired)


def _add_transfer_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "import",
        help="import JSON key files (legacy or versioned), each in one transaction",
        description=(
            "Import the Rust store's JSON key files. Each file is one transaction: all of it "
            "or, on any error, nothing. Re-running is safe: identical records count as "
            "unchanged; a record the database has with other content is kept (reported) "
            "unless --replace."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
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

    export = commands.add_parser(
        "export", help="write every record to a versioned JSON key file (Rust-readable)"
    )
    export.add_argument("file", metavar="FILE")
    export.set_defaults(handler=transfer.cmd_export)


def _bench_options(parser: argparse.ArgumentParser) -> None:
    # Added when ``bench`` is chosen: the bench imports the async store (asyncio,
    # sqlalchemy.ext.asyncio, sqlalchemy.orm), multiprocessing and more.
    from ..bench import command

    command.add_arguments(parser)
    parser.set_defaults(handler=command.run)


def build_parser() -> argparse.ArgumentParser:
    """The ``idemstore`` command's parser: global options, then one subcommand whose
    ``handler`` (in the parsed arguments) runs it."""
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
    _add_database_commands(commands)
    _add_transfer_commands(commands)
    commands.add_parser(
        "bench", help="measure the store against its limits", populate=_bench_options
    )
    return parser
