"""Subsets chosen example by example: per-example loss weights, the label-head feature, per-class GradMatch, MILO."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, quiet_trainer
from lightning.pytorch.callbacks import Callback
from test_subsets import _batch, _classification_batch, _split

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.core.split_model import concat_activations
from hosl_lightning.distributed.sync import weights_digest
from hosl_lightning.lightning.dropin import pop_loss_weight
from hosl_lightning.tuning import SelectionCache, SubsetSelection, WeightedCollate
from hosl_lightning.tuning.features import label_head_row_features, row_embeddings
from hosl_lightning.tuning.matching import class_budgets, facility_location, per_class_gradmatch, random_examples

TARGETS = ("labels", "class_labels", "num_classes")

# ---- per-example loss weights --------------------------------------------------------------------------------


def test_per_example_weights_weigh_each_classification_loss_before_the_mean() -> None:
    model = _split()
    batch = _classification_batch([[11], [12, 22]], class_of=[1, 0, 1])
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    targets = {k: batch[k] for k in TARGETS}
    alone = []  # each example's loss, from a batch of that example alone
    for example in range(3):
        rows = slice(2 * example, 2 * example + 2)
        one = model.client_forward(batch["input_ids"][rows], batch["attention_mask"][rows])
        alone.append(model.server_losses(one, {"labels": batch["labels"][rows], "num_classes": 2,
                                               "class_labels": batch["class_labels"][example : example + 1]}))
    weights = torch.tensor([0.5, 2.0, 0.0])
    weighted = model.server_losses(activations, {**targets, "loss_weight": weights})
    assert torch.allclose(weighted, (weights * torch.cat(alone)).mean().reshape(1), atol=1e-6)
    paired = model.server_losses(concat_activations([activations, activations]), {**targets, "loss_weight": weights},
                                 groups=2)
    assert torch.allclose(paired, weighted.repeat(2), atol=1e-6)  # every probe group weighs the same examples


def test_per_row_weights_give_a_weighted_token_mean_on_lm_batches() -> None:
    model, batch = _split(), _batch(rows=4)
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    weights = torch.tensor([1.0, 0.0, 3.0, 0.5])
    weighted = model.server_losses(activations, {"labels": batch["labels"], "loss_weight": weights})
    logits = model.server.logits(model.server(activations))[:, :-1]
    nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                          reduction="none").view(4, -1)
    expected = (weights[:, None] * nll).sum() / (batch["labels"][:, 1:] != -100).sum()
    assert torch.allclose(weighted, expected.reshape(1), atol=1e-6)


def test_a_weight_vector_of_the_wrong_length_is_refused_naming_the_shapes() -> None:
    model, batch = _split(), _batch(rows=4)
    activations = model.client_forward(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match=r"one weight per example \(4 here\), got \(3,\)"):
        model.server_losses(activations, {"labels": batch["labels"], "loss_weight": torch.ones(3)})


def test_collate_sends_one_weight_for_a_whole_batch_and_one_per_example_otherwise() -> None:
    collate = WeightedCollate(lambda examples: {"x": torch.tensor(examples)})
    assert collate([(1, 2.0), (2, 2.0)])["loss_weight"].shape == ()
    assert collate([(1, 2.0), (2, 0.5)])["loss_weight"].tolist() == [2.0, 0.5]


def test_a_drop_in_training_step_refuses_per_example_weights() -> None:
    assert float(pop_loss_weight(({"loss_weight": torch.tensor(2.0)},))) == 2.0
    with pytest.raises(ValueError, match="a drop-in training_step computes its own loss.*granularity='batch'"):
        pop_loss_weight(({"loss_weight": torch.tensor([1.0, 2.0])},))


def test_per_class_gradmatch_refuses_a_drop_in_module_before_the_first_step() -> None:
    # a batch's weights may happen to be equal (sent as one number): the refusal must not wait for unequal ones
    from types import SimpleNamespace

    from hosl_lightning import HOSLStrategy

    drop_in = L.LightningModule()  # automatic optimization: its own training_step computes the loss
    trainer = SimpleNamespace(strategy=HOSLStrategy(cut_layer=1))  # in-process: the first check passes
    with pytest.raises(ValueError, match=r"granularity='per_class'\) weighs each example, but a drop-in"):
        SubsetSelection("gradmatch", granularity="per_class").on_train_start(trainer, drop_in)  # type: ignore[arg-type]
    elsewhere = SimpleNamespace(strategy=L.pytorch.strategies.SingleDeviceStrategy("cpu"))
    with pytest.raises(ValueError, match=r"uses SingleDeviceStrategy: use HOSLStrategy\(transport='in_process'\)"):
        SubsetSelection("gradmatch", granularity="per_class").on_train_start(elsewhere, drop_in)  # type: ignore[arg-type]


# ---- the label-head feature and fixed embeddings ----------------------------------------------------------------


def test_label_head_feature_is_the_classification_loss_gradient_at_the_label_word_rows() -> None:
    model = _split()
    batch = _classification_batch([[11], [12], [13]], class_of=[2, 0, 1, 0])
    features, counts = label_head_row_features(model, batch)
    assert counts.tolist() == [1] * 4 and features.shape == (4, 3 * TINY_LLAMA["hidden_size"])
    head = model.server.lm_head.weight
    for example in range(4):  # autograd, one example at a time, through the loss training uses
        rows = slice(3 * example, 3 * example + 3)
        model.zero_grad()
        one = model.client_forward(batch["input_ids"][rows], batch["attention_mask"][rows])
        model.server_losses(one, {"labels": batch["labels"][rows], "num_classes": 3,
                                  "class_labels": batch["class_labels"][example : example + 1]}).sum().backward()
        gradient = head.grad.detach().clone()
        assert torch.allclose(features[example], gradient[[11, 12, 13]].flatten(), atol=1e-6)
        others = torch.ones(len(gradient), dtype=torch.bool)
        others[[11, 12, 13]] = False
        assert float(gradient[others].abs().max()) < 1e-6  # the other rows get no gradient: nothing is left out


def test_label_head_feature_refuses_lm_batches() -> None:
    with pytest.raises(ValueError, match="feature='label_head' needs classification batches"):
        label_head_row_features(_split(), _batch())


def test_embeddings_are_the_final_hidden_state_where_the_answer_is_scored() -> None:
    model = _split()
    batch = _classification_batch([[11, 21], [12]], class_of=[1, 0])
    embeddings, _ = row_embeddings(model, batch)
    for example, gold in enumerate([1, 0]):
        row = 2 * example + gold
        with torch.no_grad():
            hidden = model.server(model.client_forward(batch["input_ids"][row : row + 1],
                                                       batch["attention_mask"][row : row + 1]))
        assert torch.allclose(embeddings[example], hidden[0, 5], atol=1e-6)  # the prompt's last token (6 long)


# ---- choosing examples ------------------------------------------------------------------------------------


def test_class_budgets_split_the_budget_in_proportion_and_add_up() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert class_budgets(labels, 10) == {0: 5, 1: 3, 2: 2}
    shares = class_budgets(labels, 7)
    assert sum(shares.values()) == 7 and shares[0] >= shares[1] >= shares[2]
    with pytest.raises(ValueError, match=r"budget=101 is not valid"):
        class_budgets(labels, 101)


def test_per_class_gradmatch_keeps_the_class_mix_and_matches_each_class() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0] * 60 + [1] * 40)
    features = torch.randn(100, 2, 8) + torch.tensor([[1.0] * 8, [-1.0] * 8])  # one block per class
    chosen = per_class_gradmatch(features.flatten(1), labels, 10, torch.Generator().manual_seed(0), num_classes=2)
    picked = labels[chosen.indices]
    assert len(set(chosen.indices)) == 10 and int((picked == 0).sum()) == 6 and int((picked == 1).sum()) == 4
    for label in (0, 1):
        weights = torch.tensor(chosen.weights)[picked == label]
        assert float(weights.mean()) == pytest.approx(1.0) and bool((weights > 0).all())
    # class c is matched on block c alone: noise in the other block changes nothing
    noisy = features.clone()
    noisy[labels == 0, 1] = torch.randn(60, 8) * 100
    noisy[labels == 1, 0] = torch.randn(40, 8) * 100
    again = per_class_gradmatch(noisy.flatten(1), labels, 10, torch.Generator().manual_seed(0), num_classes=2)
    assert again.indices == chosen.indices
    whole = per_class_gradmatch(noisy.flatten(1), labels, 10, torch.Generator().manual_seed(0))
    assert whole.indices != chosen.indices  # PerClass (the whole feature) does see it
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="num_classes=3 does not divide the 16 feature columns into one block"):
        per_class_gradmatch(features.flatten(1), labels, 10, generator, num_classes=3)
    with pytest.raises(ValueError, match="num_classes=0 is not valid: it must be an integer >= 1"):
        per_class_gradmatch(features.flatten(1), labels, 10, generator, num_classes=0)
    with pytest.raises(ValueError, match="labels must be class indices >= 0; the smallest is -1"):
        per_class_gradmatch(features.flatten(1), labels - 1, 10, generator, num_classes=2)
    with pytest.raises(ValueError, match="num_classes=2 has no block for label 2"):
        per_class_gradmatch(features.flatten(1), labels.clamp_max(1) + (labels == 1).long(), 10, generator,
                            num_classes=2)


def test_facility_location_covers_every_cluster_of_every_class() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8) * 10  # 8 orthogonal clusters: 4 for each class
    members = torch.arange(8).repeat_interleave(12)
    embeddings = centres[members] + torch.randn(96, 8, generator=generator) * 0.1
    labels = (members >= 4).long()
    chosen = facility_location(embeddings, labels, 8, torch.Generator().manual_seed(1), epsilon=1e-9)
    assert sorted(members[chosen.indices].tolist()) == list(range(8)) and chosen.weights == [1.0] * 8
    misses = [len(set(members[random_examples(labels, 8, torch.Generator().manual_seed(s)).indices].tolist())) < 8
              for s in range(20)]
    assert sum(misses) >= 15  # random picks nearly always leave a cluster out


# ---- the callback, example by example ----------------------------------------------------------------------------


class WeightLog(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(batch["loss_weight"].clone())
        self.labels.append(batch["class_labels"].clone())


def _fit_classification(tmp_path: Path, selection: SubsetSelection, steps: int, train_size: int = 48,
                        batch_size: int = 6):
    from test_tasks import sentiment_dm, word_tokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    words = ["a", "great", "movie", "and", "the", "plot", "was", "long"]
    rows = [{"text": " ".join(words[: 1 + (i * 5) % 8]), "label": "positive" if i % 3 else "negative"}
            for i in range(train_size)]
    tokenizer = word_tokenizer()
    data = sentiment_dm(tmp_path, tokenizer, rows, batch_size=batch_size, eval_batch_size=6, loss="classification")
    L.seed_everything(0)
    module = HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=len(tokenizer)))
    log = WeightLog()
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=1, zo_lr=1e-3), max_steps=steps, callbacks=[selection, log])
    trainer.fit(module, data)
    return trainer, log


def test_per_class_gradmatch_trains_on_stratified_batches_of_weighted_examples(tmp_path: Path) -> None:
    selection = SubsetSelection("gradmatch", fraction=0.25, granularity="per_class", feature="label_head",
                                progress=False)
    trainer, log = _fit_classification(tmp_path, selection, steps=2)
    assert trainer.num_training_batches == 2  # a quarter of 8 candidate batches
    chosen = selection.last
    assert chosen is not None and len(chosen.indices) == 12 and chosen.matched >= 2
    seen = torch.cat([w.reshape(-1).expand(len(labels)) for w, labels in zip(log.weights, log.labels)])
    assert sorted(seen.tolist()) == pytest.approx(sorted(chosen.weights))  # each chosen example once, its weight
    assert all(int((labels == 0).sum()) == 2 for labels in log.labels)  # 1 in 3 negative: 2 of 6 in each batch


def test_a_per_class_choice_is_shared_by_fits_of_the_same_weights_and_batch_size_only(tmp_path: Path) -> None:
    cache = SelectionCache()
    options = {"granularity": "per_class", "feature": "label_head", "cache": cache, "progress": False}
    first = SubsetSelection("gradmatch", fraction=0.25, **options)
    _fit_classification(tmp_path / "a", first, steps=1)
    second = SubsetSelection("gradmatch", fraction=0.25, **options)
    _fit_classification(tmp_path / "b", second, steps=1)
    assert cache.hits == 1 and second.last is not None and first.last is not None
    assert second.last.indices == first.last.indices  # a hit also says what was chosen
    other = SubsetSelection("gradmatch", fraction=0.25, **options)  # 4 batches of 3: 12 examples, as 2 of 6 are
    _fit_classification(tmp_path / "c", other, steps=1, batch_size=3)
    assert cache.hits == 1  # the same number of examples, but batches of another size: chosen anew


def test_per_class_random_draws_examples_per_class(tmp_path: Path) -> None:
    selection = SubsetSelection("random", fraction=0.25, granularity="per_class", progress=False)
    _, log = _fit_classification(tmp_path, selection, steps=2)
    assert [w.shape for w in log.weights] == [(), ()] and all(float(w) == 1.0 for w in log.weights)
    assert all(int((labels == 0).sum()) == 2 for labels in log.labels)


def test_milo_embeds_once_from_the_starting_weights_and_shares_them_through_the_cache(tmp_path: Path) -> None:
    embedded: list[str] = []

    class Recording(SubsetSelection):
        def _milo_embeddings(self, trainer):
            if self._embeddings is None:  # asked for, not yet held: embedded now (or found in the cache)
                embedded.append(weights_digest(trainer.strategy.split_model))
            return super()._milo_embeddings(trainer)

    cache = SelectionCache()
    start = None
    for _ in range(2):
        selection = Recording("milo", fraction=0.25, every_n_steps=1, warm_start_steps=2, cache=cache,
                              progress=False)
        trainer, _ = _fit_classification(tmp_path, selection, steps=4)
        # three choices: random batches at the start (warm start), then MILO after step 2 and after step 3
        assert selection.selections == 3 and selection.last is not None and len(selection.last.indices) == 12
        start = start or embedded[0]
    assert embedded == [start, start] and cache.hits == 1  # computed once, from the untrained weights
    assert weights_digest(trainer.strategy.split_model) != start


def test_per_class_choice_needs_labelled_examples() -> None:
    from conftest import tiny_data

    selection = SubsetSelection("gradmatch", fraction=0.25, granularity="per_class", progress=False)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, zo_lr=1e-3), max_steps=1, callbacks=[selection])
    with pytest.raises(ValueError, match="granularity='per_class'.* needs every training example to have an integer"):
        trainer.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data())


def test_unknown_granularity_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="granularity"):
        SubsetSelection("gradmatch", granularity="example")  # type: ignore[arg-type]
