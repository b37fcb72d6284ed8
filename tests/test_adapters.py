"""peft adapters per side: only adapters train, ZO perturbs only them, save/load the peft way, merge, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, for_mode, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import LlamaForCausalLM

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.models import load_adapters, merged_model, save_adapters

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
SERVER_LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "down_proj"]}


def _module() -> HOSLModule:
    torch.manual_seed(0)
    return HOSLModule(model_config=TINY_LLAMA)


class Snapshot(Callback):
    """The split model's weights when training starts (after the adapters are injected)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in trainer.strategy.split_model.state_dict().items()}


def _fit(mode: str = "hosl", steps: int = 3, client=LORA, server=None, **kwargs):
    L.seed_everything(0)
    strategy = HOSLStrategy(cut_layer=kwargs.pop("cut_layer", 2), **for_mode(mode, q=2, zo_lr=1e-2), client_adapter=client,
                            server_adapter=server)
    snapshot = Snapshot()
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(strategy, max_steps=steps, callbacks=[snapshot, *kwargs.pop("callbacks", [])], **kwargs)
    trainer.fit(_module(), tiny_data(), ckpt_path=ckpt_path)
    return trainer, snapshot.state


def _changed(trainer, before: dict[str, torch.Tensor]) -> set[str]:
    after = trainer.strategy.split_model.state_dict()
    assert after.keys() == before.keys()
    return {k for k in after if not torch.equal(after[k], before[k])}


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_only_adapter_weights_change_on_a_side_with_adapters(mode: str) -> None:
    trainer, before = _fit(mode, client=LORA, server=SERVER_LORA)
    changed = _changed(trainer, before)
    client = {k for k in before if k.startswith("client.")}
    server = {k for k in before if k.startswith("server.")}
    assert changed & client and changed & server
    assert all(".lora_" in k and ".client." in k for k in changed & client), sorted(changed & client)
    assert all(".lora_" in k and ".server." in k for k in changed & server), sorted(changed & server)


def test_a_side_without_adapters_trains_all_its_weights() -> None:
    trainer, before = _fit("hosl", client=LORA, server=None)
    changed = _changed(trainer, before)
    server_changed = {k for k in changed if k.startswith("server.")}
    assert "server.lm_head.weight" in server_changed and any("mlp.down_proj.weight" in k for k in server_changed)
    assert all(".lora_" in k for k in changed if k.startswith("client."))
    base = [p for n, p in trainer.strategy.split_model.client.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and not getattr(p, "_hosl_zo", False) for p in base)


def test_a_tied_head_keeps_training_on_a_server_without_adapters() -> None:
    L.seed_everything(0)
    module = HOSLModule(model_config=dict(TINY_LLAMA, tie_word_embeddings=True))
    assert module.model.lm_head.weight is module.model.get_input_embeddings().weight
    strategy = HOSLStrategy(cut_layer=2, q=1, zo_lr=1e-2, client_adapter=LORA)
    snapshot = Snapshot()
    quiet_trainer(strategy, max_steps=2, callbacks=[snapshot]).fit(module, tiny_data())
    split = strategy.split_model
    assert split.server.lm_head.weight.requires_grad
    assert not torch.equal(split.server.lm_head.weight, snapshot.state["server.lm_head.weight"])
    embedding = split.client.get_submodule("embeddings.embed_tokens").weight
    assert not embedding.requires_grad and torch.equal(embedding, snapshot.state["client.embeddings.embed_tokens.weight"])


def test_zo_perturbs_only_the_client_adapters() -> None:
    trainer, _ = _fit("hosl", steps=1)
    strategy = trainer.strategy
    split, optimizer = strategy.split_model, strategy.client_optimizer
    zo_names = {n for n, p in split.client.named_parameters() if getattr(p, "_hosl_zo", False)}
    assert zo_names and all(".lora_A.client." in n or ".lora_B.client." in n for n in zo_names)
    # Every module's own weights, as its forward sees them inside a perturbed probe.
    stored = {n: p.detach().clone() for n, p in split.client.named_parameters()}
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for module_name, module in split.client.named_modules():
        def record(mod, args, output, prefix=module_name):  # after the forward, before ZO swaps weights back
            for name, param in mod.named_parameters(recurse=False):
                seen[f"{prefix}.{name}" if prefix else name] = param.detach().clone()
        hooks.append(module.register_forward_hook(record))
    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad(), optimizer.perturbed([split.client], step=5, query=0, scale=0.1):
        split.client_forward(batch["input_ids"], batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    perturbed = {n for n, value in seen.items() if not torch.equal(value, stored[n])}
    assert perturbed == zo_names


def test_a_bad_target_module_lists_the_names_that_would_fit() -> None:
    with pytest.raises(ValueError, match=r"client_adapter target_modules \['qq_proj'\] match no module in the client's "
                                         r"blocks \[0, 2\); module names that would fit: \['down_proj', 'gate_proj', "
                                         r"'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        _fit(client={"r": 2, "target_modules": ["qq_proj"]})


def test_bad_adapter_options_fail_when_the_strategy_is_built() -> None:
    with pytest.raises(ValueError, match=r"client_adapter=\{'rank': 8\} is not valid: .*unexpected keyword argument 'rank'"):
        HOSLStrategy(client_adapter={"rank": 8})
    with pytest.raises(ValueError, match="peft_type='NOPE' is not valid: choose one of"):
        HOSLStrategy(server_adapter={"peft_type": "nope"})
    with pytest.raises(ValueError, match="in-process only"):
        HOSLStrategy(transport="distributed", client_adapter=LORA)
    with pytest.raises(ValueError, match="the client holds no decoder block at this cut_layer"):
        _fit(cut_layer=0)


def test_adapters_save_and_load_the_peft_way_and_merge(tmp_path: Path) -> None:
    trainer, _ = _fit("hosl", client=LORA, server=SERVER_LORA)
    strategy = trainer.strategy
    split = strategy.split_model
    written = save_adapters(strategy.peft_model, tmp_path / "adapters")
    assert [p.name for p in written] == ["client", "server"]
    for path in written:
        assert (path / "adapter_config.json").exists() and (path / "adapter_model.safetensors").exists()

    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    split.eval()
    with torch.no_grad():
        expected = split(batch["input_ids"], batch["attention_mask"]).logits
    # peft's from_pretrained onto a fresh base model: the base weights must be the run's (this side trained none).
    torch.manual_seed(0)
    base = HOSLModule(model_config=TINY_LLAMA).model
    base.lm_head.weight = torch.nn.Parameter(split.server.lm_head.weight.detach().clone())  # the cut's untied head
    loaded = load_adapters(base, tmp_path / "adapters").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              expected, atol=1e-5)
    merged = merged_model(strategy.peft_model, split.server.lm_head).eval()
    assert isinstance(merged, LlamaForCausalLM) and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              expected, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              expected, atol=1e-5)
    assert any("lora_B.client" in n for n, _ in strategy.peft_model.named_parameters())  # training model untouched


def test_resume_with_adapters_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted, _ = _fit("hosl", steps=8, server=SERVER_LORA, callbacks=[checkpoint], enable_checkpointing=True)
    resumed, _ = _fit("hosl", steps=8, server=SERVER_LORA, ckpt_path=str(tmp_path / "step=4.ckpt"))
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert any(".lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_conv1d_blocks_take_adapters_too() -> None:
    from transformers import GPT2Config

    L.seed_everything(0)
    module = HOSLModule(model_config=GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64).to_dict())
    strategy = HOSLStrategy(cut_layer=1, q=1, zo_lr=1e-2, client_adapter={"r": 2, "target_modules": ["c_attn"]})
    trainer = quiet_trainer(strategy, max_steps=2)
    trainer.fit(module, tiny_data())
    zo = [n for n, p in strategy.split_model.client.named_parameters() if getattr(p, "_hosl_zo", False)]
    assert zo and all("c_attn.lora_" in n for n in zo)
