"""The Rust JSON key file: reading (source, scan, validate, reader), converting records to the
codec's rows (rows, parse with its worker processes), importing and exporting (importer,
exporter), writing (writer). See docs/ARCHITECTURE.md and docs/FORMAT.md."""
