"""GradMatch's gradient features: one forward over the split model per chunk of examples, no optimiser step.

A candidate batch's feature is the gradient of its mean labelled-token loss at the server's final hidden state
(dL/dh, ``SplitCausalLM.server_row_features``) or at the LM head's projected weight. Both are sums over
examples, so the pass forwards every example once in length-sorted chunks and adds the rows up per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.modes import eval_mode


def _gold_rows(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels``; of classification batches (C rows per example) the gold rows."""
    if not isinstance(batch, dict):
        raise TypeError(f"SubsetSelection needs batches that are dicts (with 'input_ids' and 'labels'), got "
                        f"{type(batch).__name__}")
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if "class_labels" in batch and "num_classes" in batch:
        gold = torch.arange(len(batch["class_labels"]), device=input_ids.device) * int(batch["num_classes"])
        rows = gold + batch["class_labels"].to(input_ids.device)
        input_ids, labels = input_ids[rows], labels[rows]
        mask = None if mask is None else mask[rows]
    return input_ids, mask, labels


@torch.no_grad()
def row_features(model: SplitCausalLM, batch: dict[str, Any], projection: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each example's summed token features and labelled-token count (``SplitCausalLM.server_row_features``)."""
    input_ids, mask, labels = _gold_rows(batch)
    activations = model.client_forward(input_ids, mask)
    with model.server_side():
        up, targets = model.boundary.send_up(activations, {"labels": labels})
        assert targets is not None
        return model.server_row_features(up, targets["labels"], projection)


def batch_feature(model: SplitCausalLM, batch: dict[str, Any], projection: Tensor | None = None) -> Tensor:
    """One batch's gradient feature: the gradient of its mean labelled-token loss (dL/dh, or the projected head's)."""
    sums, counts = row_features(model, batch, projection)
    if int(counts.sum()) == 0:
        raise ValueError("a batch has no labelled tokens (all labels are -100): it has no gradient feature")
    return sums.sum(dim=0) / counts.sum()


def example_lengths(dataset: Any, collate: Callable[[list[Any]], Any], indices: Sequence[int]) -> Tensor:
    """The length of each example's (gold) row once collated alone: what the feature pass groups examples by."""
    lengths = []
    for index in indices:
        input_ids, mask, _ = _gold_rows(collate([dataset[index]]))
        lengths.append(int(mask.sum()) if mask is not None else input_ids.shape[1])
    return torch.tensor(lengths, dtype=torch.long)


def candidate_features(
    model: SplitCausalLM,
    loader: DataLoader,
    candidates: Sequence[list[int]],
    lengths: Tensor,
    batch_size: int,
    projection: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "GradMatch features",
) -> Tensor:
    """Every candidate batch's gradient feature, from forwards over all its examples grouped by length.

    A candidate's feature is the mean over its labelled tokens, which is a sum over its examples; so the
    examples need not be forwarded in their candidate batches. They go in chunks of ``batch_size`` examples of
    about equal ``lengths`` (indexed by example), which wastes almost nothing on padding and amortises each
    forward over more rows. The result equals stacking ``batch_feature`` over the candidates, up to rounding.
    """
    examples = torch.tensor([index for batch in candidates for index in batch], dtype=torch.long)
    owner = torch.tensor([c for c, batch in enumerate(candidates) for _ in batch], dtype=torch.long)
    order = lengths[examples].argsort(stable=True)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    feature_loader = DataLoader(
        loader.dataset, batch_sampler=[examples[chunk].tolist() for chunk in chunks], collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )
    sums: Tensor | None = None
    counts = torch.zeros(len(candidates), dtype=torch.long)
    bar = tqdm(feature_loader, desc=description, leave=False, disable=not progress)
    with eval_mode(model):
        for chunk, batch in zip(chunks, bar):
            row_sums, row_counts = row_features(model, move_data_to_device(batch, device), projection)
            if sums is None:
                sums = torch.zeros(len(candidates), row_sums.shape[1])
            sums.index_add_(0, owner[chunk], row_sums.cpu())
            counts.index_add_(0, owner[chunk], row_counts.cpu())
    assert sums is not None
    if bool((counts == 0).any()):
        raise ValueError("a candidate batch has no labelled tokens (all labels are -100): it has no gradient feature")
    return sums / counts[:, None]


def vocabulary_projection(vocab: int, rows: int, seed: int) -> Tensor:
    """A fixed random sign matrix (rows x vocab) scaled by 1/sqrt(rows): inner products survive it on average."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (rows, vocab), generator=generator, dtype=torch.float32) * 2.0 - 1.0
    return signs / rows**0.5
