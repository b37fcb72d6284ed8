"""Scoring by label-word likelihood, the classification loss, and the metrics HOSLModule reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import TINY_LLAMA
from hosl_lightning import HOSLModule, SplitCausalLM, load_causal_lm

C, B, T = 2, 3, 10


def _split() -> SplitCausalLM:
    torch.manual_seed(0)
    return SplitCausalLM(load_causal_lm(model_config=TINY_LLAMA), 1).eval()


def _candidate_batch() -> dict:
    """B examples x C candidates; each candidate's last two tokens are its label word."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (B * C, T), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "class_labels": torch.tensor([0, 1, 1]), "num_classes": C}


def _reference_log_likelihood(split: SplitCausalLM, batch: dict) -> torch.Tensor:
    logits = split(batch["input_ids"], batch["attention_mask"]).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def test_sequence_log_likelihood_matches_full_logits() -> None:
    split, batch = _split(), _candidate_batch()
    scores = split.sequence_log_likelihood(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(scores, _reference_log_likelihood(split, batch), rtol=1e-5, atol=1e-5)


def test_classification_loss_is_cross_entropy_over_candidate_likelihoods_per_group() -> None:
    split, batch = _split(), _candidate_batch()
    targets = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        acts = split.client_forward(batch["input_ids"], batch["attention_mask"])
        from hosl_lightning.model import concat_activations

        two = split.server_losses(concat_activations([acts, acts]), targets, groups=2)
        one = split.server_losses(acts, targets)
    expected = F.cross_entropy(_reference_log_likelihood(split, batch).view(B, C), batch["class_labels"])
    torch.testing.assert_close(one[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, expected.repeat(2), rtol=1e-5, atol=1e-5)


def test_lm_loss_without_labelled_tokens_is_refused() -> None:
    split, batch = _split(), _candidate_batch()
    acts = split.client_forward(batch["input_ids"])
    with pytest.raises(ValueError, match="no labelled tokens"):
        split.server_losses(acts, {"labels": torch.full_like(batch["labels"], -100)})


def _module_under_trainer() -> HOSLModule:
    torch.manual_seed(0)
    module = HOSLModule(model_config=TINY_LLAMA)
    module.model = SplitCausalLM(module.model, 1)  # what HOSLStrategy does at setup
    return module


def test_evaluate_reports_accuracy_macro_f1_and_loss_of_the_class_scores() -> None:
    module = _module_under_trainer()
    batch = _candidate_batch()
    scores = _reference_log_likelihood(module.model, batch).view(B, C)
    predictions = scores.argmax(-1)
    truth = batch["class_labels"]
    accuracy = (predictions == truth).float().mean().item()
    f1s = []
    for c in range(C):
        tp = ((predictions == c) & (truth == c)).sum().item()
        fp = ((predictions == c) & (truth != c)).sum().item()
        fn = ((predictions != c) & (truth == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    results = module.evaluate([batch], stage="val")
    assert set(results) == {"val_acc", "val_f1", "val_loss"}
    assert results["val_acc"] == pytest.approx(accuracy)
    assert results["val_f1"] == pytest.approx(sum(f1s) / C)
    assert results["val_loss"] == pytest.approx(F.cross_entropy(scores, truth).item(), rel=1e-5)
    again = module.evaluate([batch, batch], stage="val")  # metrics were reset: same scores, not accumulated
    assert again["val_acc"] == pytest.approx(accuracy)
    assert again["val_loss"] == pytest.approx(results["val_loss"], rel=1e-6)


def test_evaluate_reports_perplexity_for_language_modelling_batches() -> None:
    module = _module_under_trainer()
    ids = torch.randint(0, 64, (4, T), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = module.model(**batch).loss.item()
    results = module.evaluate([batch], stage="val")
    assert results["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert results["val_ppl"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)


def test_evaluate_refuses_zero_batches() -> None:
    with pytest.raises(ValueError, match="zero examples"):
        _module_under_trainer().evaluate(DataLoader([]), stage="val")
