"""The test suite: a package, so that its helpers import as ``tests.<module>`` from the
repository root (as the ``benchmarks`` package does)."""
