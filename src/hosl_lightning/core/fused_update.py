"""A first-order optimizer step fused into the backward pass: each parameter is stepped, and its gradient freed, as
soon as autograd has accumulated it (``Tensor.register_post_accumulate_grad_hook``; LOMO, and torch's recipe "How
to save memory by fusing the optimizer step into the backward pass"). No full set of gradients is ever held.

The step is the optimizer's own, parameter by parameter: one single-parameter optimizer of the same class per
parameter, which takes the hyperparameters of the parameter's group in the optimizer at every step (so an lr
scheduler moves it) and keeps its state in the optimizer's state (so checkpoints hold it and resuming restores it).
The optimizer's own ``step`` then skips these parameters: their gradient is None by then. The result is the
unfused optimizer's, for optimizers that treat each parameter on its own (:data:`FUSABLE`).

What cannot work with it, because no gradient outlives its own step: anything that reads several gradients
before a step (clipping by the global norm, gradient accumulation over batches, a GradScaler's unscale and inf
check) and optimizers that couple parameters (LBFGS).

Token-embedding tables (``nn.Embedding``) get a row-sparse gradient (``sparse=True``) while the step is plain
SGD (no momentum, no weight decay): the gradient is zero on every row the batch does not read, so stepping the
read rows only is the same update, without a dense gradient the size of the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

# Optimizers whose step treats every parameter on its own: stepping them one at a time is the same update.
FUSABLE: tuple[type[Optimizer], ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def check_fusable(optimizer: Optimizer, option: str = "fused_client_update") -> None:
    """Refuse an optimizer whose step is not a per-parameter one, naming the option and the valid classes."""
    if type(optimizer) not in FUSABLE:
        raise ValueError(
            f"{option}=True is not valid with optimizer {type(optimizer).__name__}: it steps each parameter alone "
            f"inside the backward pass, which needs an optimizer that treats parameters independently; use one of "
            f"{', '.join('torch.optim.' + cls.__name__ for cls in FUSABLE)}, or {option}=False")


def row_sparse_gradient(gradient: Tensor) -> Tensor:
    """An embedding's sparse gradient (one row per token read) as one row per table row read, each summed in token
    order as the dense gradient's rows are (``index_add_``): the same numbers, bit for bit, where ``coalesce``'s
    summation order differs in the last place."""
    rows, inverse = torch.unique(gradient._indices()[0], return_inverse=True)
    values = gradient._values()
    sums = values.new_zeros((len(rows), *values.shape[1:])).index_add_(0, inverse, values)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), sums, gradient.shape, is_coalesced=True)


class FusedUpdate:
    """Step ``params`` with ``optimizer``'s update inside the backward pass, freeing each gradient at once.

    ``attach`` installs the hooks (and row-sparse embedding gradients); ``detach`` removes them and restores the
    embeddings' ``sparse`` flags. Every parameter must be in ``optimizer``.
    """

    def __init__(self, optimizer: Optimizer, params: Iterable[nn.Parameter], embeddings: Iterable[nn.Embedding] = ()):
        check_fusable(optimizer)
        self.optimizer = optimizer
        groups = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.params = [p for p in params if p.requires_grad]
        missing = [tuple(p.shape) for p in self.params if id(p) not in groups]
        if missing:
            raise ValueError(f"the fused update steps parameters its optimizer does not hold (shapes {missing[:3]}): "
                             "build the optimizer over every trainable client parameter")
        self._group = {id(p): groups[id(p)] for p in self.params}
        self._single = {id(p): type(optimizer)([p]) for p in self.params}
        self._embeddings = [e for e in embeddings if type(e) is nn.Embedding and e.weight.requires_grad
                            and id(e.weight) in self._group]
        self._handles: list[RemovableHandle] = []
        self._sparse_flags: list[bool] = []
        self.steps = 0  # parameters stepped since attach (a test reads it)

    def group_of(self, param: Tensor) -> dict[str, Any]:
        """The optimizer's group of ``param`` now (``load_state_dict`` replaces the group dicts)."""
        return self.optimizer.param_groups[self._group[id(param)]]

    def row_sparse(self, param: Tensor) -> bool:
        """Whether a row-sparse gradient gives ``param`` the same step: plain SGD, nothing that reads other rows."""
        group = self.group_of(param)
        return (type(self.optimizer) is torch.optim.SGD and group["momentum"] == 0 and group["weight_decay"] == 0
                and not group.get("fused"))

    def attach(self) -> FusedUpdate:
        if self._handles:
            return self
        for param in self.params:
            self._handles.append(param.register_post_accumulate_grad_hook(self._step))
        self._sparse_flags = [e.sparse for e in self._embeddings]
        for embedding in self._embeddings:
            self._handles.append(embedding.register_forward_pre_hook(self._choose_gradient))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for embedding, flag in zip(self._embeddings, self._sparse_flags):
            embedding.sparse = flag

    def _choose_gradient(self, embedding: nn.Module, args: Any) -> None:
        """Before each forward: a row-sparse gradient only when the step it feeds is the same with it."""
        embedding.sparse = self.row_sparse(embedding.weight)

    def _step(self, param: Tensor) -> None:
        if param.grad is None:
            return
        single = self._single[id(param)]
        single.state = self.optimizer.state  # one state, the optimizer's: checkpointed and restored with it
        single.param_groups[0].update({k: v for k, v in self.group_of(param).items() if k != "params"})
        if param.grad.is_sparse:  # dense again if the step changed since the forward
            param.grad = row_sparse_gradient(param.grad) if self.row_sparse(param) else param.grad.to_dense()
        single.step()
        param.grad = None
        self.steps += 1
