"""SplitCausalLM: a Hugging Face causal LM cut in two, with the boundary between the halves.

It keeps the calling convention of the model it replaces (``model(input_ids, attention_mask, labels)``
returns ``.loss`` and ``.logits``), so a user's module keeps working after the strategy swaps it in, and it
adds the pieces the training modes need: the client forward alone and per-group server losses that
compute logits only where a label asks for them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hosl_lightning.core.boundary import InProcessBoundary, Targets
from hosl_lightning.core.split import ClientHalf, CutActivations, ServerHalf, split_causal_lm

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


def split_activations(activations: CutActivations, parts: int) -> list[CutActivations]:
    """The inverse of :func:`concat_activations` for ``parts`` equal batches (one paired forward's probes)."""
    rows = activations.hidden.shape[0]
    if rows % parts:
        raise ValueError(f"cannot split {rows} rows of activations into {parts} equal parts")
    size = rows // parts

    def part(tensor: Tensor | None, index: int) -> Tensor | None:
        if tensor is None or tensor.shape[0] != rows:
            return tensor  # None, or positions shared by every row ([1, T])
        return tensor[index * size:(index + 1) * size]

    return [CutActivations(hidden=activations.hidden[i * size:(i + 1) * size],
                           attention_mask=part(activations.attention_mask, i),
                           position_ids=part(activations.position_ids, i)) for i in range(parts)]  # type: ignore[arg-type]


def shared_prompts(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Which rows can share a forward when scored: (rows to forward, each row's source among them), or Nones.

    Rows share when each has exactly one labelled token and they agree on every other token and on the mask:
    the hidden states that score the token are then the same (causal attention never looks ahead). Nones
    when no two rows share, or some row has more or fewer than one labelled token.
    """
    labelled = labels != IGNORE_INDEX
    labelled[:, 0] = False  # a label on the first token is never scored
    if len(labels) < 2 or not bool((labelled.sum(dim=1) == 1).all()):
        return None, None
    key = input_ids.masked_fill(labelled.to(input_ids.device), -1)
    if attention_mask is not None:
        key = torch.cat([key, attention_mask.to(key.device, key.dtype)], dim=1)
    unique, source_rows = torch.unique(key, dim=0, return_inverse=True)
    if len(unique) == len(key):
        return None, None
    order = torch.arange(len(key), device=key.device)
    first = torch.full((len(unique),), len(key), device=key.device).scatter_reduce(0, source_rows, order, "amin")
    return first, source_rows


def forwarded_inputs(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The rows to forward (each shared prompt once, :func:`shared_prompts`), their mask, and each labels row's
    source among them (``None`` when nothing is shared: every row is forwarded)."""
    first, source_rows = shared_prompts(input_ids, attention_mask, labels)
    if first is None:
        return input_ids, attention_mask, None
    return input_ids[first], None if attention_mask is None else attention_mask[first], source_rows


def forwarded_rows(source_rows: Tensor | None, rows: int) -> int:
    """How many rows the client forwarded for ``rows`` labels rows: fewer when prompts are shared."""
    if source_rows is None:
        return rows
    return int(source_rows.max()) + 1 if len(source_rows) else 0


def loss_weights(targets: Targets, examples: int, device: torch.device) -> Tensor | None:
    """``targets["loss_weight"]``: None, a scalar (the batch's weight) or one weight per example, checked.

    Subsets chosen batch by batch weigh whole batches; subsets chosen example by example (per-class GradMatch,
    ``hosl_lightning.tuning``) weigh each example, and the weights then enter the loss before its mean.
    """
    weight = targets.get("loss_weight")
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or weight.dim() > 1 or (weight.dim() == 1 and len(weight) != examples):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"loss_weight must be a scalar tensor (one weight per batch) or a vector of one weight per "
                         f"example ({examples} here), got {shape}")
    return weight.to(device, torch.float32)


class SplitCausalLM(nn.Module):
    """Client half + boundary + server half, callable like the original ``*ForCausalLM``."""

    def __init__(self, model: PreTrainedModel, cut_layer: int, boundary: InProcessBoundary | None = None) -> None:
        super().__init__()
        self.client, self.server = split_causal_lm(model, cut_layer)
        self._init_rest(model.config, cut_layer, boundary)
        self._source = (model,)  # in a tuple: the model it was cut from, not a submodule (its weights are the halves')

    @classmethod
    def from_halves(
        cls, client: ClientHalf | None, server: ServerHalf | None, config: Any, cut_layer: int,
        boundary: InProcessBoundary | None = None,
    ) -> SplitCausalLM:
        """A split model holding the given halves; a process of a multi-process run holds only its own."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.client, self.server = client, server  # type: ignore[assignment]
        self._init_rest(config, cut_layer, boundary)
        return self

    def _init_rest(self, config: Any, cut_layer: int, boundary: InProcessBoundary | None) -> None:
        self._source: tuple[PreTrainedModel, ...] = ()
        self.config = config
        self.cut_layer = cut_layer
        self.boundary = boundary or InProcessBoundary()
        # Context factories that wrap every piece of each half's work (the client's forwards, updates and what
        # it receives; the server's forward, loss, backward and what it receives). The strategy installs its
        # own, so that time and memory are attributed to the half that does the work (``memory.SideSwitch``).
        self.client_side: Callable[[], AbstractContextManager[Any]] = nullcontext
        self.server_side: Callable[[], AbstractContextManager[Any]] = nullcontext

    def to_pretrained(self) -> PreTrainedModel:
        """The trained model as a plain transformers model, sharing these weights: ``save_pretrained`` and
        ``generate`` work on it. Its head is the server's: a tied model comes back untied
        (``tie_word_embeddings: false``), because the client's embedding and the server's head trained apart."""
        if not self._source:
            raise ValueError(
                "this split model holds one half only (a process of a distributed run): rebuild the whole model from "
                "both halves' checkpoints with `hosl-lightning export` (hosl_lightning.lightning.export)"
            )
        model = self._source[0]
        if model.get_output_embeddings() is not self.server.lm_head:
            model.set_output_embeddings(self.server.lm_head)
            for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
                config.tie_word_embeddings = False
        return model

    def place(self, client_device: torch.device, server_device: torch.device) -> None:
        """Put each half on its own device (an edge device beside a server, emulated in one process)."""
        if self.client is not None:
            self.client.to(client_device)
        if self.server is not None:
            self.server.to(server_device)
        self.boundary.client_device = torch.device(client_device)
        self.boundary.server_device = torch.device(server_device)

    @property
    def client_device(self) -> torch.device:
        return self.boundary.client_device

    def client_forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> CutActivations:
        device = self.boundary.client_device
        with self.client_side():
            mask = None if attention_mask is None else attention_mask.to(device)
            return self.client(input_ids.to(device), mask, position_ids)

    def _label_token_nll(
        self, final_hidden: Tensor, labels: Tensor, source_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Next-token losses at labelled positions only, and the row of each (the LM head runs nowhere else).

        On classification prompts that is one or two positions per sequence instead of all of them. With
        ``source_rows``, row r of ``labels`` reads its hidden states from row ``source_rows[r]`` of ``final_hidden``.
        """
        targets = labels[:, 1:]
        row, position = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        hidden = final_hidden[row if source_rows is None else source_rows[row], position]
        logits = self.head(hidden)
        return F.cross_entropy(logits.float(), targets[row, position], reduction="none"), row

    def head(self, final_hidden: Tensor) -> Tensor:
        """The LM head's logits, computed at the head's own precision even under autocast (bf16-mixed).

        The probe losses' difference L+ - L- is of order 2 mu g.u: on logits of size ~10 bf16 rounds by ~1e-2,
        as much as the signal at mu = 1e-3, and c_q became mostly rounding (a correlation of 0.5 with float32's
        over 64 directions of a tiny model whose logits are ~8; above 0.99 with the head in float32).
        """
        dtype = getattr(self.server.lm_head, "weight", final_hidden).dtype
        with torch.autocast(final_hidden.device.type, enabled=False):
            return self.server.logits(final_hidden.to(dtype))

    def server_losses(self, activations: CutActivations, targets: Targets, groups: int = 1) -> Tensor:
        """The training loss of each of ``groups`` equal slices of the batch (one slice per probe).

        ``targets["labels"]`` alone: the mean next-token loss over labelled tokens (the HF causal-LM loss).
        With ``class_labels`` and ``num_classes`` (rows are C candidate sequences per example): cross-entropy
        over the candidates' sequence log-likelihoods, the classification-style loss MeZO trains with. With
        ``source_rows`` (shared prompts, ``batch_tensors``) the activations hold only the forwarded rows, and
        labels row r reads forwarded row ``source_rows[r]`` of its group.
        With ``loss_weight`` (a weighted subset's, ``hosl_lightning.tuning``): a scalar multiplies every group's
        loss; one weight per example multiplies that example's loss (classification) or its tokens' losses (LM)
        before the mean. Either way it scales the server's gradient and the ZO differences alike.
        """
        final_hidden = self.server(activations)
        labels = targets["labels"].to(final_hidden.device)
        rows = labels.shape[0]
        source_rows = targets.get("source_rows")  # shared prompts: each labels row reads its source row's states
        source_rows = None if source_rows is None else source_rows.to(final_hidden.device)
        forwarded = forwarded_rows(source_rows, rows)
        if final_hidden.shape[0] != groups * forwarded:
            raise ValueError(f"activations hold {final_hidden.shape[0]} rows, expected {groups} x {forwarded}")
        sources = None if source_rows is None else (
            source_rows + forwarded * torch.arange(groups, device=final_hidden.device)[:, None]).flatten()
        nll, row_of_token = self._label_token_nll(final_hidden, labels.repeat(groups, 1), sources)
        if "class_labels" in targets:
            num_classes = int(targets["num_classes"])
            weight = loss_weights(targets, rows // num_classes, nll.device)
            log_likelihood = -torch.zeros(groups * rows, device=nll.device).index_add(0, row_of_token, nll)
            class_labels = targets["class_labels"].to(nll.device).repeat(groups)
            losses = F.cross_entropy(log_likelihood.view(-1, num_classes), class_labels, reduction="none")
            losses = losses.view(groups, -1)
            return losses.mean(dim=1) if weight is None else (losses * weight).mean(dim=1)
        weight = loss_weights(targets, rows, nll.device)
        if weight is not None and weight.dim() == 1:  # a weighted token mean: sum_r w_r sum_t nll_rt / tokens
            nll = nll * weight[row_of_token % rows]
        group_of_token = torch.div(row_of_token, rows, rounding_mode="floor")
        sums = torch.zeros(groups, device=nll.device).index_add(0, group_of_token, nll)
        counts = torch.bincount(group_of_token, minlength=groups)
        if bool((counts == 0).any()):
            raise ValueError("a batch has no labelled tokens (all labels are -100): there is nothing to train on")
        losses = sums / counts
        # a scalar multiplies the mean, not each token: that scales the loss exactly, and the ZO difference of two
        # near-equal losses would amplify the rounding of a token-by-token product
        return losses * weight if weight is not None and weight.dim() == 0 else losses

    @torch.no_grad()
    def server_row_features(
        self, activations: CutActivations, labels: Tensor, projection: Tensor | None = None, tokens_per_pass: int = 2048
    ) -> tuple[Tensor, Tensor]:
        """Each row's summed per-token gradient features and its labelled-token count: GradMatch's raw material.

        A token's feature is the gradient of its own next-token loss. By default dL/dh at the final hidden state
        (``hidden`` numbers): only the LM head is differentiated, never the blocks, and the vocab x hidden weight
        gradient is never formed; it is the signal backprop sends into every server block, a cheap stand-in for
        the gradient. With ``projection`` (k x vocab) it is the LM head's weight gradient with its vocabulary side
        projected, (P e_t) h_t^T (e_t = softmax - one-hot; k x hidden numbers): unlike dL/dh it carries the input
        h_t, so two batches with the same class mix can still differ. A batch's feature (the gradient of its mean
        loss) is the sum of its rows' sums over the sum of their counts, so rows can be computed in any grouping.
        Logits are formed for ``tokens_per_pass`` labelled tokens at a time, which bounds memory on long sequences.
        """
        final_hidden = self.server(activations)[:, :-1]
        targets = labels.to(final_hidden.device)[:, 1:]
        keep = targets != IGNORE_INDEX
        rows = keep.shape[0]
        hidden, wanted, row_of_token = final_hidden[keep], targets[keep], keep.nonzero()[:, 0]
        # dL/dh = e_t W, or the projected error P e_t (e_t = softmax - one-hot), per labelled token
        matrix = self.server.lm_head.weight.float() if projection is None else projection.to(hidden.device).mT
        errors = []
        for start in range(0, len(hidden), tokens_per_pass):
            error = self.server.logits(hidden[start : start + tokens_per_pass]).float().softmax(dim=-1)
            error[torch.arange(len(error), device=error.device), wanted[start : start + tokens_per_pass]] -= 1.0
            errors.append(error @ matrix)
        token_features = torch.cat(errors) if errors else hidden.new_zeros(0, final_hidden.shape[-1]).float()
        counts = keep.sum(dim=1)
        if projection is None:
            return torch.zeros(rows, token_features.shape[1], device=hidden.device).index_add(
                0, row_of_token, token_features), counts
        projected = torch.zeros(*keep.shape, projection.shape[0], device=hidden.device)
        projected[keep] = token_features  # rows x positions x k, zero where unlabelled
        return torch.bmm(projected.mT, final_hidden.float()).flatten(1), counts  # sum_t (P e_t) h_t^T per row

    @torch.no_grad()
    def sequence_log_likelihood(
        self, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, share_prompts: bool = True
    ) -> Tensor:
        """Sum of log-probabilities of each row's labelled tokens: the score of a candidate answer.

        With ``share_prompts``, rows that differ only in their one labelled token (a prompt's candidate answers,
        when each is a single token) are forwarded once: the hidden state that scores the token comes before
        it, so it is the same for all of them. Scoring C one-token answers then costs one forward of the
        prompt, not C; the scores are the same.
        """
        source_rows = None
        if share_prompts:
            input_ids, attention_mask, source_rows = forwarded_inputs(input_ids, attention_mask, labels)
        return self.scores_across(self.client_forward(input_ids, attention_mask), labels, source_rows)

    def scores_across(self, activations: CutActivations, labels: Tensor, source_rows: Tensor | None) -> Tensor:
        """Send the activations and labels up and the scores down: in-process here, over the wire in a client
        process (``hosl_lightning.distributed.client.ClientSplitCausalLM``)."""
        with self.server_side():
            up, targets = self.boundary.send_up(activations, {"labels": labels, "source_rows": source_rows})
            assert targets is not None
            scores = self.server_scores(up, targets["labels"], targets["source_rows"])
        with self.client_side():
            return self.boundary.send_down_losses(scores)

    @torch.no_grad()
    def server_scores(self, activations: CutActivations, labels: Tensor, source_rows: Tensor | None = None) -> Tensor:
        """The server's half of :meth:`sequence_log_likelihood`: each row's summed labelled-token log-probability.

        With ``source_rows`` (from ``shared_prompts``), ``activations`` hold only the rows forwarded, and row r
        of ``labels`` is scored on row ``source_rows[r]`` of them.
        """
        nll, row_of_token = self._label_token_nll(self.server(activations), labels, source_rows)
        return -torch.zeros(labels.shape[0], device=nll.device).index_add(0, row_of_token, nll)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Tensor, ...]:
        """Same contract as ``AutoModelForCausalLM.forward`` for training and scoring (no KV cache).

        ``position_ids`` (packed sequences), ``logits_to_keep`` and ``return_dict`` act as in transformers; the
        arguments that would change the result but cannot be honoured here (``REFUSED_FORWARD_ARGUMENTS``)
        are refused by name. Other keywords are ignored, as the unsplit model ignores them (a classification
        batch's ``class_labels``, ``use_cache``).
        """
        refused = [name for name in REFUSED_FORWARD_ARGUMENTS if kwargs.get(name) is not None and kwargs[name] is not False]
        if refused:
            raise ValueError(
                f"SplitCausalLM.forward does not support {', '.join(f'{name}=...' for name in refused)} "
                f"({'; '.join(REFUSED_FORWARD_ARGUMENTS[name] for name in refused)}); it honours input_ids, "
                "attention_mask, labels, position_ids, logits_to_keep and return_dict"
            )
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("SplitCausalLM.forward takes logits_to_keep or labels, not both: the loss needs the "
                             "logits of every position")
        targets = None if labels is None else {"labels": labels}
        client_activations = self.client_forward(input_ids, attention_mask, position_ids)
        with self.server_side():  # labels live on the server: the loss is its work too
            activations, server_targets = self.boundary.send_up(client_activations, targets)
            final_hidden = self.server(activations)
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.head(final_hidden[:, kept])
            loss = None
            if server_targets is not None:
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), server_targets["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
                )
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()


# The unsplit model's arguments that change its result and that a split forward cannot honour, and why.
REFUSED_FORWARD_ARGUMENTS: dict[str, str] = {
    "past_key_values": "no KV cache crosses the cut",
    "inputs_embeds": "the client half embeds the tokens itself",
    "token_type_ids": "the client half embeds token ids only",
    "cache_position": "no KV cache crosses the cut",
    "output_attentions": "the halves do not collect attention weights",
    "output_hidden_states": "the halves do not collect hidden states",
}


def find_causal_lm(module: nn.Module) -> tuple[str, nn.Module]:
    """The (dotted name, module) of the one HF causal LM (or already split model) inside ``module``."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, (SplitCausalLM, PreTrainedModel))]
    outermost = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n and o)]
    if not outermost:
        raise ValueError(
            f"HOSLStrategy found no Hugging Face model inside {type(module).__name__}: assign the causal LM as an "
            "attribute of your LightningModule, e.g. self.model = AutoModelForCausalLM.from_pretrained(...)"
        )
    if len(outermost) > 1:
        names = ", ".join(n or "<module>" for n, _ in outermost)
        raise ValueError(f"HOSLStrategy found several Hugging Face models ({names}); it can split exactly one")
    return outermost[0]
