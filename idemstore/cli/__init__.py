"""The ``idemstore`` command.

    idemstore [--database-url URL] migrate
    idemstore [--database-url URL] stats [--json]
    idemstore [--database-url URL] get [--org ORG --workspace WS --deployment D] OPERATION KEY
    idemstore [--database-url URL] reserve [tenant options] --owner O --fingerprint F OPERATION KEY
    idemstore [--database-url URL] purge-expired [--now-ms MS] [--batch-size N]
    idemstore [--database-url URL] import [--dry-run] [--replace] [--strict] [--json] FILE...
    idemstore [--database-url URL] export FILE
    idemstore [--database-url URL] bench [...]

The URL comes from ``--database-url``, else ``$IDEMSTORE_DATABASE_URL``, else the embedded
default ``sqlite:///idemstore.db``. Passwords are never printed. A mistake prints
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
    status: 0, 1 (``get`` found nothing), 2 (a mistake, one line on stderr), 130
    (interrupted), 141 (the reader of the output went away)."""
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
