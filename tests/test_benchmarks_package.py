"""The benchmarks package: every study imports as a module, every committed cached run is found under today's keys,
and the shared helpers the studies lean on do what they say. Rebuilding the reports from the cache takes minutes
(claims loads SmolLM2; tuning_ranks bootstraps rank correlations), so it is not done here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.core.split import num_blocks

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "benchmarks").rglob("*.py")
                 if p.name != "__init__.py")


def test_the_studies_are_the_expected_ones() -> None:
    assert {"benchmarks.claims", "benchmarks.convergence", "benchmarks.cut_depth", "benchmarks.frontier",
            "benchmarks.memory", "benchmarks.speed", "benchmarks.processes", "benchmarks.tuning_ranks", "benchmarks.diagnostics.passes",
            "benchmarks.diagnostics.subset_choice", "benchmarks.diagnostics.bf16_probes"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_every_module_imports_without_path_tricks(name: str) -> None:
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text()
    assert "sys.path" not in source
    assert "import _" not in source and "._fit" not in source  # no private library name


def test_every_cached_run_is_found_by_its_key() -> None:
    from benchmarks import claims, cut_depth  # noqa: F401 - cut_depth registers its methods, for their keys
    from benchmarks.common.cache import load_cache
    from benchmarks.common.training import CACHE, METHOD, RunConfig, memory_key
    from benchmarks.convergence import HOSL_OPTIONS

    for hosl in HOSL_OPTIONS:  # the d_c variants of every option ever studied have runs in the cache
        claims.study_methods(hosl)
    cache = load_cache(CACHE)
    assert len(cache) >= 125
    for stem, record in cache.items():
        config = record["config"]
        if config.get("kind") == "memory":
            key = memory_key(METHOD[config["method"]], config.get("cut", 2))
        elif config.get("kind") == "rss":
            key = claims.rss_key(METHOD[config["method"]], config["cut"])
        else:
            key = RunConfig(**config).key()
        assert key == stem


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_first_blocks_copy_keeps_the_client_and_leaves_the_model(model_type: str) -> None:
    from benchmarks.common.models import first_blocks_copy, keep_blocks

    config = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "intermediate_size": 64, "ffn_dim": 64, "max_position_embeddings": 32,
              "word_embed_proj_dim": 32}
    torch.manual_seed(0)
    model = load_causal_lm(model_config=config).eval()
    trimmed = first_blocks_copy(model, 2)
    assert num_blocks(trimmed) == 2 and num_blocks(model) == 4
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        full, cut = SplitCausalLM(model, 2), SplitCausalLM(trimmed, 2)
        assert torch.equal(full.client_forward(ids, None).hidden, cut.client_forward(ids, None).hidden)
    assert num_blocks(keep_blocks(model, 1)) == 1


def test_paired_difference_pairs_common_seeds_only() -> None:
    from benchmarks.common.stats import difference_cell, paired, paired_point

    def run(seed: int, correct: list[int]) -> dict:
        return {"config": {"seed": seed}, "test": {"correct": correct}}

    a = [run(0, [1, 1, 0, 1]), run(1, [1, 1, 1, 1])]
    b = [run(0, [1, 0, 0, 1]), run(2, [0, 0, 0, 0])]
    assert paired_point(a, b) == pytest.approx(25.0)
    point, low, high, seeds = paired(a, b)
    assert (point, seeds) == (pytest.approx(25.0), 1) and low <= point <= high
    assert difference_cell(None) == "-" and difference_cell((25.0, 0.0, 50.0, 1), seeds=True) == "+25.0 [+0.0, +50.0] (1)"


def test_client_weights_leave_out_the_frozen_modules() -> None:
    """d_c of the claims study's frozen-embeddings client: the client half's weights less its token table."""
    from benchmarks.common.models import client_weights

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 32}
    model = load_causal_lm(model_config=config)
    full = client_weights(model, 2, None)
    assert full == sum(p.numel() for p in SplitCausalLM(model, 2).client.parameters())
    assert client_weights(model, 2, None, ("embeddings.embed_tokens",)) == full - 64 * 32


def _report_job(value: int, out: str) -> None:
    """A spawned job (module level: a child process imports it) that reports ``value``."""
    Path(out).write_text(f'{{"value": {value}}}')


def _exit_job(code: int, out: str) -> None:
    raise SystemExit(code)


def _sleep_job(seconds: float, out: str) -> None:
    import time

    time.sleep(seconds)


def test_spawned_reports_come_back_in_order_and_stay_in_the_folder(tmp_path) -> None:
    from functools import partial

    from benchmarks.common.spawned import spawned_reports

    reports = spawned_reports({"b": partial(_report_job, 2), "a": partial(_report_job, 1)}, "a test", tmp_path)
    assert reports == [{"value": 2}, {"value": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


@pytest.mark.parametrize("failing", ["exit", "timeout"])
def test_a_failed_spawned_job_says_which_and_stops_the_others(failing: str) -> None:
    import multiprocessing as mp
    from functools import partial

    from benchmarks.common.spawned import spawned_reports

    first, timeout = (partial(_exit_job, 3), 300) if failing == "exit" else (partial(_sleep_job, 600), 2)
    with pytest.raises(SystemExit) as raised:
        spawned_reports({"first": first, "sleeper": partial(_sleep_job, 600)}, "a test run", timeout_s=timeout)
    how = "exit code 3" if failing == "exit" else f"still running after {timeout} s, stopped"
    assert str(raised.value) == f"a test run failed (first: {how}); see its output above"
    assert not mp.active_children()  # the sleeper was stopped, not left behind


def _outcome(record: dict) -> str:
    """A run's record as its cache file holds it, less when it ran and how long it took (no two runs share those)."""
    timing = ("date", "train_s", "load_1min", "client_s", "server_s")
    kept = {k: v for k, v in record.items() if k not in timing}
    kept["curve"] = [{k: v for k, v in point.items() if k not in timing} for point in record["curve"]]
    return json.dumps(kept, sort_keys=True)


def test_a_run_prints_its_progress_and_its_record_and_key_stay_the_same(capsys) -> None:
    from conftest import TINY_LLAMA
    from test_tasks import bpe_tokenizer

    from benchmarks.common import training
    from hosl_lightning.data import ASSETS_DIR

    training.register(training.Method("progress check: fo", "fo"))
    config = training.RunConfig("progress check: fo", "rotten_tomatoes", 0, steps=4, lr=1e-3, zo_lr=None, n_val=8,
                                n_test=8, eval_every=2, num_train=32)
    key, tokenizer = config.key(), bpe_tokenizer()
    torch.manual_seed(0)
    base = load_causal_lm(model_config={**TINY_LLAMA, "vocab_size": len(tokenizer), "max_position_embeddings": 128})
    capsys.readouterr()
    silent = training.run(config, base, tokenizer, ASSETS_DIR, "test", progress_every=0)
    assert "    step " not in capsys.readouterr().err
    shown = training.run(config, base, tokenizer, ASSETS_DIR, "test", progress_every=3)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("    step ")]
    # step 2: a validation; step 3: every 3 steps; step 4: the last, and a validation
    assert [line.split(":")[0] for line in lines] == ["    step 2/4", "    step 3/4", "    step 4/4"], lines
    assert all(" min, about " in line and " s a step); train loss " in line for line in lines), lines
    assert [line.split("; val acc ")[1].split(" at ")[1] for line in lines] == ["step 2", "step 2", "step 4"]
    assert _outcome(shown) == _outcome(silent) and len(shown["curve"]) == 2 and "test" in shown
    assert config.key() == key and shown["config"] == silent["config"]
