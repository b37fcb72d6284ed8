"""A process's peak resident memory is its own, even when a large parent started it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RESIDENT = Path(__file__).resolve().parents[1] / "src" / "hosl_lightning" / "measurement" / "resident.py"
CHILD = f"""
import importlib.util, json, resource
spec = importlib.util.spec_from_file_location("resident", {str(RESIDENT)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps({{"own": module.process_peak_rss_mib(),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_child_of_a_large_parent_reports_its_own_peak_not_the_parents() -> None:
    held = b"\x01" * (400 * 2**20)  # 400 MiB, every page touched
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    reported = json.loads(out)
    assert len(held) == 400 * 2**20
    assert reported["own"] < 100  # a bare interpreter; ru_maxrss, carried over exec on Linux, says about 400+
