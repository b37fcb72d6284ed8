"""SplitCausalLM: a Hugging Face causal LM cut in two, with the boundary between the halves.

It keeps the calling convention of the model it replaces (``model(input_ids, attention_mask, labels)``
returns ``.loss`` and ``.logits``), so a user's module keeps working after the strategy swaps it in, and it
adds the pieces the training modes need: the client forward alone and per-group server losses that
compute logits only where a label asks for them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hosl_lightning.boundary import InProcessBoundary
from hosl_lightning.split import CutActivations, split_causal_lm

IGNORE_INDEX = -100


def concat_activations(parts: list[CutActivations]) -> CutActivations:
    """Stack several activations along the batch axis, for one batched server forward."""
    if len(parts) == 1:
        return parts[0]
    masks = [p.attention_mask for p in parts]
    positions = [p.position_ids for p in parts]
    shared_positions = all(p.shape[0] == 1 and torch.equal(p, positions[0]) for p in positions)
    return CutActivations(
        hidden=torch.cat([p.hidden for p in parts]),
        attention_mask=None if all(m is None for m in masks) else torch.cat(
            [torch.ones(p.hidden.shape[:2], dtype=torch.long, device=p.hidden.device) if m is None else m
             for p, m in zip(parts, masks)]
        ),
        position_ids=positions[0] if shared_positions else torch.cat(
            [p.expand(h.hidden.shape[0], -1) for p, h in zip(positions, parts)]
        ),
    )


class SplitCausalLM(nn.Module):
    """Client half + boundary + server half, callable like the original ``*ForCausalLM``."""

    def __init__(self, model: PreTrainedModel, cut_layer: int, boundary: InProcessBoundary | None = None) -> None:
        super().__init__()
        self.client, self.server = split_causal_lm(model, cut_layer)
        self.config = model.config
        self.cut_layer = cut_layer
        self.boundary = boundary or InProcessBoundary()
        # Wraps every piece of server-side work in a step; memory measurement uses it to leave the server's
        # allocations out of the client's account.
        self.server_side: Callable[[], AbstractContextManager[Any]] = nullcontext

    def place(self, client_device: torch.device, server_device: torch.device) -> None:
        """Put each half on its own device (an edge device beside a server, emulated in one process)."""
        self.client.to(client_device)
        self.server.to(server_device)
        self.boundary.client_device = torch.device(client_device)
        self.boundary.server_device = torch.device(server_device)

    @property
    def client_device(self) -> torch.device:
        return self.boundary.client_device

    def client_forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CutActivations:
        device = self.boundary.client_device
        mask = None if attention_mask is None else attention_mask.to(device)
        return self.client(input_ids.to(device), mask)

    def server_losses(self, activations: CutActivations, labels: Tensor, groups: int = 1) -> Tensor:
        """Mean next-token loss of each of ``groups`` equal slices of the batch (the HF causal-LM loss).

        The LM head runs only at positions whose next token has a label: on classification prompts that is
        one or two positions per sequence instead of all of them.
        """
        final_hidden = self.server(activations)
        batch = labels.shape[0]
        if final_hidden.shape[0] != groups * batch:
            raise ValueError(f"activations hold {final_hidden.shape[0]} rows, expected {groups} x {batch}")
        targets = labels[:, 1:].to(final_hidden.device).repeat(groups, 1)
        keep = targets != IGNORE_INDEX
        logits = self.server.logits(final_hidden[:, :-1][keep])
        token_losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        group_of_token = torch.div(rows, batch, rounding_mode="floor")
        sums = torch.zeros(groups, device=token_losses.device).index_add(0, group_of_token, token_losses)
        counts = keep.view(groups, -1).sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("a batch has no labelled tokens (all labels are -100): there is nothing to train on")
        return sums / counts

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Same contract as ``AutoModelForCausalLM.forward`` for training and scoring (no KV cache)."""
        for unsupported in ("past_key_values", "inputs_embeds"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"SplitCausalLM does not support {unsupported}=...")
        activations, server_labels = self.boundary.send_up(self.client_forward(input_ids, attention_mask), labels)
        final_hidden = self.server(activations)
        logits = self.server.logits(final_hidden)
        loss = None
        if server_labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), server_labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)
