"""Forward hooks that make each module read stand-ins for its zeroth-order parameters, one forward call at a time.

Probes (:mod:`hosl_lightning.core.perturbation`: ``w + scale * u``) and tangents
(:mod:`hosl_lightning.core.tangents`: the dual ``(w, u)``) both need the same thing: while a module that owns ZO
parameters runs its own forward, it reads a stand-in built for each of them, and the stored weights are never
written. Only one tensor-sized stand-in per parameter exists at a time, and a module that reads another module's
weight directly escapes the hooks, which :func:`check_reached` turns into an error instead of a silent miss. The ZO
parameters are those of a :class:`~hosl_lightning.core.directions.ParameterDirections` (an optimizer's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from hosl_lightning.core.directions import ParameterDirections

EmbeddingHook = Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor]  # (embedding, args, output) -> new output


def is_plain_embedding(module: nn.Module) -> bool:
    """An embedding whose output is exactly ``weight[ids]``, so perturbing rows equals perturbing the table.

    Subclasses that scale or offset inside ``forward`` (OPT's learned positions, Gemma's scaled embedding)
    and ``max_norm`` (which renormalises the looked-up rows) take the general path instead.
    """
    return type(module).forward is nn.Embedding.forward and isinstance(module, nn.Embedding) and module.max_norm is None


def owners(directions: ParameterDirections, modules: Sequence[nn.Module]) -> Iterator[nn.Module]:
    for root in modules:
        for module in root.modules():
            if any(p is not None and id(p) in directions.keys for p in module._parameters.values()):
                yield module


def check_reached(directions: ParameterDirections, modules: Sequence[nn.Module], reached: set[int], half: bool) -> None:
    in_scope = {id(p) for root in modules for p in root.parameters()} if half else directions.keys
    missing = [directions.names[key] for key in directions.keys if key in in_scope and key not in reached]
    if missing:
        raise RuntimeError(
            f"{len(missing)} zeroth-order parameter(s) were not used by any module's forward during a probe (or a "
            f"tangent forward), so perturbing them is impossible: {missing[:5]}. Parameters must be read by the module that "
            "owns them (a module reading another module's .weight directly escapes the perturbation)."
        )


@contextmanager
def substituted_parameters(directions: ParameterDirections, modules: Sequence[nn.Module],
                           substitute: Callable[[nn.Parameter], Tensor], embedding_hook: EmbeddingHook,
                           half: bool = False) -> Iterator[None]:
    """Forwards of ``modules`` in which each module owning ZO parameters reads ``substitute(param)`` for them.

    A substitute is built when the first module reading its parameter starts its forward and dropped when the last
    one ends (a weight shared by two modules is one substitute). A plain token embedding keeps its table instead:
    ``embedding_hook`` rewrites its output, so that only the rows looked up need drawing. On a clean exit, every ZO
    parameter in scope (all of ``directions``', or with ``half`` only those of ``modules``) must have been read.
    """
    swapped: dict[tuple[int, str], tuple[nn.Module, str, nn.Parameter]] = {}
    substitutes: dict[int, Tensor] = {}  # one per parameter, shared by every module reading it
    reached: set[int] = set()

    def swap_in(module: nn.Module, _args: Any) -> None:
        for name, param in list(module._parameters.items()):
            if param is None or id(param) not in directions.keys or (id(module), name) in swapped:
                continue
            if id(param) not in substitutes:
                substitutes[id(param)] = substitute(param)
            module._parameters[name] = substitutes[id(param)]  # type: ignore[assignment]
            swapped[(id(module), name)] = (module, name, param)
            reached.add(id(param))

    def swap_out(module: nn.Module, _args: Any, _output: Any) -> None:
        for key, (owner, name, param) in list(swapped.items()):
            if owner is module:
                owner._parameters[name] = param
                del swapped[key]
                if not any(p is param for _, _, p in swapped.values()):
                    substitutes.pop(id(param), None)

    def embedding_rows(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        reached.add(id(module.weight))
        return embedding_hook(module, args, output)

    handles = []
    for module in owners(directions, modules):
        if is_plain_embedding(module) and id(module.weight) in directions.keys:
            handles.append(module.register_forward_hook(embedding_rows))
        else:
            handles.append(module.register_forward_pre_hook(swap_in))
            handles.append(module.register_forward_hook(swap_out))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, param in swapped.values():
            owner._parameters[name] = param
        substitutes.clear()
    check_reached(directions, modules, reached, half)
