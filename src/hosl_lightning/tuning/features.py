"""GradMatch's gradient features: one forward over the split model per chunk of examples, no optimiser step.

A candidate batch's feature is the gradient of the loss training uses, at the server's final hidden state (dL/dh)
or at the LM head's projected weight: the mean labelled-token loss (``SplitCausalLM.server_row_features``), or,
for classification batches (``class_labels``, ``num_classes``), the mean cross-entropy over the classes' sequence
log-likelihoods (as ``SplitCausalLM.server_losses``); or, for classification, the gradient at the head's
label-word rows (``label_head_row_features``). MILO's fixed embeddings (``row_embeddings``) come from the same
pass. All are sums over examples, so the pass forwards every example once in length-sorted chunks and adds the
rows up per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from hosl_lightning.core.boundary import Targets
from hosl_lightning.core.split import CutActivations
from hosl_lightning.core.split_model import IGNORE_INDEX, SplitCausalLM, forwarded_inputs
from hosl_lightning.modes import eval_mode


def _is_classification(batch: dict[str, Any]) -> bool:
    """A batch in scoring layout (C rows per example), which training scores with the classification loss."""
    if not isinstance(batch, dict):
        raise TypeError(f"SubsetSelection needs batches that are dicts (with 'input_ids' and 'labels'), got "
                        f"{type(batch).__name__}")
    return "class_labels" in batch and "num_classes" in batch


def _gold_rows(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels``; of classification batches (C rows per example) the gold rows."""
    classification = _is_classification(batch)
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if classification:
        gold = torch.arange(len(batch["class_labels"]), device=input_ids.device) * int(batch["num_classes"])
        rows = gold + batch["class_labels"].to(input_ids.device)
        input_ids, labels = input_ids[rows], labels[rows]
        mask = None if mask is None else mask[rows]
    return input_ids, mask, labels


@contextmanager
def _at_server(model: SplitCausalLM, input_ids: Tensor, mask: Tensor | None,
               targets: Targets) -> Iterator[tuple[CutActivations, Targets]]:
    """The client's forward, then, on the server's side, its activations and the targets as the server receives
    them: every feature is computed there, where the labels and the head live."""
    activations = model.client_forward(input_ids, mask)
    with model.server_side():
        up, received = model.boundary.send_up(activations, targets)
        assert received is not None
        yield up, received


@torch.no_grad()
def row_features(model: SplitCausalLM, batch: dict[str, Any], projection: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each example's summed gradient features and its weight in the batch's mean loss.

    The loss is the one training uses on such a batch: the LM loss (weights: labelled-token counts,
    ``SplitCausalLM.server_row_features``), or the classification loss (weights: 1 per example).
    """
    if _is_classification(batch):
        return classification_row_features(model, batch, projection)
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    with _at_server(model, input_ids, mask, {"labels": labels}) as (up, targets):
        return model.server_row_features(up, targets["labels"], projection)


def _classification_forward(model: SplitCausalLM, batch: dict[str, Any]) -> tuple[Tensor, Targets, Tensor | None]:
    """A classification batch through both halves: the server's final hidden states, the targets as the server
    received them, and each row's source among the forwarded rows (prompts shared by one-token answers are
    forwarded once, as training and scoring do; None when nothing is shared)."""
    input_ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    num_classes = int(batch["num_classes"])
    if input_ids.shape[0] != len(batch["class_labels"]) * num_classes:
        raise ValueError(f"a classification batch needs num_classes={num_classes} rows per example, got "
                         f"{input_ids.shape[0]} rows for {len(batch['class_labels'])} examples")
    input_ids, mask, source_rows = forwarded_inputs(input_ids, mask, labels)
    with _at_server(model, input_ids, mask, {"labels": labels, "class_labels": batch["class_labels"]}) as (up, targets):
        final_hidden = model.server(up)
    return final_hidden, targets, None if source_rows is None else source_rows.to(final_hidden.device)


@torch.no_grad()
def classification_row_features(
    model: SplitCausalLM, batch: dict[str, Any], projection: Tensor | None = None, tokens_per_pass: int = 256
) -> tuple[Tensor, Tensor]:
    """Per example, the gradient of the classification loss (``SplitCausalLM.server_losses``); counts are 1.

    The loss is cross-entropy over the C candidates' log-likelihoods LL_c = -sum_t nll_t, so a candidate's
    token t gets the LM feature of its own nll (e_t W, or (P e_t) h_t^T) times (onehot_c - softmax(LL)_c).
    Prompts shared by one-token answers are forwarded once, as training and scoring do.
    """
    num_classes = int(batch["num_classes"])
    final_hidden, targets, source_rows = _classification_forward(model, batch)
    with model.server_side():
        device = final_hidden.device
        shifted = targets["labels"].to(device)[:, 1:]
        row, position = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        hidden = final_hidden[row if source_rows is None else source_rows[row], position]
        matrix = model.server.lm_head.weight.float() if projection is None else projection.to(device).mT
        nll, errors = _token_errors(model, hidden, shifted[row, position], matrix, tokens_per_pass)
        log_likelihood = -torch.zeros(len(shifted), device=device).index_add(0, row, nll)
        class_labels = targets["class_labels"].to(device)
        coefficient = F.one_hot(class_labels, num_classes).float() - log_likelihood.view(-1, num_classes).softmax(-1)
        errors = errors * coefficient.flatten()[row, None]  # dL/d(token's own nll feature), per token
        example = torch.div(row, num_classes, rounding_mode="floor")
        examples = len(class_labels)
        if projection is None:
            sums = torch.zeros(examples, errors.shape[1], device=device).index_add(0, example, errors)
        else:  # sum_t (coefficient_t P e_t) h_t^T per example, a bounded number of tokens at a time
            sums = torch.zeros(examples, errors.shape[1] * hidden.shape[1], device=device)
            for start in range(0, len(errors), tokens_per_pass):
                part = slice(start, start + tokens_per_pass)
                sums.index_add_(0, example[part], (errors[part, :, None] * hidden[part, None, :].float()).flatten(1))
        return sums, torch.ones(examples, dtype=torch.long, device=device)


@torch.no_grad()
def label_head_row_features(model: SplitCausalLM, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per example, the classification loss's gradient at the LM head's label-word rows: C x hidden numbers.

    Row c is (p_c - y_c) h_c, with p the softmax over the C candidates' log-likelihoods (the loss training
    uses), y the gold one-hot and h_c the final hidden state that scores candidate c's first answer token.
    When the answers are single tokens after a shared prompt this is exactly the loss's gradient at those
    rows (and zero elsewhere): the last-layer gradient CORDS and AUTOMATA match, small, and it sees the input.
    Longer answers keep their first token's row, an approximation. Counts are 1 per example.
    """
    if not _is_classification(batch):
        raise ValueError("feature='label_head' needs classification batches (with 'class_labels' and "
                         "'num_classes', as PromptClassificationDataModule makes); use feature='hidden' or 'head'")
    num_classes, examples = int(batch["num_classes"]), len(batch["class_labels"])
    final_hidden, targets, sources = _classification_forward(model, batch)
    with model.server_side():
        device = final_hidden.device
        wanted = targets["labels"].to(device)
        nll, row = model._label_token_nll(final_hidden, wanted, sources)
        log_likelihood = -torch.zeros(len(wanted), device=device).index_add(0, row, nll)
        probabilities = log_likelihood.view(examples, num_classes).softmax(-1)
        errors = probabilities - F.one_hot(targets["class_labels"].to(device), num_classes).float()
        labelled = wanted[:, 1:] != IGNORE_INDEX
        first = labelled.float().argmax(dim=1)  # each candidate's first scored position
        rows = torch.arange(len(wanted), device=device)
        hidden = final_hidden[rows if sources is None else sources, first].float()
        features = errors.reshape(-1, 1) * hidden  # (examples * C) x hidden
        return features.view(examples, -1), torch.ones(examples, dtype=torch.long, device=device)


@torch.no_grad()
def row_embeddings(model: SplitCausalLM, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Each example's fixed embedding: the final hidden state where its answer is scored (classification: the gold
    row's first answer position; LM: the mean over labelled positions). What model-agnostic selection covers."""
    input_ids, mask, labels = _gold_rows(batch)
    with _at_server(model, input_ids, mask, {"labels": labels}) as (up, targets):
        final_hidden = model.server(up)[:, :-1].float()
        labelled = (targets["labels"].to(final_hidden.device)[:, 1:] != IGNORE_INDEX).float()
        if _is_classification(batch):  # the first answer position, the one the label words are scored from
            labelled = F.one_hot(labelled.argmax(dim=1), labelled.shape[1]).float()
        counts = labelled.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("an example has no labelled tokens (all labels are -100): it has no embedding")
        sums = torch.einsum("rp,rph->rh", labelled, final_hidden) / counts[:, None]
        return sums, torch.ones(len(sums), dtype=torch.long, device=sums.device)


def _token_errors(
    model: SplitCausalLM, hidden: Tensor, wanted: Tensor, matrix: Tensor, tokens_per_pass: int
) -> tuple[Tensor, Tensor]:
    """Each token's next-token loss and its error e_t = softmax - onehot times ``matrix`` (logits in bounded passes)."""
    losses, errors = [], []
    for start in range(0, len(hidden), tokens_per_pass):
        log_probs = model.server.logits(hidden[start : start + tokens_per_pass]).float().log_softmax(dim=-1)
        picked = wanted[start : start + tokens_per_pass, None]
        losses.append(-log_probs.gather(1, picked).squeeze(1))
        errors.append(log_probs.exp().scatter_add(1, picked, -torch.ones_like(picked, dtype=log_probs.dtype)) @ matrix)
    if not losses:
        return hidden.new_zeros(0).float(), hidden.new_zeros(0, matrix.shape[1]).float()
    return torch.cat(losses), torch.cat(errors)


def batch_feature(model: SplitCausalLM, batch: dict[str, Any], projection: Tensor | None = None) -> Tensor:
    """One batch's gradient feature: the gradient of its mean training loss (dL/dh, or the projected head's)."""
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
    rows_of: Callable[[SplitCausalLM, dict[str, Any]], tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Every candidate batch's gradient feature, from forwards over all its examples grouped by length.

    A candidate's feature is the mean over its labelled tokens, which is a sum over its examples; so the
    examples need not be forwarded in their candidate batches. They go in chunks of ``batch_size`` examples of
    about equal ``lengths`` (indexed by example), which wastes almost nothing on padding and amortises each
    forward over more rows. The result equals stacking ``batch_feature`` over the candidates, up to rounding.
    ``rows_of`` replaces ``row_features`` (with ``projection``) as what a chunk's examples give, e.g.
    ``label_head_row_features`` or ``row_embeddings``; singleton candidates make it per example.
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
            batch = move_data_to_device(batch, device)
            row_sums, row_counts = (row_features(model, batch, projection) if rows_of is None
                                    else rows_of(model, batch))
            if sums is None:
                sums = torch.zeros(len(candidates), row_sums.shape[1])
            sums.index_add_(0, owner[chunk], row_sums.cpu())
            counts.index_add_(0, owner[chunk], row_counts.cpu())
    assert sums is not None
    if bool((counts == 0).any()):
        raise ValueError("a candidate batch has no labelled tokens (all labels are -100): it has no feature")
    return sums / counts[:, None]


def vocabulary_projection(vocab: int, rows: int, seed: int) -> Tensor:
    """A fixed random sign matrix (rows x vocab) scaled by 1/sqrt(rows): inner products survive it on average."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (rows, vocab), generator=generator, dtype=torch.float32) * 2.0 - 1.0
    return signs / rows**0.5


class FeaturePass:
    """A fit's feature passes over its training data, keeping what stays fixed between selections.

    The examples' collated lengths (for the length-sorted chunks) are measured once per dataset, and the
    ``feature="head"`` projection is drawn once from ``seed``; every selection then costs only its forwards.
    """

    def __init__(self, feature: str, feature_rows: int, batch_size: int, seed: int, progress: bool) -> None:
        self.feature, self.feature_rows, self.batch_size = feature, feature_rows, batch_size
        self.seed, self.progress = seed, progress
        self._projection: Tensor | None = None
        self._lengths: Tensor | None = None
        self._dataset: Any = None

    def __call__(
        self, model: SplitCausalLM, loader: DataLoader, candidates: Sequence[list[int]], device: torch.device | str,
        description: str, rows_of: Callable[[SplitCausalLM, dict[str, Any]], tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Each candidate's feature (or, with ``rows_of``, what it gives per row summed per candidate)."""
        if self.feature == "head" and self._projection is None:
            vocab = model.server.lm_head.out_features
            self._projection = vocabulary_projection(vocab, self.feature_rows, self.seed).to(device)  # one copy
        if self._lengths is None or loader.dataset is not self._dataset:
            self._dataset = loader.dataset
            self._lengths = example_lengths(loader.dataset, loader.collate_fn, range(len(loader.dataset)))  # type: ignore[arg-type]
        if rows_of is None and self.feature == "label_head":
            rows_of = label_head_row_features
        return candidate_features(model, loader, candidates, self._lengths, self.batch_size, self._projection, device,
                                  self.progress, description, rows_of)
