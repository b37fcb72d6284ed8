"""The search space checked against the config and the model before a study starts, so no trial fails on a value
that could never work.

Every choice and both ends of every range are parsed against the fit config (keys and types, by jsonargparse),
go through ``HOSLStrategy``'s own option checks, and a ``cut_layer`` is checked against the model's number of
decoder blocks, read from its structure on the meta device (no weights are loaded).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

from hosl_lightning.core.options import UserError
from hosl_lightning.tuning.batches import subset_length
from hosl_lightning.tuning.space import Parameter

CUT_LAYER_KEY = "trainer.strategy.init_args.cut_layer"
MODEL_KEYS = ("model", "model_config", "dtype", "gguf_file")  # the HOSLModule options that say which model


def extremes(parameter: Parameter) -> list[Any]:
    """The values a check must try: every choice, or a range's lowest and highest reachable values."""
    if parameter.choices is not None:
        return list(parameter.choices)
    assert parameter.low is not None and parameter.high is not None
    if parameter.step is None or parameter.log:
        return [parameter.low, parameter.high]
    top = parameter.low + math.floor(round((parameter.high - parameter.low) / parameter.step, 9)) * parameter.step
    is_int = isinstance(parameter.low, int) and isinstance(parameter.high, int) and not isinstance(parameter.step, float)
    return [parameter.low, int(top) if is_int else top]


def check_points(parameters: list[Parameter]) -> list[dict[str, Any]]:
    """A few points of the space that between them hold every value of :func:`extremes` of every parameter."""
    values = {p.key: extremes(p) for p in parameters}
    count = max(len(v) for v in values.values())
    return [{key: options[i % len(options)] for key, options in values.items()} for i in range(count)]


def check_space(parameters: list[Parameter], parse: Callable[[dict[str, Any]], Any]) -> None:
    """Fail before any trial on a value of the space that the config, the strategy or the model cannot take.

    ``parse`` turns a point (config key -> value) into the parsed config of a trial with those overrides, without
    building anything; it raises on a key or a type the config does not accept.
    """
    blocks: dict[str, tuple[int, str]] = {}  # the model options (as text) -> (decoder blocks, model type)
    searched = {p.key for p in parameters}
    for point in check_points(parameters):
        config = parse(point)
        strategy = _strategy_class(config)
        if strategy is None:
            continue
        options = config.trainer.strategy.init_args.as_dict()
        try:
            strategy(**options)  # the strategy's own checks: they name the option, the value and the valid ones
        except (TypeError, ValueError) as error:
            shown = ", ".join(f"{key}={value!r}" for key, value in point.items())
            raise UserError(f"the search space's point ({shown}) is refused by {strategy.__name__}: {error}") from None
        model = {name: getattr(config.model, name, None) for name in MODEL_KEYS}
        if str(model) not in blocks:
            blocks[str(model)] = _decoder_blocks(model)
        n, model_type = blocks[str(model)]
        cut = options.get("cut_layer")
        if isinstance(cut, int) and not 0 <= cut <= n:
            where = (f"search space entry {CUT_LAYER_KEY!r}: the value {cut}" if CUT_LAYER_KEY in searched
                     else f"{CUT_LAYER_KEY}={cut} (from the fit config or the overrides)")
            raise UserError(f"{where} is out of range for this {model_type} model with {n} decoder blocks: "
                             f"cut_layer must be an integer in [0, {n}]")


def check_subset_epochs(config: Any, method: str, fraction: float) -> None:
    """Fail before any trial when the trials' subset makes a trainer option invalid: a trial's epoch is ``fraction``
    of the training batches, and an integer ``val_check_interval`` above that many fails every trial in Lightning
    (it validates within an epoch unless ``check_val_every_n_epoch`` is None). Builds the config's DataModule."""
    trainer = config.trainer
    interval = getattr(trainer, "val_check_interval", None)
    if not isinstance(interval, int) or isinstance(interval, bool) or getattr(trainer, "check_val_every_n_epoch", 1) is None:
        return
    data = getattr(config, "data", None)
    if getattr(data, "class_path", None) is None:
        return
    module, _, name = data.class_path.rpartition(".")
    init_args = data.init_args.as_dict() if getattr(data, "init_args", None) is not None else {}
    datamodule = getattr(importlib.import_module(module), name)(**init_args)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batch_size = getattr(loader, "batch_size", None)
    if not batch_size:
        return
    candidates = math.ceil(len(loader.dataset) / batch_size)
    batches = candidates if method == "full" else subset_length(fraction, candidates)
    if interval > batches:
        raise UserError(
            f"trainer.val_check_interval={interval} is not valid for tune: a trial trains on the subset "
            f"(subset={method!r}, fraction={fraction}) of {batches} batches an epoch, of {candidates} training batches "
            f"of {batch_size}, and Lightning validates within an epoch; set val_check_interval <= {batches} (or a "
            "float: 1.0 validates once an epoch), or trainer.check_val_every_n_epoch=null to count steps across epochs")


def _strategy_class(config: Any) -> type | None:
    """The config's strategy class when it is a ``HOSLStrategy`` given by class path (a name has no options here)."""
    from hosl_lightning.lightning.strategy import HOSLStrategy

    strategy = getattr(config.trainer, "strategy", None)
    class_path = getattr(strategy, "class_path", None)
    if not isinstance(class_path, str) or getattr(strategy, "init_args", None) is None:
        return None
    module, _, name = class_path.rpartition(".")
    found = getattr(importlib.import_module(module), name, None)
    return found if isinstance(found, type) and issubclass(found, HOSLStrategy) else None


def _decoder_blocks(model: dict[str, Any]) -> tuple[int, str]:
    """The model's number of decoder blocks and its type, from its structure on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hosl_lightning.core.split import num_blocks
    from hosl_lightning.models import deferred_weights, load_causal_lm, resolve_source

    source, gguf = (None, None) if model["model"] is None else resolve_source(model["model"], model["gguf_file"])
    if gguf:  # a GGUF file cannot be deferred (transformers loads it whole), but its config reads alone
        config = AutoConfig.from_pretrained(source, gguf_file=gguf)
        with torch.device("meta"):
            structure = AutoModelForCausalLM.from_config(config)
    else:
        with deferred_weights():
            structure = load_causal_lm(model["model"], model["model_config"], model["dtype"] or "float32",
                                       model["gguf_file"])
    return num_blocks(structure), structure.config.model_type
