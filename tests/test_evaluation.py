"""Scoring by label-word likelihood, the classification loss, and the metrics HOSLModule reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA
from torch.utils.data import DataLoader

from hosl_lightning import HOSLModule, SplitCausalLM, load_causal_lm
from hosl_lightning.core.split_model import shared_prompts

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


def _one_token_answers(lengths: list[int], answers: list[int], left: bool = False) -> dict:
    """Prompts of the given lengths (padded to the longest), each followed by every answer token in turn."""
    generator = torch.Generator().manual_seed(2)
    width = max(lengths) + 1
    ids, mask, labels = [], [], []
    for length in lengths:
        prompt = torch.randint(4, 64, (length,), generator=generator).tolist()
        for answer in answers:
            row, pad = [*prompt, answer], [0] * (width - length - 1)
            ids.append(pad + row if left else row + pad)
            mask.append([0] * len(pad) + [1] * len(row) if left else [1] * len(row) + [0] * len(pad))
            label = [-100] * length + [answer]
            labels.append([-100] * len(pad) + label if left else label + [-100] * len(pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


class _RowCounter:
    def __init__(self, split: SplitCausalLM) -> None:
        self.rows: list[int] = []
        split.client.register_forward_pre_hook(lambda _, args: self.rows.append(args[0].shape[0]))


@pytest.mark.parametrize("left", [False, True])
def test_one_token_answers_to_one_prompt_share_a_forward_and_score_as_if_alone(left: bool) -> None:
    split, batch = _split(), _one_token_answers([3, 7, 5], answers=[11, 12, 13], left=left)
    counter = _RowCounter(split)
    scores = split.sequence_log_likelihood(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert counter.rows == [3]  # 9 rows scored, 3 prompts forwarded
    alone = torch.cat([split.sequence_log_likelihood(batch["input_ids"][r : r + 1], batch["attention_mask"][r : r + 1],
                                                     batch["labels"][r : r + 1]) for r in range(9)])
    assert torch.allclose(scores, alone, atol=1e-5)
    assert torch.allclose(scores, _reference_log_likelihood(split, batch), atol=1e-5)
    assert len(set(scores.tolist())) == 9  # every answer scored on its own token


def test_rows_share_a_forward_only_when_they_differ_in_one_labelled_token() -> None:
    batch = _one_token_answers([4, 4], answers=[11, 12])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    representatives, source_rows = shared_prompts(ids, mask, labels)
    assert representatives is not None and len(representatives) == 2
    assert source_rows[0] == source_rows[1] != source_rows[2] == source_rows[3]
    two_tokens = labels.clone()
    two_tokens[:, 3] = ids[:, 3]  # the prompt's last token is labelled too: answers of two tokens
    assert shared_prompts(ids, mask, two_tokens) == (None, None)
    other_prompt = ids.clone()
    other_prompt[1, 0] += 1  # rows 0 and 1 now differ before the answer
    representatives, source_rows = shared_prompts(other_prompt, mask, labels)
    assert representatives is not None and len(representatives) == 3 and source_rows[0] != source_rows[1]
    split = _split()
    counter = _RowCounter(split)
    batch = _candidate_batch()  # two-token label words: every row forwarded
    split.sequence_log_likelihood(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert counter.rows == [B * C]


def test_classification_loss_is_cross_entropy_over_candidate_likelihoods_per_group() -> None:
    split, batch = _split(), _candidate_batch()
    targets = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        acts = split.client_forward(batch["input_ids"], batch["attention_mask"])
        from hosl_lightning.core.split_model import concat_activations

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
