"""A tuning trial's two passes besides training, each timed the old way and the new way, side by side.

    python -m benchmarks.diagnostics.passes            # the tuning diagnostics' model and data (about 3 minutes)
    python -m benchmarks.diagnostics.passes --quick    # 2 blocks, 64 examples: a smoke run
    python -m benchmarks.diagnostics.passes --out DIR  # where passes.md goes (default benchmarks/results)

1. GradMatch's feature pass: one forward per candidate batch (``batch_feature`` stacked) against every example
   forwarded once, sorted by length into chunks of ``feature_batch_size`` (``candidate_features``, what
   ``SubsetSelection`` does).
2. Validation scoring: every class's row forwarded (``share_prompts=False``) against one forward per prompt when
   every label word is one token (``SplitCausalLM.sequence_log_likelihood``'s default).

Same model (SmolLM2-135M-Instruct's first 4 blocks, cut after block 2) and data as the retired tuning study
(``tuning_setup``). The two ways alternate for ``--repeats`` rounds after one warm-up each, and the table
gives every round's time: the machine's noise shows. The outputs of the two ways are compared too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hosl_lightning import PromptClassificationDataModule, SplitCausalLM, load_causal_lm
from hosl_lightning.tuning import (
    batch_feature,
    candidate_features,
    class_labels,
    example_lengths,
    partition,
)

from ..common.environment import RESULTS, code_state, command_line, machine
from ..common.models import prepare_model
from .tuning_setup import DATA

FULL = {"layers": 4, "num_train": 480, "num_validation": 200}
QUICK = {"layers": 2, "num_train": 64, "num_validation": 32}


def timed(run: Callable[[], torch.Tensor], repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``repeats`` runs after one warm-up, and the last output."""
    output = run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = run()
        seconds.append(time.perf_counter() - started)
    return seconds, output


def side_by_side(old: Callable[[], torch.Tensor], new: Callable[[], torch.Tensor], repeats: int):
    """The two ways alternated round by round, so that a slow spell of the machine hits both."""
    old_seconds, new_seconds = [], []
    old_out = new_out = None
    for _ in range(repeats):
        seconds, old_out = timed(old, 1)
        old_seconds += seconds
        seconds, new_out = timed(new, 1)
        new_seconds += seconds
    return old_seconds, new_seconds, old_out, new_out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 blocks, 64 training examples")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each way (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is not valid: it must be at least 1")
    size = QUICK if args.quick else FULL
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    work = RESULTS / ("_tuning_quick" if args.quick else "_tuning_tmp")
    model_dir = prepare_model(size["layers"], work / f"smollm2-135m-{size['layers']}-blocks")
    data = PromptClassificationDataModule(
        tokenizer=str(model_dir), task="rotten_tomatoes", data_dir=str(DATA), max_length=48, batch_size=16,
        eval_batch_size=64, seed=0, num_train=size["num_train"], num_validation=size["num_validation"], num_test=16)
    data.setup("fit")
    cut = min(2, size["layers"] - 1)
    model = SplitCausalLM(load_causal_lm(str(model_dir)), cut).eval()
    loader = data.train_dataloader()
    dataset = loader.dataset
    candidates = partition(len(dataset), 16, torch.Generator().manual_seed(1), class_labels(dataset))
    lengths = example_lengths(dataset, loader.collate_fn, range(len(dataset)))

    def per_candidate() -> torch.Tensor:
        return torch.stack([batch_feature(model, loader.collate_fn([dataset[i] for i in c])) for c in candidates])

    def length_sorted() -> torch.Tensor:
        return candidate_features(model, loader, candidates, lengths, 64, progress=False)

    validation = list(data.val_dataloader())

    def scores(share: bool) -> torch.Tensor:
        return torch.cat([model.sequence_log_likelihood(b["input_ids"], b["attention_mask"], b["labels"], share)
                          for b in validation])

    rows = []
    old_s, new_s, old_f, new_f = side_by_side(per_candidate, length_sorted, args.repeats)
    difference = float((new_f - old_f).norm() / old_f.norm())
    rows.append(("GradMatch feature pass", f"{len(dataset)} examples in {len(candidates)} candidates",
                 "one forward per candidate batch", "length-sorted chunks of 64", old_s, new_s,
                 f"relative difference of the features {difference:.1e}"))
    old_s, new_s, old_v, new_v = side_by_side(lambda: scores(False), lambda: scores(True), args.repeats)
    gold = torch.cat([b["class_labels"] for b in validation])
    accuracy = [float((v.view(-1, int(validation[0]["num_classes"])).argmax(1) == gold).float().mean()) for v in
                (old_v, new_v)]
    rows.append(("validation scoring", f"{len(gold)} examples x {validation[0]['num_classes']} classes",
                 "every class's row forwarded", "one forward per prompt", old_s, new_s,
                 (f"largest score difference {float((new_v - old_v).abs().max()):.1e}; accuracy "
                  f"{accuracy[0]:.3f} vs {accuracy[1]:.3f}")))

    command = command_line("diagnostics.passes", argv)
    lines = ["# A tuning trial's passes besides training: old way vs new way", "",
             f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Code: {code_state()}", "",
             (f"Model: SmolLM2-135M-Instruct's first {size['layers']} blocks, cut after block {cut}. Data: "
              "rotten_tomatoes as in the tuning diagnostics. Each way ran once to warm up, then the two alternated for "
              f"{args.repeats} timed rounds."), "",
             "| pass | work | old way | new way | old (s, per round) | new (s, per round) | speedup (mean) | outputs |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for name, work_done, old_way, new_way, old_s, new_s, check in rows:
        speedup = (sum(old_s) / len(old_s)) / (sum(new_s) / len(new_s))
        lines.append(f"| {name} | {work_done} | {old_way} | {new_way} | {', '.join(f'{s:.2f}' for s in old_s)} | "
                     f"{', '.join(f'{s:.2f}' for s in new_s)} | {speedup:.2f}x | {check} |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("passes-quick.md" if args.quick else "passes.md")
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
