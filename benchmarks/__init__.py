"""The project's studies, each run as ``python -m benchmarks.<study>`` from the repository root.

Shared code lives once in ``benchmarks.common``; diagnostics (one-off questions behind a study's design) live in
``benchmarks.diagnostics``. See ``benchmarks/README.md``.
"""
