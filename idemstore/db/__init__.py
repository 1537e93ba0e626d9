"""The database layer: the record codec, tables, engines, the driver and its statements, the
operations, the runner, the async offload and Alembic. Nothing here imports the importer, the
command line or the bench (see docs/ARCHITECTURE.md)."""
