"""``idemstore bench``: how fast the store is, against the bare driver and the old JSON file.

One process, one run, one set of database settings; every idemstore figure is a ratio to a
baseline measured in the same interleaved rounds. :mod:`~idemstore.bench.command` (options and
the run), :mod:`~idemstore.bench.harness` (rounds, figures, ratios),
:mod:`~idemstore.bench.baselines` (the bare drivers), :mod:`~idemstore.bench.scenarios` and
:mod:`~idemstore.bench.processes` (the sections), :mod:`~idemstore.bench.report`,
:mod:`~idemstore.bench.datagen` (the one data generator, which the tests use too).
Benchmarks are not tests: the suite only checks that this runs and reports.
"""
