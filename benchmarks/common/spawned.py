"""Work in fresh processes: a study runs a measurement in a process of its own, started by ``spawn`` (so it inherits
nothing of the study's process: not its memory, its Trainers, nor its peak RSS), and reads back the JSON report the
process writes. The processes studies (``processes.spawn``, and through it claims and frontier) and the frontier's
one-record measurements run this way."""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT_S = 1800.0  # a run of all its processes together; the longest frontier record took about a minute


def spawned_reports(jobs: dict[str, Callable[..., None]], what: str, folder: Path | None = None,
                    timeout_s: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Run each job in a spawned process of its own, all at once, and return their JSON reports in ``jobs``' order.

    A job is a picklable callable (a module-level function, or a ``functools.partial`` of one) that writes its
    report as JSON to the path given as its keyword argument ``out``: ``folder / f"{name}.json"`` for the job's
    name, in a temporary folder removed afterwards when ``folder`` is None. When a process fails, or is still
    running ``timeout_s`` seconds after the start, the ones still running are stopped and this exits (SystemExit)
    saying which failed, how and ``what`` was being run (e.g. "measuring frozen at cut 2")."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return spawned_reports(jobs, what, Path(tmp), timeout_s)
    context = mp.get_context("spawn")
    outs = {name: folder / f"{name}.json" for name in jobs}
    processes = {name: context.Process(target=job, kwargs={"out": str(outs[name])}) for name, job in jobs.items()}
    for process in processes.values():
        process.start()
    deadline = time.monotonic() + timeout_s
    for name, process in processes.items():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode != 0:
            how = f"exit code {process.exitcode}" if process.exitcode is not None else \
                f"still running after {timeout_s:g} s, stopped"
            for other in processes.values():
                if other.is_alive():
                    other.kill()
                    other.join()
            raise SystemExit(f"{what} failed ({name}: {how}); see its output above")
    return [json.loads(outs[name].read_text()) for name in jobs]
