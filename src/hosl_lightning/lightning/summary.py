"""The model summary of a split run: Lightning's, told what HOSLStrategy trains and what it did not measure.

Lightning counts a weight as trainable when it requires a gradient. A zeroth-order side's weights never do (no
``.grad`` is ever made for them), yet they train, so they are counted as trainable here. Lightning measures FLOPs
only by running ``example_input_array``; without one it prints "Total FLOPs: 0", which is not a measurement, so
the FLOPs are then left out. The strategy swaps Lightning's own summary callback for these at setup, keeping its
options; ``enable_model_summary=False`` still turns the summary off.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    ModelSummary as LayerSummary,
)
from lightning.pytorch.utilities.model_summary.model_summary import (
    _format_summary_table,
    get_formatted_model_size,
    get_human_readable_count,
)

log = logging.getLogger(__name__)


def zo_trained(param: Any) -> bool:
    """Whether a weight trains by zeroth-order steps (marked at the cut: see :mod:`.cut`)."""
    return bool(getattr(param, "_hosl_zo", False))


class SplitLayerSummary(LayerSummary):
    """Lightning's layer summary, with the zeroth-order side's weights counted as trainable."""

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._model.parameters() if p.requires_grad or zo_trained(p))

    @property
    def zo_parameters(self) -> int:
        return sum(p.numel() for p in self._model.parameters() if zo_trained(p))


class _SplitSummaryCallback(ModelSummary):
    def _summary(self, trainer: Any, pl_module: Any) -> SplitLayerSummary:
        return SplitLayerSummary(pl_module, max_depth=self._max_depth)


def _without_flops(summary_data: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    return [column for column in summary_data if column[0] != "FLOPs"]


class SplitModelSummary(_SplitSummaryCallback):
    """:class:`~lightning.pytorch.callbacks.ModelSummary` for a split run (see the module docstring)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        if total_flops:  # measured on the module's example_input_array
            ModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                   total_training_modes, total_flops, **kwargs)
            return
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes, 0,
                                      *_without_flops(summary_data))
        log.info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))


class RichSplitModelSummary(_SplitSummaryCallback, RichModelSummary):
    """:class:`~lightning.pytorch.callbacks.RichModelSummary` for a split run (see the module docstring)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        if total_flops:
            RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **kwargs)
            return
        from rich import get_console
        from rich.table import Table

        data = _without_flops(summary_data)
        table = Table(header_style=kwargs.get("header_style", "bold magenta"))
        for name, _ in data:  # as Lightning lays them out: numbers to the right
            table.add_column(name, justify="left" if name in (" ", "Name", "Type", "Mode") else "right",
                             style="dim" if name == " " else None)
        for row in zip(*(values for _, values in data), strict=True):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in (("Trainable params", get_human_readable_count(trainable_parameters)),
                             ("Non-trainable params", get_human_readable_count(total_parameters - trainable_parameters)),
                             ("Total params", get_human_readable_count(total_parameters)),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", str(total_training_modes["train"])),
                             ("Modules in eval mode", str(total_training_modes["eval"]))):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)


_SPLIT_SUMMARIES: dict[type, type] = {ModelSummary: SplitModelSummary, RichModelSummary: RichSplitModelSummary}


def use_split_summaries(callbacks: list[Callback]) -> None:
    """Swap Lightning's own summary callbacks in ``callbacks`` (in place) for the split run's, keeping their options."""
    for index, callback in enumerate(callbacks):
        split = _SPLIT_SUMMARIES.get(type(callback))
        if split is not None:
            replacement = split.__new__(split)
            replacement.__dict__.update(callback.__dict__)
            callbacks[index] = replacement
