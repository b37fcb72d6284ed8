"""Each process of a split run loads only its half: same forward as the whole model, nothing of the other half."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hosl_lightning.core.split import split_causal_lm
from hosl_lightning.models import (
    ModelSource,
    deferred_weights,
    export_model,
    load_causal_lm,
    materialize_half,
)

CONFIGS = {
    "llama-tied": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "opt": dict(model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32),
    "gpt2": dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
}


def _model(name: str) -> torch.nn.Module:
    config = dict(CONFIGS[name])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()


def _half(directory: Path, side: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    with deferred_weights():
        model = load_causal_lm(str(directory))
    halves = split_causal_lm(model, 2)
    materialize_half(model, halves[side])
    return model, halves[side].eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("save", ["save_pretrained", "export_model"])  # tied weights stored under one name or the other
def test_halves_loaded_alone_compute_the_whole_models_logits(name: str, save: str, tmp_path: Path) -> None:
    full = _model(name)
    if save == "save_pretrained":
        full.save_pretrained(tmp_path)
    else:
        export_model(full, tmp_path)
    ids = torch.randint(0, 64, (2, 7))
    client, server = split_causal_lm(full, 2)
    expected = server.logits(server(client(ids)))
    client_model, client_half = _half(tmp_path, 0)
    server_model, server_half = _half(tmp_path, 1)
    assert torch.equal(server_half.logits(server_half(client_half(ids))), expected)
    # what each process did not load stays on the meta device: no storage
    client_ids = {id(p) for p in client_half.parameters()}
    assert all(p.is_meta for p in client_model.parameters() if id(p) not in client_ids)
    assert all(not p.is_meta for p in client_half.parameters())
    server_ids = {id(p) for p in server_half.parameters()}
    assert all(p.is_meta for n, p in server_model.named_parameters() if id(p) not in server_ids and "lm_head" not in n)


def test_deferred_weights_builds_on_meta_and_remembers_the_source(tmp_path: Path) -> None:
    _model("gpt2").save_pretrained(tmp_path)
    with deferred_weights():
        model = load_causal_lm(str(tmp_path))
    assert all(p.is_meta for p in model.parameters())
    assert model._hosl_source == ModelSource(str(tmp_path), None, "float32", None)
    assert not any(p.is_meta for p in load_causal_lm(str(tmp_path)).parameters()), "the context must not leak"


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    full = _model("gpt2")
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("transformer.h.0.")}
    full.config.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    with deferred_weights():
        model = load_causal_lm(str(tmp_path))
    client, _ = split_causal_lm(model, 2)
    with pytest.raises(KeyError, match=r"lack \['transformer\.h\.0\."):
        materialize_half(model, client)


def test_a_gguf_source_is_refused_with_the_conversion_command(tmp_path: Path) -> None:
    (tmp_path / "model.Q4_0.gguf").touch()
    with deferred_weights(), pytest.raises(ValueError, match="export_model"):
        load_causal_lm(str(tmp_path / "model.Q4_0.gguf"))


def test_a_checkpoint_of_the_bare_base_model_loads(tmp_path: Path) -> None:
    """Stock GPT-2 files name tensors without the ``transformer.`` prefix of GPT2LMHeadModel."""
    from safetensors.torch import save_file

    full = _model("gpt2")
    full.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in full.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 64, (2, 7))
    client, server = split_causal_lm(full, 2)
    _, client_half = _half(tmp_path, 0)
    _, server_half = _half(tmp_path, 1)
    assert torch.equal(server_half.logits(server_half(client_half(ids))), server.logits(server(client(ids))))
