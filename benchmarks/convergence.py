"""Convergence of the client optimizers: fo, zo, and hosl with each zeroth-order client option, at equal steps.

    python -m benchmarks.convergence                    # run what is missing (resumes from the cache), then report
    python -m benchmarks.convergence --budget-min 150   # stop starting new runs after 150 minutes
    python -m benchmarks.convergence --report-only      # rebuild convergence.md / .csv / .png from the cache
    python -m benchmarks.convergence --quick            # a smoke run: 4 steps, 16 examples, into a scratch folder
    python -m benchmarks.convergence --methods fo hosl/zo_sgd-dense --datasets sms_spam   # only these runs first

Issue 20, item 4. SmolLM2-135M-Instruct (``load_causal_lm("smollm2-135m")``, loaded once, a fresh deep copy per
run), cut after block 2, prompt classification on ``rotten_tomatoes`` and ``sms_spam`` from ``../shared/data``
(the prompts of ``benchmarks.common.tasks``), batch 8, max_length 64. Methods:

- ``fo``: first-order split learning (AdamW on both halves);
- ``zo``: ZO-SGD on both halves (MeZO over the split model);
- ``hosl/zo_sgd-dense``: the paper's hosl (ZO-SGD client, dense directions, probes one at a time);
- ``hosl/zo_sgd-sparse``, ``hosl/fzoo-sparse``, ``hosl/momentum-sparse``: the new client options;
- ``fixed-client``: a reference, not an option: hosl whose client probes but never moves (``zo_lr`` 0), so its
  server learns alone. What the options gain over it is what the client's own learning adds.

Every hosl method's server runs AdamW at fo's selected lr. Learning rates come from a small sweep per method
(rotten_tomatoes, seed 0, ``SWEEP_STEPS`` steps, selected by validation loss; ``benchmarks.common.training``
holds the harness and the sizes); then every method trains
``STEPS`` steps for each seed and dataset, is validated every ``EVAL_EVERY`` steps on ``N_VAL`` examples (loss,
accuracy, the client's cumulative seconds) and finally scored on the same ``N_TEST`` test examples. Runs since
the fixed-client reference also record how far the client's weights moved (``client_shift``).

Every finished run is written to ``benchmarks/results/convergence/<key>.json``, keyed by its full configuration
and holding the commit that produced it, so a later sitting adds runs instead of redoing them. Commit the folder.
A new method is one line of ``METHODS``; a new field of ``Method`` goes into ``LATER_FIELDS`` with its default,
so every cached run keeps its key.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hosl_lightning import load_causal_lm, resolve_tokenizer
from hosl_lightning.lightning.option_use import UNSET

from .common import training
from .common.cache import load_cache, save, sitting_parser
from .common.environment import code_state, machine, quiet_lightning
from .common.tasks import CUT, DATASETS, DEFAULT_DATA, MODEL, MODEL_NAME
from .common.training import CACHE, N_TEST, N_VAL, SEEDS, STEPS, SWEEP_STEPS, Method, RunConfig
from .convergence_report import REFERENCE, write_report

METHODS = (
    Method("fo", "fo", lrs=(1e-5, 1e-4)),
    Method("hosl/zo_sgd-dense", "hosl", zo_lrs=(1e-6, 1e-5)),
    Method("hosl/zo_sgd-sparse", "hosl", embedding_directions="sparse", pair_probes=True, zo_lrs=(1e-5, 1e-4)),
    Method("hosl/fzoo-sparse", "hosl", q=2, zo_optimizer="fzoo", embedding_directions="sparse",
           direction="rademacher", zo_lrs=(1e-6, 1e-5)),
    Method("hosl/momentum-sparse", "hosl", zo_optimizer="zo_momentum", embedding_directions="sparse",
           pair_probes=True, zo_lrs=(1e-7, 1e-6)),
    Method("zo", "zo", zo_lrs=(1e-6, 1e-5)),
    Method(REFERENCE, "hosl", zo_lrs=(0.0,)),  # the reference: the server learns, the client never moves
)
training.register(*METHODS)
HOSL_OPTIONS = tuple(m.name for m in METHODS if m.mode == "hosl" and m.name != REFERENCE)  # the client options


def library_default_hosl() -> str:
    """The convergence study's hosl option that trains with HOSLStrategy's own client defaults (what it takes for its
    unset options, so the two cannot drift apart)."""
    defaults = UNSET
    wanted = (defaults["zo_optimizer"], defaults["embedding_directions"], defaults["pair_probes"],
              defaults["direction"], defaults["q"])
    for method in METHODS:
        if method.name in HOSL_OPTIONS and (method.zo_optimizer, method.embedding_directions, method.pair_probes,
                                            method.direction, method.q) == wanted:
            return method.name
    raise LookupError(f"no hosl option of the convergence study trains with HOSLStrategy's defaults {wanted}")


def own_records(cache: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """This study's runs and memory records: its own methods, at cut 2, on its datasets. The claims study keeps
    other cuts, tasks, variants and RSS records in the same folder."""
    names, datasets = {m.name for m in METHODS}, {d.name for d in DATASETS}

    def ours(config: dict[str, Any]) -> bool:
        kind = config.get("kind")
        return (config.get("method") in names and config.get("cut", CUT) == CUT
                and (kind == "memory" or kind is None and config.get("dataset") in datasets))

    return {key: record for key, record in cache.items() if ours(record["config"])}


def plan(cache: dict[str, dict[str, Any]], steps: int, sweep_steps: int, n_val: int, n_test: int,
         seeds: tuple[int, ...], datasets: tuple[str, ...]) -> list[RunConfig]:
    """Every run still missing, in the order that makes the results useful soonest: the sweep (fo first, whose
    lr the hosl servers use), then seed 0 of every method on each dataset, then the other seeds, one dataset at a
    time (the first, where the methods differ most, before the next)."""
    best, todo = training.sweep_choices(cache, sweep_steps, n_val, METHODS)
    order = [(seeds[0], d) for d in datasets] + [(s, d) for d in datasets for s in seeds[1:]]
    for seed, dataset in order:
        for method in METHODS:
            if method.name in best:
                final = training.final_config(best[method.name], dataset, seed, steps, n_val, n_test)
                if final.key() not in cache:
                    todo.append(final)
    return todo


def write(out: Path, cache_dir: Path = CACHE, steps: int = STEPS, seeds: tuple[int, ...] = SEEDS,
          n_test: int = N_TEST, sweep_steps: int = SWEEP_STEPS) -> None:
    """The report (convergence.md / .csv / .png) from the cache in ``cache_dir``."""
    write_report(own_records(load_cache(cache_dir)), out, steps, sweep_steps, seeds, n_test, machine(), MODEL_NAME,
                 default=library_default_hosl())


def main(argv: list[str] | None = None) -> int:
    parser = sitting_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run into a scratch folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], default=None,
                        help="run only these methods' missing runs (sweeps included); the report covers all")
    parser.add_argument("--datasets", nargs="+", choices=[d.name for d in DATASETS], default=None,
                        help="run only these datasets' missing final runs; the report covers all")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    cache_dir = CACHE
    steps, sweep_steps, n_val, n_test, seeds = STEPS, SWEEP_STEPS, N_VAL, N_TEST, SEEDS
    if args.quick:
        cache_dir = args.out = Path("/tmp/convergence-quick")
        steps, sweep_steps, n_val, n_test, seeds = 4, 2, 16, 16, (0,)
    started, code = time.perf_counter(), code_state()  # the code this process imports, before anything changes
    if not args.report_only:
        quiet_lightning()
        base, tokenizer = None, None
        datasets = tuple(d.name for d in DATASETS)
        while True:
            cache = load_cache(cache_dir)
            todo = [c for c in plan(cache, steps, sweep_steps, n_val, n_test, seeds, datasets)
                    if (args.methods is None or c.method in args.methods)
                    and (args.datasets is None or c.is_sweep or c.dataset in args.datasets)]
            elapsed = (time.perf_counter() - started) / 60
            if not todo or elapsed > args.budget_min:
                print(f"[{elapsed:5.1f} min] {len(todo)} runs left; stopping", flush=True)
                break
            if base is None:
                base, tokenizer = load_causal_lm(MODEL), resolve_tokenizer(MODEL)
            missing_memory = [m for m in METHODS if training.memory_key(m) not in cache
                              and (args.methods is None or m.name in args.methods)]
            if missing_memory and not args.quick:
                method = missing_memory[0]
                print(f"[{elapsed:5.1f} min] client memory of {method.name}", flush=True)
                record = training.measure_memory(method, base, tokenizer, args.data_dir, code)
                save(training.memory_key(method), record, cache_dir)
                continue
            config = todo[0]
            print(f"[{elapsed:5.1f} min] {config.method} on {config.dataset}, seed {config.seed}, {config.steps} "
                  f"steps, lr {config.lr}, zo_lr {config.zo_lr} ({len(todo)} runs left)", flush=True)
            record = training.run(config, base, tokenizer, args.data_dir, code)
            save(config.key(), record, cache_dir)
            test = record.get("test", {})
            print(f"    {'diverged' if record['diverged'] else 'done'} in {record['train_s']:.0f} s; val loss "
                  f"{record['curve'][-1]['val_loss'] if record['curve'] else float('nan'):.4f}"
                  + (f", test acc {test['acc']:.4f}" if test else ""), flush=True)
            gc.collect()
    write(args.out, cache_dir, steps, seeds, n_test, sweep_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
