"""The frontier study (``benchmarks.frontier``) reads the records an earlier version of it wrote: their keys (the file
stems) and their fields are pinned here, as ``benchmarks/frontier.py`` at 4b5a4f3 wrote them. Nothing here loads
SmolLM2 or measures anything."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from benchmarks import frontier

MIB = 2**20

# key(option, cut, steps) as benchmarks/frontier.py computed it at 4b5a4f3 (steps 3, the default; batch 8 x 64)
PINNED_KEYS = {
    (None, 2): "floor-cut2-585876f53cd1",
    ("fo (AdamW)", 2): "fo-AdamW-cut2-fea121948fd6",
    ("fo + checkpointing", 2): "fo_checkpointing-cut2-bb65ea3baccd",
    ("fo + checkpointing + fused SGD", 2): "fo_checkpointing_fusedSGD-cut2-0ce3a2444cc1",
    ("fo + checkpointing + fused AdamW", 2): "fo_checkpointing_fusedAdamW-cut2-c266525760ac",
    ("hosl (default client)", 2): "hosl-defaultclient-cut2-0863ea58d1f9",
    ("frozen", 2): "frozen-cut2-15a373cd426a",
    ("frozen", 24): "frozen-cut24-de9adc359168",
}


def option(name: str | None) -> Any:
    return None if name is None else next(o for o in frontier.OPTIONS if o.name == name)


@pytest.mark.parametrize(("name", "cut"), list(PINNED_KEYS))
def test_record_keys_are_the_ones_the_first_version_wrote(name: str | None, cut: int) -> None:
    assert frontier.key(option(name), cut, 3) == PINNED_KEYS[(name, cut)]


def memory(peak_mib: float, **mib: float) -> dict[str, int]:
    """A record's ``client`` field: ``ClientMemory`` as a dict, in bytes."""
    fields = dict.fromkeys(("params", "buffers", "grads", "activations", "temporaries", "optimizer_state", "other"),
                           0.0) | mib
    return {"peak": int(peak_mib * MIB), **{k: int(v * MIB) for k, v in fields.items()}}


def floor_record(cut: int, peak_mib: float) -> dict[str, Any]:
    return {"choice": None, "cut": cut, "batch": 8, "length": 64, "steps": 3, "commit": "commit 4b5a4f3",
            "date": "2025-01-01 10:00 UTC", "load_before": "2.0 (1 min), 2.0 (5 min) on 2 logical cores",
            "client": memory(peak_mib, params=peak_mib - 10, activations=10), "seconds": 20.0}


def option_record(name: str, cut: int, peak_mib: float, client_sec: float, server_sec: float,
                  date: str = "2025-01-01 11:00 UTC") -> dict[str, Any]:
    """A record with every field the first version wrote (an in-process fit of 3 steps and a two-process run)."""
    chosen = option(name)
    per_step = [{"client_sec": client_sec, "server_sec": server_sec, "bytes_up": 147456.0, "bytes_down": 4.0}] * 3
    return {"choice": {"name": chosen.name, "mode": chosen.mode, "client_optimizer": chosen.client_optimizer,
                       "client_checkpointing": chosen.client_checkpointing,
                       "fused_client_update": chosen.fused_client_update},
            "cut": cut, "batch": 8, "length": 64, "steps": 3, "commit": "commit 4b5a4f3", "date": date,
            "load_before": "2.1 (1 min), 2.0 (5 min) on 2 logical cores",
            "client": memory(peak_mib, params=peak_mib / 2, grads=peak_mib / 4, activations=peak_mib / 4),
            "per_step": per_step, "timed_first_step": False, "client_sec": client_sec, "server_sec": server_sec,
            "bytes_up": 147456.0, "bytes_down": 4.0, "client_rss_mib": 900.5, "client_imports_mib": 400.0,
            "server_rss_mib": 1500.0, "rss_steps": 2, "seconds": 60.0}


def records() -> dict[str, dict[str, Any]]:
    """A cache as the first version left it: floors and options at cuts 2 and 4, under their keys."""
    made = {frontier.key(None, 2, 3): floor_record(2, 200.0), frontier.key(None, 4, 3): floor_record(4, 250.0)}
    for name, cut, peak, client_sec, server_sec in [
        ("fo (AdamW)", 2, 1000.0, 0.5, 3.0),
        ("fo + checkpointing + fused SGD", 2, 280.0, 0.6, 3.0),
        ("hosl (default client)", 2, 201.0, 0.8, 4.0),
        ("frozen", 2, 202.0, 0.1, 2.5),
        ("frozen", 4, 270.0, 0.1, 2.4),
    ]:
        made[frontier.key(option(name), cut, 3)] = option_record(name, cut, peak, client_sec, server_sec)
    return made


def test_rows_read_the_first_versions_records() -> None:
    cache = records()
    table = frontier.rows(copy.deepcopy(cache))
    assert [(r["cut"], r["option"]) for r in table] == [
        (2, "fo (AdamW)"), (2, "fo + checkpointing + fused SGD"), (2, "hosl (default client)"), (2, "frozen"),
        (4, "frozen")]
    frozen4 = table[-1]
    assert frozen4["over_floor"] == pytest.approx(270 / 250, rel=1e-6)
    assert frozen4["floor_mib"] == pytest.approx(250.0, rel=1e-6)
    assert (frozen4["client_rss_mib"], frozen4["client_sec"], frozen4["bytes_up"]) == (900.5, 0.1, 147456)


def test_report_only_rebuilds_the_report_from_the_first_versions_files(tmp_path, monkeypatch) -> None:
    """Records written as files under their pinned keys: ``--report-only`` reads them and judges the targets."""
    cache_dir = tmp_path / "frontier"
    cache_dir.mkdir()
    for stem, record in records().items():
        (cache_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    assert {p.stem for p in cache_dir.glob("*.json")} >= {PINNED_KEYS[(None, 2)], PINNED_KEYS[("frozen", 2)]}
    monkeypatch.setattr(frontier, "CACHE", cache_dir)
    frontier.main(["--report-only", "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "frontier.md").read_text()
    # (a) frozen within 1.05x at every cut: 1.01x at cut 2, 1.08x at cut 4 (the worst)
    assert ("within at 1 of 2 cuts measured; the worst, 1.08x at cut 4: **missed**, 0.03 over the bound (3%) "
            "(not measured yet at cuts 1, 8, 16, 24)") in text
    # (b) frozen's step 2.6 s against hosl's 4.8 s at cut 2
    assert "2.60 s against 4.80 s, 0.54x: met, 0.21 under the bound; both at commit 4b5a4f3" in text
    # (c) fused SGD at cut 2: 280 / 200
    assert "fo + checkpointing + fused SGD within 1.5x of the floor at cut 2**: 1.40x: met, 0.10 under" in text
    pivot = text[text.index("| client option | cut 2 | cut 4 |"):].splitlines()
    assert pivot[2:] == ["| fo (AdamW) | 5.00 | - |", "| fo + checkpointing + fused SGD | 1.40 | - |",
                         "| hosl (default client) | 1.00 | - |", "| frozen | 1.01 | 1.08 |"]
    csv_rows = (tmp_path / "out" / "frontier.csv").read_text().splitlines()
    assert len(csv_rows) == 6 and csv_rows[0].startswith("cut,option,peak_mib,floor_mib,over_floor,")


def test_a_study_with_no_frozen_or_hosl_record_says_so() -> None:
    lines = frontier.verdicts(frontier.rows({k: v for k, v in records().items() if "frozen" not in k}))
    assert lines[0].endswith("not measured yet.") and lines[1].endswith("not measured yet.")
    assert "1.40x: met" in lines[2]


def test_a_sitting_on_a_tiny_model_writes_records_the_report_reads(tmp_path, monkeypatch) -> None:
    """run() end to end on a 2-block model of SmolLM2's vocabulary (no two-process run): the floor and an option
    at one cut, under their keys, read back by the report."""
    config = dict(model_type="llama", vocab_size=frontier.SMOLLM2_SHAPE["vocab_size"], hidden_size=16,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                  max_position_embeddings=64)
    monkeypatch.setattr(frontier, "CACHE", tmp_path / "frontier")
    frozen = option("frozen")
    frontier.run((1,), (frozen,), steps=1, rss=False, rss_steps=1, budget_min=60, model=config)
    stored = frontier.load_cache(tmp_path / "frontier")
    assert set(stored) == {frontier.key(None, 1, 1), frontier.key(frozen, 1, 1)}
    record = stored[frontier.key(frozen, 1, 1)]
    assert {"choice", "cut", "steps", "commit", "date", "load_before", "client", "per_step", "timed_first_step",
            "client_sec", "server_sec", "bytes_up", "bytes_down", "seconds"} <= set(record)
    (row,) = frontier.rows(stored)
    assert (row["option"], row["cut"], row["timed_first_step"]) == ("frozen", 1, True)
