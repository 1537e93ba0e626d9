"""The ``idemstore`` command's entry point, kept light.

``idemstore import`` on a big file starts its parse workers here, before :mod:`idemstore.cli`
loads the database layer (SQLAlchemy and the rest take about 0.2 s to import, which the
workers spend reading the file). Everything else goes straight to :func:`idemstore.cli.main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    started = None
    if "import" in args:
        from ._parse import prestart

        started = prestart(args)
    try:
        from .cli import main as cli_main

        return cli_main(args, prestarted=started)
    finally:
        if started is not None:
            started.close()  # used and closed by then, or not used at all


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
