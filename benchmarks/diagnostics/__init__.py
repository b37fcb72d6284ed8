"""Diagnostics: one-off questions behind a study's or a default's design (why GradMatch picked what it picked,
what a pass costs), each run as ``python -m benchmarks.diagnostics.<name>``. They answer no target of their own."""
