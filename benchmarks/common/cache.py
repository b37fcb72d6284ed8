"""The run caches: one JSON file per finished run, keyed by a digest of everything that fixes its outcome, so a
later sitting adds runs instead of redoing them."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from .environment import RESULTS


def digest(fields: dict[str, Any]) -> str:
    """A cache key's digest of everything that fixes a run."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def load_cache(folder: Path) -> dict[str, dict[str, Any]]:
    """Every record in ``folder`` by its key (the file's stem); empty when the folder does not exist."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))} if folder.exists() else {}


def save(key: str, record: dict[str, Any], cache_dir: Path) -> None:
    """Write one record, atomically: never a half-written run in the cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(path)


def sitting_parser(doc: str, unit: str = "run") -> argparse.ArgumentParser:
    """The options every study that runs in sittings from its cache takes: a time budget per sitting, rebuilding the
    report alone, and where the report goes; the study adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--budget-min", type=float, default=150.0, help=f"start no new {unit} after this many minutes")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the cache, run nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the report goes")
    return parser
