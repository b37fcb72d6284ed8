"""Models for split learning: loading a whole causal LM, loading only one half of it, and per-side adapters.

- :mod:`~hosl_lightning.models.sources`: where a model's files are (hub id, directory, GGUF file, alias).
- :mod:`~hosl_lightning.models.configs`: what its config must say (a family that splits; its position limit).
- :mod:`~hosl_lightning.models.loading`: :func:`load_causal_lm`, the one entry point for a whole model.
- :mod:`~hosl_lightning.models.partial`: meta-device building and loading one half's weights only.
- :mod:`~hosl_lightning.models.adapters`: peft adapters on the client's blocks, the server's, or both.
"""

from hosl_lightning.models.adapters import (
    AdapterSpec,
    adapter_config,
    add_adapters,
    block_module_names,
    load_adapters,
    merged_model,
    save_adapters,
    untied_head_trainable,
)
from hosl_lightning.models.configs import check_model_type, position_limit
from hosl_lightning.models.loading import load_causal_lm, loaded_once
from hosl_lightning.models.partial import (
    ModelSource,
    deferred_weights,
    export_model,
    materialize_half,
    meta_causal_lm,
    weights_deferred,
)
from hosl_lightning.models.sources import DTYPES, MODEL_ALIASES, PackagedModel, resolve_source

__all__ = [
    "DTYPES",
    "MODEL_ALIASES",
    "AdapterSpec",
    "ModelSource",
    "PackagedModel",
    "adapter_config",
    "add_adapters",
    "block_module_names",
    "check_model_type",
    "deferred_weights",
    "export_model",
    "load_adapters",
    "load_causal_lm",
    "loaded_once",
    "materialize_half",
    "merged_model",
    "meta_causal_lm",
    "position_limit",
    "resolve_source",
    "save_adapters",
    "untied_head_trainable",
    "weights_deferred",
]
