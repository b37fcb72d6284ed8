"""Cut a Hugging Face causal LM after decoder block ``cut_layer`` into a client half and a server half.

The client half holds the token (and position) embeddings and blocks ``[0, cut)``; the server half holds
blocks ``[cut, L)``, the final norm and its own LM head. Both halves call the model's *real* block modules
with masks from ``transformers.masking_utils`` and rotary embeddings from the model's own rotary module,
so ``server.logits(server(client(ids, mask)))`` equals ``model(ids, attention_mask=mask).logits``.

What differs between architectures (where the parts live, how position ids and embeddings are formed,
which layers use a sliding window) is described by one small :class:`Family` per ``model_type``.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from hosl_lightning.core.options import UserError

__all__ = [
    "SUPPORTED_FAMILIES",
    "ClientHalf",
    "CutActivations",
    "DecoderStack",
    "Family",
    "ServerHalf",
    "num_blocks",
    "split_causal_lm",
]


@dataclass
class CutActivations:
    """What crosses the cut from client to server: everything the server needs, and nothing more."""

    hidden: torch.Tensor  # [B, T, H] output of block cut-1 (the embeddings when cut == 0)
    attention_mask: torch.Tensor | None  # the 2D [B, T] padding mask as given (None = no padding)
    position_ids: torch.Tensor  # [B, T] or [1, T] long, exactly what the unsplit forward uses


# --- how the families differ ------------------------------------------------------------------------
# Each function mirrors a few lines of the family's modeling_*.py (transformers 5.23) forward.

Parts = nn.ModuleDict


def _arange_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """GPT-2, Llama, Qwen, Mistral, NeoX: positions 0..T-1 whatever the padding."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


def _mask_cumsum_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """OPT: positions count only real tokens, so left padding does not shift them; pads get -1."""
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, device=input_ids.device)
    return (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()


def _embed_tokens(parts: Parts, input_ids, position_ids, attention_mask) -> torch.Tensor:
    """Llama, Qwen, Mistral: token embeddings only (positions enter later through rotary)."""
    return parts.embed_tokens(input_ids)


def _embed_neox(parts: Parts, input_ids, position_ids, attention_mask) -> torch.Tensor:
    return parts.emb_dropout(parts.embed_in(input_ids))


def _embed_gpt2(parts: Parts, input_ids, position_ids, attention_mask) -> torch.Tensor:
    return parts.drop(parts.wte(input_ids) + parts.wpe(position_ids))


def _embed_opt(parts: Parts, input_ids, position_ids, attention_mask) -> torch.Tensor:
    hidden = parts.embed_tokens(input_ids)
    if "project_in" in parts:  # word_embed_proj_dim != hidden_size (e.g. OPT-350m)
        hidden = parts.project_in(hidden)
    # OPT's learned positions add their own offset of 2; with position_ids given the mask is unused.
    return hidden + parts.embed_positions(attention_mask, 0, position_ids=position_ids)


def _all_full_attention(config: transformers.PretrainedConfig, n: int) -> list[str]:
    return ["full_attention"] * n


def _config_layer_types(config: transformers.PretrainedConfig, n: int) -> list[str]:
    """Qwen2/Qwen3: some layers (index >= max_window_layers) may use a sliding window."""
    return list(config.layer_types[:n])


def _mistral_layer_types(config: transformers.PretrainedConfig, n: int) -> list[str]:
    """Mistral: one sliding window for every layer, or none."""
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * n


# transformers 5.24 renamed the mask builders' `past_key_values` argument to `cache`; pass whichever exists.
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}

_MASK_BUILDERS: dict[str, Callable[..., torch.Tensor | None]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts, and the few ways its forward differs from the others.

    Attribute names are looked up on the base module (the one whose forward loops over the blocks);
    a name whose attribute is None in a given config (OPT's ``project_in``) is skipped.
    """

    base: str  # dotted path from the *ForCausalLM to the base module, e.g. "model.decoder"
    embeddings: tuple[str, ...]  # client-side modules before the blocks, passed to `embed` by name
    final: tuple[str, ...]  # server-side modules after the blocks, applied in this order
    blocks: str = "layers"
    rotary: str | None = "rotary_emb"
    position_ids: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = _arange_positions
    embed: Callable[..., torch.Tensor] = _embed_tokens
    layer_types: Callable[[transformers.PretrainedConfig, int], list[str]] = _all_full_attention
    mask_sees_position_ids: bool = True  # OPT does not pass position_ids to create_causal_mask


_LLAMA_LIKE = Family(base="model", embeddings=("embed_tokens",), final=("norm",))

SUPPORTED_FAMILIES: dict[str, Family] = {
    "opt": Family(
        base="model.decoder",
        embeddings=("embed_tokens", "project_in", "embed_positions"),
        final=("final_layer_norm", "project_out"),
        rotary=None,
        position_ids=_mask_cumsum_positions,
        embed=_embed_opt,
        mask_sees_position_ids=False,
    ),
    "gpt2": Family(
        base="transformer",
        blocks="h",
        embeddings=("wte", "wpe", "drop"),
        final=("ln_f",),
        rotary=None,
        embed=_embed_gpt2,
    ),
    "gpt_neox": Family(
        base="gpt_neox", embeddings=("embed_in", "emb_dropout"), final=("final_layer_norm",), embed=_embed_neox
    ),
    "llama": _LLAMA_LIKE,
    "qwen2": replace(_LLAMA_LIKE, layer_types=_config_layer_types),
    "qwen3": replace(_LLAMA_LIKE, layer_types=_config_layer_types),
    "mistral": replace(_LLAMA_LIKE, layer_types=_mistral_layer_types),
}


# --- the halves --------------------------------------------------------------------------------------


class DecoderStack(nn.Module):
    """A contiguous run of the model's real decoder blocks, with the masks and rotary they need.

    Masks and rotary embeddings are rebuilt from (hidden, attention_mask, position_ids) alone, so the
    server side can run from a received :class:`CutActivations` without anything from the client.

    With ``checkpointing`` on, a forward that records a graph keeps only each block's input and runs the block
    again in the backward pass (``torch.utils.checkpoint``, non-reentrant, dropout masks replayed): the same
    gradients, for the activations of one block instead of all of them.
    """

    def __init__(
        self,
        family: Family,
        config: transformers.PretrainedConfig,
        blocks: list[nn.Module],
        first_layer: int,
        rotary: nn.Module | None,
        num_layers: int,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config  # the model's own config object: its attention implementation is followed
        self.first_layer = first_layer
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary if blocks else None
        # Mask kind per block, chosen by its *global* layer index.
        self.layer_types = family.layer_types(config, num_layers)[first_layer : first_layer + len(blocks)]
        self.checkpointing = False

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if not self.blocks:
            return hidden
        mask_position_ids = position_ids if self.family.mask_sees_position_ids else None
        masks = {
            kind: _MASK_BUILDERS[kind](
                config=self.config,
                inputs_embeds=hidden,  # only its batch size, length, dtype and device are read
                attention_mask=attention_mask,
                position_ids=mask_position_ids,
                **_NO_CACHE,
            )
            for kind in dict.fromkeys(self.layer_types)
        }
        extra = {}
        if self.rotary is not None:
            extra["position_embeddings"] = self.rotary(hidden, position_ids)
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block, kind in zip(self.blocks, self.layer_types):
            if recompute:
                hidden = checkpoint(block, hidden, use_reentrant=False, attention_mask=masks[kind],
                                    position_ids=position_ids, **extra)
            else:
                hidden = block(hidden, attention_mask=masks[kind], position_ids=position_ids, **extra)
        return hidden


class ClientHalf(nn.Module):
    """Embeddings + blocks [0, cut): everything before the cut, and no LM head."""

    def __init__(self, family: Family, embeddings: nn.ModuleDict, stack: DecoderStack) -> None:
        super().__init__()
        self.family = family
        self.embeddings = embeddings
        self.stack = stack

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CutActivations:
        """``position_ids`` as the unsplit model takes them (packed sequences restart at 0); None: the family's."""
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be a 2D padding mask shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = self.family.position_ids(input_ids, attention_mask)
        elif position_ids.dim() != 2 or position_ids.shape[1] != input_ids.shape[1] or (
                position_ids.shape[0] not in (1, input_ids.shape[0])):
            raise ValueError(
                f"position_ids must be shaped like input_ids {tuple(input_ids.shape)} or [1, "
                f"{input_ids.shape[1]}], got {tuple(position_ids.shape)}"
            )
        else:
            position_ids = position_ids.to(input_ids.device, torch.long)
        hidden = self.family.embed(self.embeddings, input_ids, position_ids, attention_mask)
        hidden = self.stack(hidden, attention_mask, position_ids)
        return CutActivations(hidden=hidden, attention_mask=attention_mask, position_ids=position_ids)


class ServerHalf(nn.Module):
    """Blocks [cut, L) + final norm (+ OPT project_out) + its own LM head; no token embeddings."""

    def __init__(self, stack: DecoderStack, final: nn.ModuleDict, lm_head: nn.Linear) -> None:
        super().__init__()
        self.stack = stack
        self.final = final
        self.lm_head = lm_head

    def forward(self, activations: CutActivations) -> torch.Tensor:
        """Final normalized hidden states [B, T, H'], before the LM head."""
        hidden = activations.hidden
        position_ids = activations.position_ids.to(hidden.device)  # the mask is moved by the mask builders
        hidden = self.stack(hidden, activations.attention_mask, position_ids)
        for module in self.final.values():
            hidden = module(hidden)
        return hidden

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(final_hidden)


# --- building them -----------------------------------------------------------------------------------


def _family_of(model: nn.Module) -> Family:
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"expected a Hugging Face PreTrainedModel, got {type(model).__name__}")
    model_type = model.config.model_type
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return SUPPORTED_FAMILIES[model_type]


def _base_of(model: transformers.PreTrainedModel, family: Family) -> nn.Module:
    """The module that loops over the blocks; a bare base model or a non-LM head is rejected here."""
    head = model.get_output_embeddings()
    try:
        base = operator.attrgetter(family.base)(model)
    except AttributeError:
        base = None
    if base is None or not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with an LM head: split_causal_lm needs the "
            f"*ForCausalLM class (e.g. load it with AutoModelForCausalLM), whose `{family.base}` holds the blocks"
        )
    return base


def num_blocks(model: transformers.PreTrainedModel) -> int:
    """Number of decoder blocks L; valid cuts are 0..L."""
    family = _family_of(model)
    return len(getattr(_base_of(model, family), family.blocks))


def _check_cut(cut_layer: object, model_type: str, n: int) -> int:
    valid = f"choose an integer in [0, {n}]"
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, numbers.Integral):
        raise TypeError(f"cut_layer={cut_layer!r} must be an int, not {type(cut_layer).__name__}: {valid}")
    cut = int(cut_layer)
    if not 0 <= cut <= n:
        raise UserError(
            f"cut_layer={cut} is out of range for this {model_type} model with {n} decoder blocks: {valid}"
        )
    return cut


def _parts(base: nn.Module, names: tuple[str, ...]) -> nn.ModuleDict:
    """The named submodules of `base` that exist in this config, by reference (no copies)."""
    return nn.ModuleDict({name: module for name in names if (module := getattr(base, name, None)) is not None})


def _untied_head(head: nn.Linear, input_embeddings: nn.Module) -> nn.Linear:
    """The server's own head: the original if untied, else a Linear holding a clone of the shared weight."""
    if head.weight is not input_embeddings.weight:
        return head
    untied = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
    untied.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    untied.bias = head.bias  # never tied to the embeddings: keep the original (or None)
    return untied


def split_causal_lm(model: transformers.PreTrainedModel, cut_layer: int) -> tuple[ClientHalf, ServerHalf]:
    """Cut ``model`` after decoder block ``cut_layer`` (0 = embeddings only on the client, L = all blocks).

    The halves share the model's own submodules (and so its weights, dtype, device and train/eval mode);
    only a tied LM head is cloned, so the client's embedding and the server's head train independently.
    The server gets its own copy of the rotary module (buffers only) so the halves can live on different
    devices. The original model is not modified.
    """
    family = _family_of(model)
    base = _base_of(model, family)
    model_type = model.config.model_type
    if getattr(base.config, "layerdrop", 0.0) > 0:
        raise UserError(
            f"layerdrop={base.config.layerdrop} is not supported by the split forward: set config.layerdrop = 0"
        )
    blocks = list(getattr(base, family.blocks))
    n = len(blocks)
    cut = _check_cut(cut_layer, model_type, n)

    rotary = getattr(base, family.rotary) if family.rotary else None
    client_stack = DecoderStack(family, base.config, blocks[:cut], 0, rotary, n)
    # The server's rotary is a copy (buffers only, sharing the config) so each half can sit on its own device.
    server_rotary = copy.deepcopy(rotary, memo={id(base.config): base.config}) if rotary is not None else None
    server_stack = DecoderStack(family, base.config, blocks[cut:], cut, server_rotary, n)

    client = ClientHalf(family, _parts(base, family.embeddings), client_stack)
    head = _untied_head(model.get_output_embeddings(), model.get_input_embeddings())
    server = ServerHalf(server_stack, _parts(base, family.final), head)
    _match_mode(client, model)
    _match_mode(server, model)
    return client, server


def _match_mode(half: nn.Module, model: nn.Module) -> None:
    """Give the new container modules the model's train/eval flag, leaving the original modules' as they are."""
    originals = set(model.modules())
    for module in half.modules():
        if module not in originals:
            module.training = model.training
