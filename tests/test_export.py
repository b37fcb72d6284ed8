"""The model you trained is the model you get back: a plain transformers model whose logits equal the split
model's, through a save_pretrained / from_pretrained round trip, with a tied head untied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hosl_lightning import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import hosl_step


def _trained_split(tied: bool) -> SplitCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)
    split = SplitCausalLM(LlamaForCausalLM(config), 1)
    split.client.requires_grad_(False)
    zo, server = ZOSGD(split.client.named_parameters(), lr=1e-2), torch.optim.SGD(split.server.parameters(), lr=1.0)
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    for step in range(2):  # the client's embedding and the server's head now differ
        hosl_step(split, {"input_ids": ids, "labels": ids}, zo, ZOSettings(queries=2), step, lambda l: l.backward())
        server.step()
        server.zero_grad()
    return split


@pytest.mark.parametrize("tied", [True, False])
def test_to_pretrained_round_trips_with_the_split_models_logits(tied: bool, tmp_path: Path) -> None:
    split = _trained_split(tied).eval()
    embedding = split.client.embeddings["embed_tokens"].weight
    assert not tied or not torch.equal(embedding, split.server.lm_head.weight)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = split(ids).logits
    plain = split.to_pretrained()
    assert type(plain) is LlamaForCausalLM and plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_one_half_cannot_pose_as_the_whole_model() -> None:
    split = _trained_split(False)
    half = SplitCausalLM.from_halves(split.client, None, split.config, 1)
    with pytest.raises(ValueError, match="holds one half only"):
        half.to_pretrained()


@pytest.mark.parametrize("distributed", [False, True])
def test_export_rebuilds_the_trained_model_from_its_checkpoint_halves(distributed: bool, tmp_path: Path) -> None:
    from conftest import TINY_LLAMA, quiet_trainer, tiny_data
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hosl_lightning import HOSLModule, HOSLStrategy
    from hosl_lightning.cli import main

    module = HOSLModule(model_config=dict(TINY_LLAMA, tie_word_embeddings=True))
    checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=2, filename="last")
    quiet_trainer(HOSLStrategy(cut_layer=1, zo_lr=1e-2), max_steps=2, enable_checkpointing=True,
                  callbacks=[checkpoint]).fit(module, tiny_data())
    ckpt, extra = tmp_path / "last.ckpt", []
    if distributed:  # the client's file holds its half; the server's half lies beside it, as a server saves it
        state = torch.load(ckpt, weights_only=False)
        server = {k[len("model.server."):]: v for k, v in state["state_dict"].items() if k.startswith("model.server.")}
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("model.server.")}
        torch.save(state, ckpt)
        torch.save({"server": server}, tmp_path / "last.ckpt.server.pt")
        with pytest.raises(ValueError, match="holds the client's half only"):
            main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "never")])
        extra = ["--server_checkpoint", str(tmp_path / "last.ckpt.server.pt")]
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "plain"), *extra])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model.eval()(ids).logits)
