"""hosl-lightning: hybrid-order split learning (zeroth-order client, first-order server) for Hugging Face causal LMs.

Importing the package registers ``HOSLStrategy`` in Lightning's strategy registry as ``"hosl"``.
"""

from hosl_lightning.boundary import InProcessBoundary, TrafficCounter
from hosl_lightning.data import SyntheticLMDataModule
from hosl_lightning.datamodules import PromptClassificationDataModule, TextLMDataModule, resolve_tokenizer
from hosl_lightning.model import SplitCausalLM
from hosl_lightning.models import load_causal_lm
from hosl_lightning.module import HOSLModule
from hosl_lightning.split import CutActivations, split_causal_lm
from hosl_lightning.strategy import HOSLStrategy
from hosl_lightning.tasks import TASKS, get_task
from hosl_lightning.zo import ZOSGD, DirectionSampler, ZOEstimate, two_point_estimate

__version__ = "0.1.0"

__all__ = [
    "CutActivations",
    "DirectionSampler",
    "HOSLModule",
    "HOSLStrategy",
    "InProcessBoundary",
    "PromptClassificationDataModule",
    "SplitCausalLM",
    "SyntheticLMDataModule",
    "TASKS",
    "TextLMDataModule",
    "TrafficCounter",
    "ZOEstimate",
    "ZOSGD",
    "get_task",
    "load_causal_lm",
    "resolve_tokenizer",
    "split_causal_lm",
    "two_point_estimate",
]
