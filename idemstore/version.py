"""The package's version (one place: ``idemstore.__version__``, the CLI's ``--version`` and the
schema messages read it here)."""

__version__ = "0.1.0"
