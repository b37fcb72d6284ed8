"""What every mode shares: its settings, its output, the contexts its two halves run in, and train/eval rules.

A mode is a client half and a server half written against :mod:`hosl_lightning.core.boundary`'s protocols
(:class:`~hosl_lightning.core.boundary.ClientLink`, :class:`~hosl_lightning.core.boundary.Uplink`), so the
same code runs in one process, across processes over torch.distributed, and under a drop-in module.

Train and eval mode is decided here, once, for every path:

- probes run without dropout (:func:`eval_mode`): the two sides of a difference must see the same function;
- a first-order gradient sees the model's own mode, as fo's does: when the server half has active dropout, a
  hosl server takes one more server forward, in training mode, for its gradient (:func:`dropout_active`);
  without dropout the probe forward's graph is used and nothing extra runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hosl_lightning.core.boundary import ClientLink, Reply, Targets, Uplink
from hosl_lightning.core.split_model import SplitCausalLM, forwarded_inputs, split_activations
from hosl_lightning.core.zo import ZOSGD, ZOEstimate, probe_points

ModeName = Literal["hosl", "fo", "zo", "frozen"]  # the built-in modes, as a config type; registered ones add to MODES
ServerGrad = Literal["perturbed", "mean", "clean"]
SERVER_GRADS: tuple[str, ...] = ("perturbed", "mean", "clean")
# The strategy options that only a zeroth-order side reads: a mode that probes declares them (Mode.options).
ZO_OPTIONS: tuple[str, ...] = ("q", "mu", "zo_lr", "zo_weight_decay", "zo_lr_schedule", "zo_optimizer",
                               "embedding_directions", "pair_probes", "direction", "seed")


@dataclass(frozen=True)
class ZOSettings:
    """How the zeroth-order estimate is taken: both halves must agree on it (the server counts the probes)."""

    queries: int = 1
    mu: float = 1e-3
    server_grad: ServerGrad = "perturbed"
    batch_probes: bool = True
    estimator: str = "two_point"  # the client optimizer's (core.zo.ESTIMATORS): which probes are sent
    pair_probes: bool = False  # run a query's +mu and -mu probes as one client forward of 2B rows

    def points(self) -> list[tuple[int, float]]:
        """The (query, sign) of each probe, in the order sent; sign 0 is the unperturbed point."""
        return probe_points(self.estimator, self.queries)


@dataclass
class StepOutput:
    # The step's training loss (detached, logged as ``train_loss``), one quantity in every setting: the mean of the
    # probe losses when a side learns by ZO (hosl, zo; whatever server_grad), the batch's loss in fo (no probes).
    loss: Tensor
    estimate: ZOEstimate | None = None  # the ZO update of this step, if any (applied by whoever owns the optimizer)
    clean_loss: Tensor | None = None  # the unperturbed loss, where the step computed it anyway (server_grad: clean)


@dataclass
class ClientContext:
    """What the client half of a step works with."""

    model: SplitCausalLM  # holds at least the client half
    settings: ZOSettings
    step: int  # index of this step's direction seeds
    optimizer: ZOSGD | None = None  # the client's ZO optimizer (hosl, zo): its directions perturb the probes
    backward: Callable[[Tensor, Tensor], None] = field(default=lambda tensor, gradient: tensor.backward(gradient))
    grad_scaler: Any = None  # 16-mixed's torch GradScaler: the gradients are scaled, and it skips a non-finite step


@dataclass
class ServerContext:
    """What the server half of a step works with."""

    model: SplitCausalLM  # holds at least the server half
    settings: ZOSettings
    backward: Callable[[Tensor], None] = field(default=lambda loss: loss.backward())  # Lightning's manual_backward in-process
    optimizer: ZOSGD | None = None  # zo: the ZOSGD whose directions perturb the server half


REPLIES = ("losses", "grad", "loss")  # probe losses (hosl, zo), dL/dh (fo), the training loss alone (frozen)


@dataclass(frozen=True)
class Mode:
    """A registered training mode: which halves learn by ZO, and its two halves."""

    name: str
    zo_halves: tuple[str, ...]  # "client" and/or "server": trained by zeroth-order updates, never by backprop
    client_step: Callable[[ClientContext, ClientLink, StepInputs], StepOutput]
    server_step: Callable[[ServerContext, Uplink, Targets, int], Reply]
    reply: str  # the kind of message the server sends down: "losses", "grad" or "loss"
    probes: Callable[[ZOSettings], int]  # activations the client sends per step
    frozen_halves: tuple[str, ...] = ()  # halves that do not learn at all: no gradient, no optimizer, no directions
    # The strategy options this mode reads among those that some mode ignores (ZO_OPTIONS, server_grad, ...):
    # one it does not list is refused when a user sets it, instead of being silently ignored.
    options: tuple[str, ...] = ()
    reply_for: Callable[[ZOSettings], str] | None = None  # where the reply depends on the settings (hosl's estimator)

    def __post_init__(self) -> None:
        if self.reply not in REPLIES:
            raise ValueError(f"a mode's reply is one of {', '.join(map(repr, REPLIES))}, got {self.reply!r}")
        if set(self.zo_halves) & set(self.frozen_halves):
            raise ValueError(f"mode {self.name!r}: a half is trained by ZO or frozen, not both")

    def reply_to(self, settings: ZOSettings) -> str:
        """The kind of message the server sends down in a step run with ``settings``."""
        return self.reply if self.reply_for is None else self.reply_for(settings)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite number: the run stops instead of writing NaN weights or scores."""


DIVERGENCE_HINT = ("training diverged; lower the learning rate (zo_lr for ZO updates, the optimizer's lr for the "
                   "server) or raise mu")


def ensure_finite(step: int, what: str, values: Tensor, hint: str = DIVERGENCE_HINT) -> Tensor:
    """``values``, or a :class:`DivergenceError` naming the step and the quantity when any is NaN or inf."""
    if not bool(torch.isfinite(values).all()):
        shown = values.detach().float().reshape(-1)[:4].tolist()
        raise DivergenceError(f"step {step}: {what} is not finite ({', '.join(f'{v:g}' for v in shown)}"
                              f"{', ...' if values.numel() > 4 else ''}): {hint}")
    return values


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Probe forwards run without dropout, or the two sides of a difference see different masks.

    Each submodule gets its own flag back (not ``module.train(flag)``, which recurses): a model whose owner
    turned part of it to eval mode, as MeZO turns dropout off, keeps that after every probe.
    """
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def _dropout_rates(module: nn.Module) -> Iterator[float]:
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            yield float(sub.p)
        for name in ("attention_dropout", "dropout", "attn_dropout"):  # HF attention passes a rate to sdpa
            value = getattr(sub, name, None)
            if isinstance(value, float):
                yield value


def dropout_active(module: nn.Module | None) -> bool:
    """Whether a training-mode forward of ``module`` differs from an eval-mode one (dropout > 0 anywhere)."""
    return module is not None and module.training and any(rate > 0 for rate in _dropout_rates(module))


def batch_tensors(batch: dict[str, Any]) -> tuple[Tensor, Tensor | None, Targets]:
    """Inputs for the client; everything else (labels, class labels, loss weight) is for the server's loss.

    A classification batch whose candidates are one-token answers after one prompt (C rows per example that
    differ only in the answer) sends each prompt once: the client forwards E rows instead of E x C, and
    ``targets["source_rows"]`` says which forwarded row each labels row reads. Causal attention never looks
    ahead, so the hidden state that scores each answer is the same, and so is the loss. Under active dropout
    (OPT's 0.1, say) an example's answer rows then share one dropout mask over the prompt instead of drawing one
    each: every row's loss keeps its distribution, and the answers are compared under the same noise.
    """
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        raise KeyError(f"a training batch needs 'input_ids' and 'labels'; missing {missing}")
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    targets = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    if "class_labels" in batch:
        input_ids, mask, source_rows = forwarded_inputs(input_ids, mask, batch["labels"])
        if source_rows is not None:
            targets["source_rows"] = source_rows
    return input_ids, mask, targets


@dataclass(frozen=True)
class StepInputs:
    """A step's batch as the halves see it: the client's inputs and the server's loss targets.

    Under a drop-in module the user's ``training_step`` reads the batch itself, so the inputs are empty
    (:data:`READ_BY_THE_MODULE`) and the link evaluates the module's own loss instead of the client forward.
    """

    input_ids: Tensor | None
    attention_mask: Tensor | None
    targets: Targets

    @classmethod
    def of(cls, batch: dict[str, Any]) -> StepInputs:
        return cls(*batch_tensors(batch))


READ_BY_THE_MODULE = StepInputs(None, None, {})


def send_probes(ctx: ClientContext, link: ClientLink, inputs: StepInputs, *, half: bool = False,
                with_fields: bool = False) -> None:
    """Send the step's probe activations up, in :meth:`ZOSettings.points` order, without dropout.

    With ``pair_probes``, a query's two signs run as one client forward of the batch twice over (each direction
    drawn once); otherwise one forward per probe. ``half``: the optimizer spans both halves (zo); ``with_fields``:
    each probe travels with its (query, sign), for a server half that perturbs itself to match.
    """
    model, settings, optimizer = ctx.model, ctx.settings, ctx.optimizer
    assert optimizer is not None, "a zeroth-order client needs its ZO optimizer"
    ids, mask = inputs.input_ids, inputs.attention_mask
    points = settings.points()
    with eval_mode(model.client), torch.no_grad():  # the probes of a step must see the same function
        index = 0
        while index < len(points):
            query, sign = points[index]
            fields = [{"query": q, "sign": s} if with_fields else {} for q, s in points[index:index + 2]]
            if settings.pair_probes and ids is not None and points[index + 1:index + 2] == [(query, -sign)] and sign:
                doubled = torch.cat([ids, ids])
                with optimizer.paired([model.client], ctx.step, query, sign * settings.mu, doubled.shape[0], half):
                    both = model.client_forward(doubled, None if mask is None else torch.cat([mask, mask]))
                for part, extra in zip(split_activations(both, 2), fields):
                    link.up(lambda part=part: part, **extra)
                index += 2
                continue
            perturbation = (optimizer.perturbed([model.client], ctx.step, query, sign * settings.mu, half=half)
                            if sign else nullcontext())
            with perturbation:
                link.up(lambda: model.client_forward(ids, mask), **fields[0])
            index += 1
