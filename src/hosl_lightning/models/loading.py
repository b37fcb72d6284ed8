"""Loading a whole causal LM: from a hub id, a local directory, a GGUF file or an alias; an instance; or a config.

Inside :func:`~hosl_lightning.models.partial.deferred_weights` the model is only built on the meta device, so
that a process of a multi-process run can later load just its own half.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hosl_lightning.core.options import UserError, check_choice
from hosl_lightning.models.configs import check_model_type
from hosl_lightning.models.partial import ModelSource, meta_causal_lm, weights_deferred
from hosl_lightning.models.sources import DTYPES, check_model_directory, resolve_source

_loaded: dict[tuple[str, str, str | None], PreTrainedModel] | None = None  # inside loaded_once(): what was read


@contextmanager
def loaded_once() -> Iterator[None]:
    """Inside, each pretrained model (hub id, path, GGUF file or alias, with its dtype) is read once; every later
    :func:`load_causal_lm` of it gets a deep copy of what was read.

    For many fits in one process from the same weights, such as the trials of a study: reading and converting
    the files (a GGUF file is de-quantised each time) is paid once, at the cost of holding one extra copy of the
    model. Models built from a config are not cached: their random weights depend on the seed at the time.
    """
    global _loaded
    outer, _loaded = _loaded, ({} if _loaded is None else _loaded)
    try:
        yield
    finally:
        _loaded = outer


def load_causal_lm(
    model: str | PreTrainedModel | None = None,
    model_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub id, local path, GGUF file or alias; an instance; or a config dict (random weights)."""
    check_choice("dtype", dtype, DTYPES)
    if (model is None) == (model_config is None):
        raise UserError("give exactly one of model= (hub id, local path, alias or PreTrainedModel) or model_config=")
    if isinstance(model, PreTrainedModel):
        check_model_type(model.config.model_type, f"of the {type(model).__name__} given as model=")
        return model
    if model_config is not None:
        if "model_type" not in model_config:
            raise UserError("model_config needs a 'model_type' key (e.g. 'llama', 'gpt2', 'opt', 'gpt_neox')")
        check_model_type(model_config["model_type"], "in model_config")
    if weights_deferred():
        return meta_causal_lm(ModelSource(model, model_config, dtype, gguf_file))
    if model_config is not None:
        config = dict(model_config)
        model_type = config.pop("model_type")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=DTYPES[dtype])
    assert model is not None
    key = (model, dtype, gguf_file)
    if _loaded is not None and key in _loaded:
        return copy.deepcopy(_loaded[key])
    loaded = _read_pretrained(model, dtype, gguf_file)
    if _loaded is not None:
        _loaded[key] = copy.deepcopy(loaded)  # the copy handed out trains; the cached one stays as read
    return loaded


def _read_pretrained(model: str, dtype: str, gguf_file: str | None) -> PreTrainedModel:
    source, gguf = resolve_source(model, gguf_file)
    check_model_directory(source, gguf)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(source, **kwargs)  # the family is checked before any weight is read
    check_model_type(config.model_type, f"of model={model!r}")
    return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=DTYPES[dtype], **kwargs)
