"""Each mode against an independent reference: where hosl's server gradient comes from, fo against unsplit
backprop, dropout under hosl, the registry, and what a drop-in module refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import LlamaConfig, LlamaForCausalLM

from hosl_lightning import HOSLStrategy, SplitCausalLM, SyntheticLMDataModule
from hosl_lightning.core.zo import ZOSGD, DirectionSampler
from hosl_lightning.modes import (
    MODES,
    Mode,
    ZOSettings,
    dropout_active,
    eval_mode,
    get_mode,
    register_mode,
)
from hosl_lightning.modes.in_process import fo_step, in_process_step

Q, MU, SEED, STEP = 2, 1e-2, 5, 3


def tiny(attention_dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32, attention_dropout=attention_dropout)
    return LlamaForCausalLM(config)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def hosl_split(model: LlamaForCausalLM) -> tuple[SplitCausalLM, ZOSGD]:
    split = SplitCausalLM(model, 1)
    split.client.requires_grad_(False)
    return split, ZOSGD(split.client.named_parameters(), lr=0.0, seed=SEED)


def server_grads(split: SplitCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in split.server.named_parameters() if p.grad is not None}


def reference_server_grads(model: LlamaForCausalLM, data: dict, points: list[tuple[int, float] | None],
                           train: bool = False, rng_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The server's gradient of the mean loss over ``points`` ((query, sign) of a probe, or None: clean), on a
    copy whose client weights are perturbed by hand with the seeded directions."""
    losses = []
    for point in points:
        split = SplitCausalLM(copy.deepcopy(model), 1)
        if point is not None:
            query, sign = point
            with torch.no_grad():
                for key, param in enumerate(split.client.parameters()):
                    param.add_(DirectionSampler("gaussian", SEED).direction(STEP, query, key, param), alpha=sign * MU)
        split.eval()
        with torch.no_grad():
            up = split.client_forward(data["input_ids"], data["attention_mask"])
        split.server.train(train)
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        loss = split.server_losses(up, {"labels": data["labels"]})[0]
        grads = torch.autograd.grad(loss, list(split.server.parameters()))
        losses.append({n: g for (n, _), g in zip(split.server.named_parameters(), grads)})
    return {n: sum(g[n] for g in losses) / len(losses) for n in losses[0]}


PROBES = [(q, s) for q in range(Q) for s in (1.0, -1.0)]


@pytest.mark.parametrize(("server_grad", "points"), [
    ("perturbed", PROBES[:1]),  # the +mu point of query 1
    ("mean", PROBES),  # all 2Q points
    ("clean", [None]),  # the unperturbed client
])
def test_hosl_server_gradient_comes_from_the_forward_server_grad_names(server_grad: str, points: list) -> None:
    model, data = tiny(), batch()
    split, zo = hosl_split(copy.deepcopy(model))
    settings = ZOSettings(queries=Q, mu=MU, server_grad=server_grad)
    in_process_step(split.train(), "hosl", data, settings, STEP, lambda loss: loss.backward(), zo)
    expected = reference_server_grads(model, data, points)
    got = server_grads(split)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_train_loss_is_the_mean_probe_loss_whatever_server_grad() -> None:
    """One quantity under ``train_loss`` in every setting; the clean loss, where computed anyway, beside it."""
    model, data = tiny(), batch()
    outputs = {}
    for server_grad in ("perturbed", "mean", "clean"):
        split, zo = hosl_split(copy.deepcopy(model))
        settings = ZOSettings(queries=Q, mu=MU, server_grad=server_grad)
        outputs[server_grad] = in_process_step(split.train(), "hosl", data, settings, STEP, lambda loss: loss.backward(), zo)
    split = SplitCausalLM(copy.deepcopy(model), 1).eval()
    with torch.no_grad():
        clean = split.server_losses(split.client_forward(data["input_ids"], data["attention_mask"]),
                                    {"labels": data["labels"]})[0]
    for server_grad, output in outputs.items():
        torch.testing.assert_close(output.loss, outputs["perturbed"].loss, msg=server_grad)
        assert (output.clean_loss is None) == (server_grad != "clean")
    torch.testing.assert_close(outputs["clean"].clean_loss, clean)
    assert not torch.equal(outputs["clean"].loss, outputs["clean"].clean_loss)


def test_fo_gives_the_gradients_of_unsplit_backprop() -> None:
    unsplit, data = tiny(), batch()
    split_source = copy.deepcopy(unsplit)
    unsplit(**data).loss.backward()
    split = SplitCausalLM(split_source, 1).train()
    fo_step(split, data, lambda loss: loss.backward())
    got = dict(split_source.named_parameters())  # the split model trains these very tensors
    for name, param in unsplit.named_parameters():
        assert got[name].grad is not None, name
        torch.testing.assert_close(got[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _server_rows(split: SplitCausalLM) -> list[int]:
    rows: list[int] = []
    split.server.register_forward_pre_hook(lambda module, args: rows.append(args[0].hidden.shape[0]))
    return rows


def test_dropout_probes_see_none_and_the_server_gradient_sees_the_training_forward() -> None:
    model, data = tiny(attention_dropout=0.1), batch()
    split, zo = hosl_split(copy.deepcopy(model))
    split.train()
    assert dropout_active(split.server) and not dropout_active(split.eval().server)
    split.train()
    rows = _server_rows(split)
    settings = ZOSettings(queries=Q, mu=MU, server_grad="perturbed")
    torch.manual_seed(123)  # the only draws of the global generator in the step are the training forward's masks
    first = in_process_step(split, "hosl", data, settings, STEP, lambda loss: loss.backward(), zo)
    # probes: one batched forward of 2Q groups without dropout; then one training-mode forward for the gradient
    assert rows == [2 * Q * 4, 4]
    again = in_process_step(split, "hosl", data, settings, STEP, lambda loss: None, zo)
    assert torch.equal(first.estimate.coefficients, again.estimate.coefficients)  # probes are deterministic
    expected = reference_server_grads(model, data, PROBES[:1], train=True, rng_seed=123)
    no_dropout = reference_server_grads(model, data, PROBES[:1], train=False)
    got = server_grads(split)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any(not torch.allclose(expected[n], no_dropout[n]) for n in expected), "the masks changed nothing"


def test_without_dropout_the_gradient_costs_no_extra_server_forward() -> None:
    split, zo = hosl_split(tiny())
    rows = _server_rows(split.train())
    in_process_step(split, "hosl", batch(), ZOSettings(queries=Q, mu=MU), STEP, lambda loss: loss.backward(), zo)
    assert sum(rows) == 2 * Q * 4  # the first probe's forward is the gradient's


def test_a_mode_is_a_registry_entry() -> None:
    assert set(MODES) == {"hosl", "fo", "zo", "frozen"}
    hosl = get_mode("hosl")
    assert hosl.zo_halves == ("client",) and get_mode("zo").zo_halves == ("client", "server")
    with pytest.raises(ValueError, match=r"mode='hsol' is not valid: choose one of 'hosl', 'fo', 'zo', 'frozen'"):
        get_mode("hsol")
    with pytest.raises(ValueError, match="registered already"):
        register_mode(Mode("hosl", (), hosl.client_step, hosl.server_step, "losses", hosl.probes))
    with pytest.raises(ValueError, match="'losses', 'grad', 'loss', got 'scores'"):
        Mode("other", (), hosl.client_step, hosl.server_step, "scores", hosl.probes)



@pytest.mark.parametrize(("option", "message"), [
    ({"server_grad": "perturbed"}, r"server_grad='perturbed' is not valid with a drop-in module"),
    ({"server_grad": "mean"}, r"server_grad='mean' is not valid with a drop-in module"),
    ({"batch_probes": True}, r"batch_probes=True is not valid with a drop-in module"),
    ({"pair_probes": True}, r"pair_probes=True is not valid with a drop-in module"),
])
def test_a_dropin_module_refuses_what_it_cannot_honour(option: dict, message: str) -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dropin_example", Path(__file__).parent.parent / "examples" / "dropin_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = Trainer(strategy=HOSLStrategy(cut_layer=1, **option), max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=message):
        trainer.fit(example.PlainFineTuner(tiny()), datamodule=SyntheticLMDataModule(vocab_size=64, seq_len=8, train_size=8,
                                                                                      batch_size=4))


def test_a_dropin_module_refuses_gradient_accumulation() -> None:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dropin_example", Path(__file__).parent.parent / "examples" / "dropin_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = Trainer(strategy=HOSLStrategy(cut_layer=1), max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      accumulate_grad_batches=4)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=4 is not valid with a drop-in module"):
        trainer.fit(example.PlainFineTuner(tiny()), datamodule=SyntheticLMDataModule(vocab_size=64, seq_len=8,
                                                                                      train_size=8, batch_size=4))


def test_eval_mode_gives_every_submodule_its_own_flag_back() -> None:
    """A mixed tree of train/eval flags comes back exactly, not as the root's flag recursed over the tree."""
    model = tiny(attention_dropout=0.1)
    model.train()
    layers = model.model.layers
    layers[0].eval()  # a whole subtree off
    layers[1].self_attn.train()
    layers[2].mlp.eval()  # one leaf branch off
    before = {name: sub.training for name, sub in model.named_modules()}
    assert len(set(before.values())) == 2  # the tree is mixed
    with eval_mode(model):
        assert not any(sub.training for sub in model.modules())
    assert {name: sub.training for name, sub in model.named_modules()} == before
