"""What a model's config must say for this package, read before any weight is: its family, its position limit.

Every run splits the model, so a model of a family that :mod:`hosl_lightning.core.split` cannot cut (a T5
encoder-decoder, or a causal LM whose blocks it does not know) is refused when it is loaded, not after the
weights are read; and a ``max_length`` past the model's positions is refused before training, instead of an
``IndexError`` inside ``torch.embedding`` at the first long batch.
"""

from __future__ import annotations

from typing import Any

from hosl_lightning.core.split import SUPPORTED_FAMILIES


def check_model_type(model_type: object, origin: str) -> None:
    """``model_type`` must name a family that can be split; ``origin`` says where it came from (the option)."""
    if model_type in SUPPORTED_FAMILIES:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = "a causal LM family that cannot be split yet" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else (
        "not a causal LM")
    families = ", ".join(map(repr, sorted(SUPPORTED_FAMILIES)))
    raise ValueError(f"model_type={model_type!r} ({origin}) is not valid: {kind}; supported families: {families}")


def position_limit(config: Any) -> int | None:
    """The most positions the model takes (``max_position_embeddings`` or ``n_positions``), or None if unsaid."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(text, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return None
