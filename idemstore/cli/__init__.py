"""The ``idemstore`` command.

    idemstore migrate [--status] [--json]
    idemstore stats [--json]
    idemstore get [tenant options] OPERATION KEY | --record-id ID
    idemstore reserve [tenant options] --owner O --fingerprint F [--json] OPERATION KEY
    idemstore complete [tenant options] --outcome-kind KIND [--completed-at-ms MS]
        [--primary-ref KIND:ID] [--secondary-ref KIND:ID] [--details JSON|@FILE] OPERATION KEY
    idemstore release [tenant options] --fingerprint F [--json] OPERATION KEY
    idemstore purge-expired [--now-ms MS] [--batch-size N]
    idemstore import [--dry-run] [--replace] [--strict] [--json] FILE...
    idemstore export FILE|-
    idemstore bench [...]

Every command takes ``--database-url URL`` and ``-v`` before or after its name. The URL comes
from ``--database-url``, else ``$IDEMSTORE_DATABASE_URL``, else the embedded default
``sqlite:///idemstore.db``. Passwords are never printed. A mistake prints
``idemstore: error: <one line>`` and exits 2.

:func:`main` parses with the one definition (:mod:`idemstore.cli.parser`), which loads nothing
heavy; for ``import`` it then starts the first file's parse workers (:func:`prestart`) before
the handler loads SQLAlchemy (about 0.2 s the workers spend reading).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..defaults import is_postgresql_text
from ..errors import IdemstoreError
from .database import database_error
from .parser import build_parser

if TYPE_CHECKING:
    from ..transfer.parse import WorkerParse


def prestart(argv: Sequence[str]) -> WorkerParse | None:
    """For ``idemstore import FILE ...``: the first file's parse workers, started now (see
    :func:`idemstore.transfer.parse.start_early`). ``argv`` is read with the command's own
    parser, quietly: anything but an import it can parse (``--help``, an unknown option, another
    command), or a small file, starts nothing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return None
    if args.command != "import":
        return None
    from ..transfer.parse import start_early

    return start_early(
        args.files[0],
        strict=args.strict,
        workers=args.workers,
        forbid_nul=is_postgresql_text(args.database_url),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``idemstore`` command with ``argv`` (default: ``sys.argv[1:]``); the exit
    status: 0 done, 1 not found or not done (``get`` or ``complete`` found no such record,
    ``release`` released nothing), 2 a mistake (a usage error, bad input, a database error:
    one line on stderr; nothing written), 130 interrupted, 141 the reader of the output went
    away."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    started = prestart(argv) if args.command == "import" else None
    try:
        if started is not None:
            return int(args.handler(args, started))
        return int(args.handler(args))
    except IdemstoreError as error:
        print(f"idemstore: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``idemstore stats | head``): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("idemstore: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        line = database_error(error, args.database_url)
        if line is None:
            raise
        print(f"idemstore: {line}", file=sys.stderr)
        return 2
    finally:
        if started is not None:
            started.close()  # used and closed by then, or not used at all


__all__ = ["main", "prestart"]
