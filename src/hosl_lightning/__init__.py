"""hosl-lightning: hybrid-order split learning (zeroth-order client, first-order server) for Hugging Face causal LMs.

Importing the package registers ``HOSLStrategy`` in Lightning's strategy registry as ``"hosl"``. The other
public names load on first use (PEP 562), so a process imports only what its role needs: an edge client
that never touches the data tooling never pays for it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hosl_lightning.lightning.strategy import HOSLStrategy

__version__ = "0.2.0"  # the single source: pyproject reads it (tool.setuptools.dynamic)

_LAZY = {
    "CutActivations": "hosl_lightning.core.split",
    "split_causal_lm": "hosl_lightning.core.split",
    "SplitCausalLM": "hosl_lightning.core.split_model",
    "InProcessBoundary": "hosl_lightning.core.boundary",
    "TrafficCounter": "hosl_lightning.core.boundary",
    "DirectionSampler": "hosl_lightning.core.zo",
    "ZOEstimate": "hosl_lightning.core.zo",
    "ZOSGD": "hosl_lightning.core.zo",
    "two_point_estimate": "hosl_lightning.core.zo",
    "HOSLModule": "hosl_lightning.lightning.module",
    "load_causal_lm": "hosl_lightning.models",
    "PromptClassificationDataModule": "hosl_lightning.data",
    "SyntheticLMDataModule": "hosl_lightning.data",
    "TextLMDataModule": "hosl_lightning.data",
    "resolve_tokenizer": "hosl_lightning.data",
    "TASKS": "hosl_lightning.data",
    "get_task": "hosl_lightning.data",
}

if TYPE_CHECKING:
    from hosl_lightning.core.boundary import InProcessBoundary, TrafficCounter
    from hosl_lightning.core.split import CutActivations, split_causal_lm
    from hosl_lightning.core.split_model import SplitCausalLM
    from hosl_lightning.core.zo import (
        ZOSGD,
        DirectionSampler,
        ZOEstimate,
        two_point_estimate,
    )
    from hosl_lightning.data import (
        TASKS,
        PromptClassificationDataModule,
        SyntheticLMDataModule,
        TextLMDataModule,
        get_task,
        resolve_tokenizer,
    )
    from hosl_lightning.lightning.module import HOSLModule
    from hosl_lightning.models import load_causal_lm


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hosl_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "TASKS",
    "ZOSGD",
    "CutActivations",
    "DirectionSampler",
    "HOSLModule",
    "HOSLStrategy",
    "InProcessBoundary",
    "PromptClassificationDataModule",
    "SplitCausalLM",
    "SyntheticLMDataModule",
    "TextLMDataModule",
    "TrafficCounter",
    "ZOEstimate",
    "get_task",
    "load_causal_lm",
    "resolve_tokenizer",
    "split_causal_lm",
    "two_point_estimate",
]
