"""Subset selection: GradMatch's matching pursuit, the gradient feature, batch weights in every loss, the callback."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from hosl_lightning import (
    HOSLModule,
    HOSLStrategy,
    SplitCausalLM,
    SyntheticLMDataModule,
)
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.sync import weights_digest
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import hosl_step
from hosl_lightning.tuning import (
    SelectionCache,
    SubsetSelection,
    batch_feature,
    candidate_features,
    class_labels,
    example_lengths,
    gradmatch,
    nnls,
    orthogonal_matching_pursuit,
    partition,
    random_subset,
    subset_length,
    vocabulary_projection,
)

# ---- matching pursuit ---------------------------------------------------------------------------------------


def test_nnls_matches_the_clamped_solution_of_a_diagonal_problem() -> None:
    gram = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    rhs = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(nnls(gram, rhs), torch.tensor([3.0, 0.0, 0.5], dtype=torch.float64), atol=1e-6)


def test_omp_recovers_a_nonnegative_combination_and_skips_anticorrelated_rows() -> None:
    torch.manual_seed(0)
    features = torch.randn(50, 16)
    target = 2.0 * features[7] + 0.5 * features[31]
    features[3] = -target  # perfectly anti-correlated: a non-negative weight can never use it
    chosen, weights, residual = orthogonal_matching_pursuit(features, target, budget=5, ridge=0.0)
    assert sorted(chosen) == [7, 31]  # stops once matched, before spending the budget
    assert torch.allclose(weights[[chosen.index(7), chosen.index(31)]], torch.tensor([2.0, 0.5]), atol=1e-3)
    assert residual < 1e-3
    assert 3 not in chosen


def test_gradmatch_fills_the_budget_and_weights_average_one() -> None:
    torch.manual_seed(0)
    features = torch.randn(40, 8).abs()  # all positively correlated with their mean
    chosen = gradmatch(features, budget=10, generator=torch.Generator().manual_seed(0))
    assert len(chosen.indices) == len(set(chosen.indices)) == 10
    matched = chosen.weights[: chosen.matched]
    assert all(w > 0 for w in chosen.weights)
    assert sum(matched) / len(matched) == pytest.approx(1.0)
    assert chosen.weights[chosen.matched:] == [1.0] * (10 - chosen.matched)


def test_gradmatch_matches_the_mean_gradient_better_than_random_picks() -> None:
    torch.manual_seed(0)
    features = torch.randn(200, 32) + torch.linspace(-1, 1, 32)
    target = features.mean(dim=0)

    def error(indices: list[int], weights: list[float]) -> float:
        w = torch.tensor(weights)
        estimate = (w[:, None] * features[indices]).sum(dim=0) / len(indices)  # mean-1 weights: sum / k ~ mean
        return float((estimate - target).norm() / target.norm())

    chosen = gradmatch(features, budget=20, generator=torch.Generator().manual_seed(0))
    random_errors = [error(random_subset(200, 20, torch.Generator().manual_seed(s)).indices, [1.0] * 20)
                     for s in range(20)]
    assert chosen.residual < 0.5
    assert error(chosen.indices, chosen.weights) < min(random_errors)


def test_budget_outside_the_candidates_is_refused() -> None:
    with pytest.raises(ValueError, match=r"budget=11 is not valid: it must be between 1 and the number of candidates \(10\)"):
        orthogonal_matching_pursuit(torch.randn(10, 4), torch.randn(4), budget=11)


def test_subset_length_rounds_up_without_float_noise() -> None:
    assert subset_length(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert subset_length(0.1, 31) == 4
    assert subset_length(0.01, 5) == 1


# ---- the gradient feature and the weights in the losses -------------------------------------------------------


def _split(cut: int = 1) -> SplitCausalLM:
    torch.manual_seed(0)
    return SplitCausalLM(HOSLModule(model_config=TINY_LLAMA).model, cut)


def _batch(rows: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (rows, length), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[:, -3:] = input_ids[:, -3:]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_batch_feature_is_the_loss_gradient_at_the_final_hidden_state() -> None:
    model, batch = _split(), _batch()
    feature = batch_feature(model, batch)
    assert all(p.grad is None for p in model.parameters())  # only a local gradient: no parameter is touched
    # Reference: full autograd, with the final hidden state as a leaf.
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    hidden = model.server(activations).detach().requires_grad_(True)
    logits = model.server.logits(hidden)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert feature.shape == (TINY_LLAMA["hidden_size"],)
    assert torch.allclose(feature, hidden.grad.sum(dim=(0, 1)), atol=1e-6)


def test_head_feature_is_the_projected_weight_gradient_of_the_lm_head() -> None:
    model, batch = _split(), _batch()
    head = model.server.lm_head
    projection = vocabulary_projection(head.out_features, 5, seed=3)
    feature = batch_feature(model, batch, projection)
    assert all(p.grad is None for p in model.parameters())
    # Reference: autograd's gradient of the head's weight (vocab x hidden) under the mean labelled-token loss.
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    hidden = model.server(activations).detach()
    weight = head.weight.detach().clone().requires_grad_(True)
    logits = F.linear(hidden, weight, head.bias)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    (gradient,) = torch.autograd.grad(loss, weight)
    assert feature.shape == (5 * TINY_LLAMA["hidden_size"],)
    assert torch.allclose(feature, (projection @ gradient).flatten(), atol=1e-6)
    assert torch.equal(projection, vocabulary_projection(head.out_features, 5, seed=3))  # fixed by the seed
    assert torch.allclose(projection.abs(), torch.full_like(projection, 5**-0.5))


def _classification_batch(answers: list[list[int]], class_of: list[int], prompt: int = 6) -> dict:
    """A batch in scoring layout: each example's prompt once per class, followed by that class's answer tokens
    (labelled), right-padded with an unlabelled, masked-out 0."""
    generator = torch.Generator().manual_seed(1)
    width = prompt + max(len(a) for a in answers)
    rows, labels, masks = [], [], []
    for _ in class_of:
        prompt_ids = torch.randint(1, 64, (prompt,), generator=generator).tolist()
        for answer in answers:
            pad = width - prompt - len(answer)
            rows.append(prompt_ids + answer + [0] * pad)
            labels.append([-100] * prompt + answer + [-100] * pad)
            masks.append([1] * (prompt + len(answer)) + [0] * pad)
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks), "labels": torch.tensor(labels),
            "class_labels": torch.tensor(class_of), "num_classes": len(answers)}


@pytest.mark.parametrize("answers", [[[11], [12]], [[11, 21], [12, 22]], [[11], [12, 22], [13, 23, 33]]],
                         ids=["one-token answers (shared prompts)", "two-token answers", "ragged, padded answers"])
def test_classification_features_are_the_gradients_of_the_classification_loss(answers: list[list[int]]) -> None:
    model = _split()
    batch = _classification_batch(answers, class_of=[1, 0, len(answers) - 1, 0])
    projection = vocabulary_projection(TINY_LLAMA["vocab_size"], 5, seed=3)
    hidden_feature, head_feature = batch_feature(model, batch), batch_feature(model, batch, projection)
    assert all(p.grad is None for p in model.parameters())
    # Reference: autograd through the loss training uses (SplitCausalLM.server_losses, cross-entropy over the
    # classes' sequence log-likelihoods), at the final hidden state and at the LM head's weight.
    with torch.no_grad():
        activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    final: list[torch.Tensor] = []
    hook = model.server.register_forward_hook(lambda module, args, out: final.append(out) or out.retain_grad())
    loss = model.server_losses(activations, {k: batch[k] for k in ("labels", "class_labels", "num_classes")})
    hook.remove()
    loss.sum().backward()
    assert torch.allclose(hidden_feature, final[0].grad.sum(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(head_feature, (projection @ model.server.lm_head.weight.grad).flatten(), atol=1e-6)
    # and it is not the LM loss of the gold rows, which the feature used to be
    gold = torch.arange(4) * len(answers) + batch["class_labels"]
    lm_feature = batch_feature(model, {k: batch[k][gold] for k in ("input_ids", "attention_mask", "labels")})
    assert not torch.allclose(hidden_feature, lm_feature, atol=1e-4)


@pytest.mark.parametrize("loss", ["lm", "classification"])
@pytest.mark.parametrize("feature_rows", [None, 3])
def test_length_sorted_feature_pass_equals_one_forward_per_candidate(tmp_path: Path, loss: str, feature_rows) -> None:
    from test_tasks import sentiment_dm, word_tokenizer

    words = ["a", "great", "movie", "and", "the", "plot", "was", "long"]
    rows = [{"text": " ".join(words[: 1 + (i * 5) % 8]), "label": "positive" if i % 3 else "negative"} for i in range(21)]
    tokenizer = word_tokenizer()
    data = sentiment_dm(tmp_path, tokenizer, rows, batch_size=4, eval_batch_size=4, loss=loss)
    data.setup("fit")
    loader = data.train_dataloader()
    torch.manual_seed(0)
    model = SplitCausalLM(HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=len(tokenizer))).model, 1).eval()
    projection = None if feature_rows is None else vocabulary_projection(len(tokenizer), feature_rows, seed=0)
    candidates = partition(21, 4, torch.Generator().manual_seed(2))  # 6 candidates, the last of 1 example
    lengths = example_lengths(loader.dataset, loader.collate_fn, range(21))
    assert len(lengths.unique()) >= 5  # lengths vary, so sorted chunks mix examples of different candidates
    expected = torch.stack([batch_feature(model, loader.collate_fn([loader.dataset[i] for i in c]), projection)
                            for c in candidates])
    features = candidate_features(model, loader, candidates, lengths, batch_size=5, projection=projection,
                                  progress=False)
    assert features.shape == expected.shape
    assert torch.allclose(features, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(features, expected.roll(1, dims=0), atol=1e-5, rtol=1e-4)  # and told apart


def test_row_features_do_not_depend_on_how_many_tokens_share_a_pass() -> None:
    model, batch = _split(), _batch(rows=5)
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    projection = vocabulary_projection(TINY_LLAMA["vocab_size"], 4, seed=1)
    for used in (None, projection):
        sums, counts = model.server_row_features(activations, batch["labels"], used)
        small_sums, small_counts = model.server_row_features(activations, batch["labels"], used, tokens_per_pass=2)
        assert counts.tolist() == small_counts.tolist() == [3] * 5
        assert torch.allclose(sums, small_sums, atol=1e-6)


def test_gradmatch_on_the_head_feature_chooses_and_trains() -> None:
    selection = SubsetSelection("gradmatch", fraction=0.25, feature="head", feature_rows=4, progress=False)
    _, log = _fit(selection, steps=2)
    assert selection.last is not None and selection.last.matched >= 1 and len(log.weights) == 2
    assert all(any(w == pytest.approx(c) for c in selection.last.weights) for w in log.weights)


def test_loss_weight_scales_every_group_loss() -> None:
    model, batch = _split(), _batch()
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    plain = model.server_losses(activations, {"labels": batch["labels"]})
    weighted = model.server_losses(activations, {"labels": batch["labels"], "loss_weight": torch.tensor(2.5)})
    assert torch.allclose(weighted, 2.5 * plain)
    with pytest.raises(ValueError, match="loss_weight must be a scalar tensor"):
        model.server_losses(activations, {"labels": batch["labels"], "loss_weight": torch.ones(2, 2)})


@pytest.mark.parametrize("server_grad", ["perturbed", "mean", "clean"])
def test_loss_weight_scales_the_zo_difference_and_the_server_loss(server_grad: str) -> None:
    def step(weight: float | None) -> tuple[torch.Tensor, list[float]]:
        model, batch = _split(), _batch()
        if weight is not None:
            batch["loss_weight"] = torch.tensor(weight)
        optimizer = ZOSGD(list(model.client.named_parameters()), lr=0.0, seed=3)
        backward_losses: list[float] = []
        output = hosl_step(model, batch, optimizer, ZOSettings(queries=2, server_grad=server_grad), 0,
                           lambda loss: backward_losses.append(float(loss.detach())))
        assert output.estimate is not None
        return output.estimate.coefficients, backward_losses

    (plain, plain_losses), (weighted, weighted_losses) = step(None), step(3.0)
    assert torch.allclose(weighted, 3.0 * plain, rtol=1e-4)
    assert weighted_losses == pytest.approx([3.0 * x for x in plain_losses], rel=1e-5)


def test_dropin_module_never_sees_loss_weight_and_a_zero_weight_moves_nothing() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = HOSLModule(model_config=TINY_LLAMA).model
            self.keys: list[set[str]] = []

        def training_step(self, batch, batch_idx):
            self.keys.append(set(batch))
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class ZeroWeight(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batch["loss_weight"] = torch.tensor(0.0)

    module = Plain()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-2), max_steps=2, callbacks=[ZeroWeight()])
    trainer.fit(module, tiny_data())
    assert module.keys and all("loss_weight" not in keys for keys in module.keys)
    after = trainer.strategy.split_model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], before.get(k, after[k]))]
    assert moved == []


# ---- the callback ------------------------------------------------------------------------------------------


class BatchLog(Callback):
    """Records the weight and the example rows of every training batch."""

    def __init__(self) -> None:
        self.weights: list[float] = []
        self.rows: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(float(batch["loss_weight"]))
        self.rows.append(batch["input_ids"].clone())


def _fit(selection: SubsetSelection, steps: int, train_size: int = 128, **trainer_kwargs):
    L.seed_everything(0)
    module = HOSLModule(model_config=TINY_LLAMA)
    log = BatchLog()
    callbacks = [selection, log, *trainer_kwargs.pop("callbacks", [])]
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3), max_steps=steps, callbacks=callbacks,
                            **trainer_kwargs)
    trainer.fit(module, tiny_data(train_size=train_size), ckpt_path=ckpt_path)
    return trainer, log


@pytest.mark.parametrize("method", ["gradmatch", "random", "full"])
def test_each_method_trains_on_its_chosen_weighted_batches(method: str) -> None:
    selection = SubsetSelection(method, fraction=0.25, every_n_steps=100, progress=False)
    candidates = math.ceil(128 / 8)
    trainer, log = _fit(selection, steps=candidates if method == "full" else 4)  # one epoch
    assert trainer.num_training_batches == (candidates if method == "full" else 4)
    chosen = selection.last
    assert chosen is not None and len(chosen.indices) == trainer.num_training_batches
    assert sorted(log.weights) == pytest.approx(sorted(chosen.weights))  # one epoch: each chosen batch once
    if method != "gradmatch":
        assert set(log.weights) == {1.0}
    else:
        assert chosen.matched >= 1
    data = tiny_data(train_size=128)
    data.setup("fit")
    for rows in log.rows:  # every batch is one of the candidate batches: rows of the training set, batch_size of them
        assert rows.shape[0] == 8
        for row in rows:
            assert any(torch.equal(row, data.train_set[i]["input_ids"]) for i in range(128))


def test_selection_repeats_every_n_steps_and_logs_its_time() -> None:
    selection = SubsetSelection("gradmatch", fraction=0.25, every_n_steps=3, progress=False)
    trainer, _ = _fit(selection, steps=7)
    assert selection.selections == 1 + 7 // 3
    at_the_end = SubsetSelection("gradmatch", fraction=0.25, every_n_steps=3, progress=False)
    _fit(at_the_end, steps=6)
    assert at_the_end.selections == 2  # at the start and after step 3; none after the last step
    assert float(trainer.callback_metrics["subset/selection_sec"]) == pytest.approx(selection.selection_seconds)


def test_reloaded_dataloaders_keep_the_current_choice() -> None:
    selection = SubsetSelection("random", fraction=0.25, every_n_steps=100, progress=False)
    trainer, log = _fit(selection, steps=8, reload_dataloaders_every_n_epochs=1)  # two epochs of 4
    assert trainer.current_epoch == 2 and len(log.rows) == 8
    chosen = {tuple(row.tolist()) for rows in log.rows[:4] for row in rows}
    assert {tuple(row.tolist()) for rows in log.rows[4:] for row in rows} == chosen


def test_selection_cache_reuses_the_first_choice_of_identical_weights() -> None:
    cache = SelectionCache()
    first = SubsetSelection("gradmatch", fraction=0.25, cache=cache, progress=False)
    _, log_a = _fit(first, steps=2)
    second = SubsetSelection("gradmatch", fraction=0.25, cache=cache, progress=False)
    _, log_b = _fit(second, steps=2)
    assert cache.hits == 1
    assert second.last == first.last is not None  # a hit also says what was chosen
    assert log_a.weights == log_b.weights
    assert all(torch.equal(a, b) for a, b in zip(log_a.rows, log_b.rows))


@pytest.mark.parametrize("warm_start_steps", [0, 4])  # 4: the checkpoint falls in the warm start, which ends after
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(warm_start_steps: int, tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    options = {"every_n_steps": 2, "warm_start_steps": warm_start_steps, "progress": False}
    uninterrupted, log_a = _fit(SubsetSelection("gradmatch", 0.25, **options), steps=6,
                                callbacks=[checkpoint], enable_checkpointing=True)
    resumed, log_b = _fit(SubsetSelection("gradmatch", 0.25, **options), steps=6,
                          ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert log_b.weights == log_a.weights[3:]
    assert all(torch.equal(a, b) for a, b in zip(log_a.rows[3:], log_b.rows))
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_trains_on_random_batches_then_chooses_from_the_weights_it_left() -> None:
    choices: list[tuple[int, bool, str]] = []  # (steps trained, still warming, digest of the weights) per choice

    class Recording(SubsetSelection):
        def _select(self, trainer: L.Trainer) -> None:
            choices.append((self._steps, self._warming, weights_digest(trainer.strategy.split_model)))
            super()._select(trainer)

    selection = Recording("gradmatch", fraction=0.25, every_n_steps=100, warm_start_steps=6, progress=False)
    _, log = _fit(selection, steps=10)  # subset epochs of 4 batches
    # random batches re-drawn each subset epoch of the warm start, then GradMatch once it ends
    assert [(steps, warming) for steps, warming, _ in choices] == [(0, True), (4, True), (6, False)]
    assert choices[2][2] != choices[0][2]  # GradMatch saw the weights after the warm start, not the pretrained ones
    assert log.weights[:6] == [1.0] * 6
    chosen = selection.last
    assert chosen is not None and chosen.matched >= 1
    assert all(any(w == pytest.approx(c) for c in chosen.weights) for w in log.weights[6:])
    warm_rows = {tuple(row.tolist()) for rows in log.rows[:4] for row in rows}
    assert {tuple(row.tolist()) for rows in log.rows[4:6] for row in rows} - warm_rows  # a fresh draw


def test_warm_start_leaves_full_data_training_as_it_is() -> None:
    _, plain = _fit(SubsetSelection("full", progress=False), steps=5)
    _, warm = _fit(SubsetSelection("full", warm_start_steps=3, progress=False), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(plain.rows, warm.rows, strict=True))


def test_stratified_candidates_keep_the_class_mix_in_every_batch() -> None:
    labels = torch.tensor([1] * 265 + [0] * 215)[torch.randperm(480, generator=torch.Generator().manual_seed(0))]
    expected = 16 * 265 / 480

    def worst(batches: list[list[int]]) -> float:
        return max(abs(float(labels[batch].sum()) - len(batch) * 265 / 480) for batch in batches)

    for seed in range(20):
        batches = partition(480, 16, torch.Generator().manual_seed(seed), labels)
        assert sorted(i for batch in batches for i in batch) == list(range(480))
        assert worst(batches) < 2, f"seed {seed}: a batch is off the mix of {expected:.1f} positives by 2 or more"
    plain = partition(480, 16, torch.Generator().manual_seed(0))
    assert worst(plain) >= 2  # what stratifying removes
    again = partition(480, 16, torch.Generator().manual_seed(3), labels)
    assert again == partition(480, 16, torch.Generator().manual_seed(3), labels)


def test_class_labels_come_from_label_attributes_or_keys_and_are_none_otherwise() -> None:
    class Example:
        def __init__(self, label: object) -> None:
            self.label = label

    assert class_labels([Example(1), Example(0)]).tolist() == [1, 0]
    assert class_labels([{"label": torch.tensor(2)}, {"label": 0}]).tolist() == [2, 0]
    assert class_labels([{"input_ids": [1, 2], "labels": [1, 2]}]) is None  # language-model data
    assert class_labels([Example(1), Example("positive")]) is None
    assert class_labels([Example(True)]) is None


def test_prompt_classification_candidates_are_stratified_by_default(tmp_path: Path) -> None:
    from test_tasks import sentiment_dm, word_tokenizer

    rows = [{"text": f"film number {i}", "label": "positive" if i % 4 == 0 else "negative"} for i in range(32)]
    tokenizer = word_tokenizer()
    selection = SubsetSelection("random", fraction=0.5, every_n_steps=100, progress=False)
    log = BatchLog()
    torch.manual_seed(0)
    module = HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=len(tokenizer)))
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=4, callbacks=[selection, log], limit_val_batches=0)
    trainer.fit(module, sentiment_dm(tmp_path, tokenizer, rows, batch_size=4, eval_batch_size=4))
    dataset, labels = selection._loader.dataset, selection._labels
    assert labels is not None and labels.bincount().tolist() in ([24, 8], [8, 24])
    positive = int(labels.bincount().argmin())
    assert len(selection._sampler.batches) == 4
    for batch in selection._sampler.batches:  # 8 positives in 32: every batch of 4 has exactly one
        assert [dataset[i].label for i, _ in batch].count(positive) == 1
    assert len(log.weights) == 4
    with pytest.raises(ValueError, match=r"stratify=True\) needs every training example to have an integer 'label'"):
        _fit(SubsetSelection("random", fraction=0.25, stratify=True, progress=False), steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "craig"}, "method='craig' is not valid: choose one of 'gradmatch', 'random', 'full'"),
        ({"fraction": 0.0}, r"fraction=0.0 is not valid: it must be a number in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1.5 is not valid"),
        ({"every_n_steps": 0}, r"every_n_steps=0 is not valid: it must be an integer >= 1, or None for one subset epoch"),
        ({"ridge": -0.1}, r"ridge=-0.1 is not valid: it must be a number >= 0"),
        ({"feature": "logits"}, "feature='logits' is not valid: choose one of 'hidden', 'head'"),
        ({"feature_rows": 0}, "feature_rows=0 is not valid: it must be an integer >= 1"),
        ({"stratify": "yes"}, r"stratify='yes' is not valid: choose None \(when labels exist\), True or False"),
        ({"stratify": 1}, r"stratify=1 is not valid: choose None \(when labels exist\), True or False"),
        ({"seed": "0"}, "seed='0' is not valid: it must be an integer"),
        ({"warm_start_steps": -1}, "warm_start_steps=-1 is not valid: it must be an integer >= 0"),
        ({"feature_batch_size": 0}, "feature_batch_size=0 is not valid: it must be an integer >= 1"),
    ],
)
def test_bad_options_name_the_option_and_the_valid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SubsetSelection(**kwargs)


def test_gradmatch_needs_the_split_model_in_this_process() -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["input_ids"].float()[:, :2]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[SubsetSelection("gradmatch", progress=False)])
    with pytest.raises(ValueError, match=r"method='gradmatch'\) computes features .* uses SingleDeviceStrategy: use "
                                         r"HOSLStrategy\(transport='in_process'\)"):
        trainer.fit(Plain(), SyntheticLMDataModule(vocab_size=64, seq_len=8, batch_size=4, train_size=16))
