"""Split forward == unsplit forward, per family and cut; the halves partition the parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from hosl_lightning.core.split import (
    SUPPORTED_FAMILIES,
    ClientHalf,
    CutActivations,
    ServerHalf,
    num_blocks,
    split_causal_lm,
)

VOCAB = 112
transformers.logging.set_verbosity_error()  # tiny vocabularies make GPT-2's default bos/eos ids "invalid"

_ROPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
CONFIGS: dict[str, transformers.PretrainedConfig] = {
    # word_embed_proj_dim != hidden_size exercises project_in / project_out (as in OPT-350m)
    "opt": transformers.OPTConfig(
        num_hidden_layers=3, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1,
    ),
    "gpt2": transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64),
    "llama": transformers.LlamaConfig(num_hidden_layers=3, **_ROPE),
    # layers 2 and 3 slide (index >= max_window_layers), window shorter than the sequence
    "qwen2": transformers.Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=2, **_ROPE
    ),
    "qwen3": transformers.Qwen3Config(
        num_hidden_layers=3, head_dim=8, use_sliding_window=True, sliding_window=3, max_window_layers=1, **_ROPE
    ),
    "mistral": transformers.MistralConfig(num_hidden_layers=3, sliding_window=4, **_ROPE),
    "gpt_neox": transformers.GPTNeoXConfig(
        num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
        rotary_pct=0.5, use_parallel_residual=False,
    ),
}


def build(family: str, attn: str = "eager", **overrides) -> transformers.PreTrainedModel:
    config = CONFIGS[family].__class__.from_dict({**CONFIGS[family].to_dict(), **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], transformers.PreTrainedModel]:
    return {(family, attn): build(family, attn) for family in CONFIGS for attn in ("eager", "sdpa")}


def batches() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    right = torch.ones_like(ids)
    right[1, 6:] = 0
    right[2, 3:] = 0
    left = right.flip(1)
    return {"no_mask": (ids, None), "right_pad": (ids, right), "left_pad": (ids, left)}


def test_supported_families_cover_the_brief():
    assert set(CONFIGS) <= set(SUPPORTED_FAMILIES)
    assert {"opt", "gpt2", "llama", "qwen2", "mistral", "gpt_neox"} <= set(SUPPORTED_FAMILIES)


def test_sliding_layers_are_exercised():
    assert CONFIGS["qwen2"].layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert "sliding_attention" in CONFIGS["qwen3"].layer_types


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_split_forward_equals_unsplit(models, family, attn):
    model = models[family, attn]
    for name, (ids, mask) in batches().items():
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits
        assert not expected.isnan().any()
        for cut in range(num_blocks(model) + 1):
            client, server = split_causal_lm(model, cut)
            with torch.no_grad():
                activations = client(ids, mask)
                logits = server.logits(server(activations))
            # Padded positions match too (same masks, same ops), so compare everything.
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} cut={cut}: {m}")
            assert activations.hidden.shape[:2] == ids.shape
            assert activations.position_ids.dtype == torch.long


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_bitwise_equal_without_kv_cache(models, family):
    """The unsplit eval forward builds a DynamicCache by default; without it the ops are identical."""
    model = models[family, "eager"]
    ids, mask = batches()["left_pad"]
    client, server = split_causal_lm(model, 2)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(server.logits(server(client(ids, mask))), expected)


def test_position_ids_follow_the_family(models):
    ids, mask = batches()["left_pad"]
    opt_client, _ = split_causal_lm(models["opt", "eager"], 1)
    llama_client, _ = split_causal_lm(models["llama", "eager"], 1)
    opt_pos = opt_client(ids, mask).position_ids
    assert opt_pos.shape == ids.shape
    assert torch.equal(opt_pos, (mask.cumsum(1) * mask - 1))  # OPT counts real tokens only; pads get -1
    assert torch.equal(llama_client(ids, mask).position_ids, torch.arange(ids.shape[1])[None])


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_train_mode_dropout_matches_with_same_seed(family):
    """The halves use the model's own dropout modules, so in train mode they draw the same masks."""
    drop = {"gpt2": dict(embd_pdrop=0.3, attn_pdrop=0.3, resid_pdrop=0.3),
            "gpt_neox": dict(hidden_dropout=0.3, attention_dropout=0.3),
            "opt": dict(dropout=0.3, attention_dropout=0.3)}[family]
    model = build(family, **drop).train()
    ids, mask = batches()["right_pad"]
    client, server = split_causal_lm(model, 1)
    assert client.training and server.training
    torch.manual_seed(5)
    expected = model(ids, attention_mask=mask, use_cache=False).logits
    torch.manual_seed(5)
    torch.testing.assert_close(server.logits(server(client(ids, mask))), expected, rtol=0, atol=0)

    client.eval()  # switching a half switches the original modules it holds
    assert not any(m.training for m in client.modules())
    server.eval()
    with torch.no_grad():
        torch.testing.assert_close(server.logits(server(client(ids, mask))), model(ids, attention_mask=mask).logits)


def test_bfloat16_model():
    model = build("llama", "sdpa").to(torch.bfloat16)
    ids, mask = batches()["left_pad"]
    client, server = split_causal_lm(model, 1)
    with torch.no_grad():
        activations = client(ids, mask)
        logits = server.logits(server(activations))
        expected = model(ids, attention_mask=mask).logits
    assert activations.hidden.dtype == logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, expected)


def test_server_runs_from_cut_activations_alone_and_backpropagates():
    """What the server gets is a plain CutActivations (as if received from another process)."""
    model = build("qwen2", "sdpa")
    ids, mask = batches()["left_pad"]
    client, server = split_causal_lm(model, 2)
    with torch.no_grad():
        sent = client(ids, mask)
    received = CutActivations(
        hidden=sent.hidden.clone().requires_grad_(),
        attention_mask=sent.attention_mask.clone(),
        position_ids=sent.position_ids.clone(),
    )
    logits = server.logits(server(received))
    logits.float().pow(2).mean().backward()
    assert received.hidden.grad is not None and received.hidden.grad.abs().sum() > 0
    assert all(p.grad is not None for p in server.parameters())
    assert all(p.grad is None for p in client.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tied_head_is_untied(family):
    model = build(family, tie_word_embeddings=True)
    embedding = model.get_input_embeddings()
    assert model.lm_head.weight is embedding.weight  # tied to begin with
    client, server = split_causal_lm(model, 1)
    assert isinstance(server.lm_head, nn.Linear)
    assert server.lm_head.weight is not embedding.weight
    torch.testing.assert_close(server.lm_head.weight, embedding.weight, rtol=0, atol=0)
    assert server.lm_head.weight.data_ptr() != embedding.weight.data_ptr()
    with torch.no_grad():
        embedding.weight.add_(1.0)
    assert not torch.equal(server.lm_head.weight, embedding.weight)
    with torch.no_grad():
        server.lm_head.weight.zero_()
    assert embedding.weight.abs().sum() > 0


def test_untied_head_is_reused(models):
    model = models["llama", "eager"]
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    _, server = split_causal_lm(model, 1)
    assert server.lm_head is model.lm_head


@pytest.mark.parametrize("family", list(CONFIGS))
def test_parameters_are_partitioned(models, family):
    model = models[family, "eager"]
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    for cut in (0, 1, num_blocks(model)):
        client, server = split_causal_lm(model, cut)
        assert isinstance(client, ClientHalf) and isinstance(server, ServerHalf)
        client_ids = {id(p) for p in client.parameters()}
        server_ids = {id(p) for p in server.parameters()}
        model_ids = {id(p) for p in model.parameters()}
        assert not client_ids & server_ids
        extra = {id(server.lm_head.weight)} if tied else set()
        assert client_ids | server_ids == model_ids | extra
        assert id(model.get_input_embeddings().weight) in client_ids
        assert not any("lm_head" in name for name, _ in client.named_parameters())
        n_client_blocks = len(client.stack.blocks)
        assert (n_client_blocks, len(server.stack.blocks)) == (cut, num_blocks(model) - cut)


def test_halves_reference_original_blocks(models):
    model = models["gpt2", "eager"]
    client, server = split_causal_lm(model, 2)
    assert client.stack.blocks[0] is model.transformer.h[0]
    assert server.stack.blocks[0] is model.transformer.h[2]
    assert server.final["ln_f"] is model.transformer.ln_f
    assert id(model.transformer.wpe.weight) not in {id(p) for p in server.parameters()}


def test_server_has_its_own_rotary(models):
    """Rotary modules hold buffers only; the server's copy lets each half live on its own device."""
    model = models["llama", "eager"]
    client, server = split_causal_lm(model, 1)
    assert client.stack.rotary is model.model.rotary_emb
    assert server.stack.rotary is not model.model.rotary_emb
    assert server.stack.rotary.config is model.config
    assert not list(server.stack.rotary.parameters())
    torch.testing.assert_close(server.stack.rotary.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_numpy_integer_cut_is_accepted(models):
    client, _ = split_causal_lm(models["llama", "eager"], np.int64(2))
    assert len(client.stack.blocks) == 2


@pytest.mark.parametrize(
    ("cut", "error", "match"),
    [
        (-1, ValueError, r"cut_layer=-1 is out of range for this opt model with 3 decoder blocks: .*\[0, 3\]"),
        (4, ValueError, r"cut_layer=4 is out of range for this opt model with 3 decoder blocks: .*\[0, 3\]"),
        (1.5, TypeError, r"cut_layer=1\.5 must be an int.*\[0, 3\]"),
        (True, TypeError, r"cut_layer=True must be an int, not bool"),
        ("2", TypeError, r"cut_layer='2' must be an int"),
    ],
)
def test_bad_cut_layer(models, cut, error, match):
    with pytest.raises(error, match=match):
        split_causal_lm(models["opt", "eager"], cut)


def test_unsupported_model_type():
    config = transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=VOCAB)
    model = transformers.BloomForCausalLM(config)
    with pytest.raises(ValueError, match=r"model_type 'bloom'.*not supported.*gpt2.*llama.*opt"):
        split_causal_lm(model, 1)
    with pytest.raises(ValueError, match="bloom"):
        num_blocks(model)


def test_bare_base_model_is_rejected():
    base = transformers.LlamaModel(CONFIGS["llama"])
    with pytest.raises(ValueError, match=r"LlamaModel is not a causal LM.*AutoModelForCausalLM"):
        split_causal_lm(base, 1)


def test_layerdrop_is_rejected():
    with pytest.raises(ValueError, match="layerdrop=0.5 is not supported"):
        split_causal_lm(build("opt", layerdrop=0.5), 1)


def test_not_a_hugging_face_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        split_causal_lm(nn.Linear(2, 2), 0)


def test_bad_attention_mask_shape(models):
    client, _ = split_causal_lm(models["llama", "eager"], 1)
    ids, _ = batches()["no_mask"]
    with pytest.raises(ValueError, match="attention_mask must be a 2D padding mask"):
        client(ids, torch.ones(ids.shape[0], ids.shape[1] + 1))


def test_only_host_to_device_copies_across_the_cut_are_asynchronous(monkeypatch) -> None:
    """A CUDA server's losses reach a CPU client through a blocking copy: the host reads them at once."""
    from hosl_lightning.core.boundary import InProcessBoundary, may_copy_asynchronously

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert may_copy_asynchronously(cpu, cuda) and not may_copy_asynchronously(cuda, cpu)
    assert not may_copy_asynchronously(cpu, cpu) and not may_copy_asynchronously(cuda, cuda)
    seen = []
    original = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    boundary = InProcessBoundary()
    boundary.send_down_losses(torch.ones(2))
    boundary.send_down_gradient(torch.ones(2, 3))
    assert seen == [False, False]


@pytest.mark.parametrize("family", ["opt", "gpt2", "llama", "gpt_neox"])
def test_custom_position_ids_give_the_unsplit_models_logits(models, family):
    """Packed sequences restart their positions: the split forward must use the given ones, as the model does.

    Compared without a KV cache (which the split never keeps): only then does transformers mask packed sequences
    from one another."""
    from hosl_lightning import SplitCausalLM

    model = models[family, "sdpa"]
    ids, _ = batches()["no_mask"]
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])  # three sequences in one row
    per_row = torch.stack([packed[0], torch.arange(9), packed[0].flip(0)])
    split = SplitCausalLM(model, 1)
    for positions in (packed, per_row):
        with torch.no_grad():
            expected = model(ids, position_ids=positions, use_cache=False).logits
            default = model(ids, use_cache=False).logits
            got = split(ids, position_ids=positions).logits
        assert not torch.allclose(expected, default, atol=1e-3)  # the positions do change the result
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_logits_to_keep_and_return_dict_act_as_in_transformers(models):
    from hosl_lightning import SplitCausalLM

    model = models["llama", "eager"]
    ids, mask = batches()["right_pad"]
    split = SplitCausalLM(model, 1)
    with torch.no_grad():
        full = split(ids, attention_mask=mask).logits
        torch.testing.assert_close(split(ids, attention_mask=mask, logits_to_keep=1).logits, full[:, -1:])
        kept = split(ids, attention_mask=mask, logits_to_keep=torch.tensor([0, 4])).logits
        torch.testing.assert_close(kept, full[:, [0, 4]])
        torch.testing.assert_close(model(ids, attention_mask=mask, logits_to_keep=1).logits, full[:, -1:])
        loss, logits = split(ids, attention_mask=mask, labels=ids, return_dict=False)
        assert torch.equal(logits, full) and loss.dim() == 0
        assert len(split(ids, return_dict=False)) == 1  # (logits,), as transformers leaves out a None loss
    with pytest.raises(ValueError, match="logits_to_keep or labels, not both"):
        split(ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize(("argument", "value", "why"), [
    ("token_type_ids", torch.zeros(3, 9, dtype=torch.long), "embeds token ids only"),
    ("inputs_embeds", torch.zeros(3, 9, 32), "embeds the tokens itself"),
    ("output_hidden_states", True, "do not collect hidden states"),
])
def test_forward_arguments_it_cannot_honour_are_refused_by_name(models, argument, value, why):
    from hosl_lightning import SplitCausalLM

    split = SplitCausalLM(models["gpt2", "eager"], 1)
    ids, _ = batches()["no_mask"]
    with pytest.raises(ValueError, match=rf"does not support {argument}=\.\.\. \(the client half {why}|"
                                         rf"does not support {argument}=\.\.\. \(the halves {why}"):
        split(ids, **{argument: value})
    split(ids, **{argument: None}, class_labels=torch.zeros(3))  # None, and keywords the model ignores, pass
