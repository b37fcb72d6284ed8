"""Batches: padding token rows into tensors, in the layouts the HOSL module trains and scores on.

Batches are dicts of long tensors that any Hugging Face causal LM takes as is (labels are standard
causal-LM labels, -100 = ignored; the model shifts them itself). Prompt classification has two layouts:

* gold batches (training with ``loss="lm"``): one row per example, prompt + gold label word;
  ``labels`` hold the label word's token ids and -100 everywhere else.
* scoring batches (validation and test always; training too with ``loss="classification"``): one row per
  example and class, prompt + that class's label word, rows ordered example-major (row ``b * C + c``),
  with ``class_labels`` ``[B]`` (gold class index) and ``num_classes`` ``C`` (an int). A scorer sums each
  row's label-word log-likelihood and takes the arg-max over the C rows of an example.

Padding is done here, not by the tokenizer: ``padding_side`` ("right" by default, or "left") and the
tokenizer's pad token, set to its EOS token when it has none (:func:`~hosl_lightning.data.encoding.resolve_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hosl_lightning.data.encoding import EncodedExample

IGNORE_INDEX = -100


def pad_rows(
    rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, side: str
) -> dict[str, torch.Tensor]:
    """Pads token rows and their labels to the longest row: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(row) for row in rows)
    ids, mask, targets = [], [], []
    for row, label in zip(rows, labels, strict=True):
        fill = width - len(row)
        if side == "right":
            ids.append([*row, *[pad_id] * fill])
            mask.append([1] * len(row) + [0] * fill)
            targets.append([*label, *[IGNORE_INDEX] * fill])
        else:
            ids.append([*[pad_id] * fill, *row])
            mask.append([0] * fill + [1] * len(row))
            targets.append([*[IGNORE_INDEX] * fill, *label])
    as_long = lambda x: torch.tensor(x, dtype=torch.long)
    return {"input_ids": as_long(ids), "attention_mask": as_long(mask), "labels": as_long(targets)}


@dataclass(frozen=True)
class PromptCollator:
    """Builds gold batches (``score_all_classes=False``) or scoring batches (``True``) from EncodedExamples."""

    pad_id: int
    padding_side: str = "right"
    score_all_classes: bool = False

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, Any]:
        if self.score_all_classes:
            pairs = [(ex.prompt, answer) for ex in examples for answer in ex.answers]
        else:
            pairs = [(ex.prompt, ex.answers[ex.label]) for ex in examples]
        rows = [[*prompt, *answer] for prompt, answer in pairs]
        labels = [[IGNORE_INDEX] * len(prompt) + list(answer) for prompt, answer in pairs]
        batch: dict[str, Any] = pad_rows(rows, labels, self.pad_id, self.padding_side)
        if self.score_all_classes:
            batch["class_labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
            batch["num_classes"] = len(examples[0].answers)
        return batch


@dataclass(frozen=True)
class LMCollator:
    """Causal-LM batches: labels are the input ids, -100 on padding."""

    pad_id: int
    padding_side: str = "right"

    def __call__(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        return pad_rows(rows, rows, self.pad_id, self.padding_side)
