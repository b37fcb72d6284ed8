"""Precision and dtype checks of a split run: what would break zeroth-order updates, a fused client update or a
distributed run is refused before anything loads (the plugin) or trains (the weights' dtype)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

from hosl_lightning.modes import MODES


def check_precision(plugin: Precision, mode: str, transport: str, fused_client_update: bool = False,
                    estimator: str = "two_point") -> None:
    """Refuse precisions that would break zeroth-order updates, a fused update or a distributed run, before
    anything loads."""
    if fused_client_update and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            f"precision={plugin.precision!r} uses a GradScaler, which unscales and checks the gradients after the "
            "backward pass, but fused_client_update=True has stepped and freed the client's by then: use precision "
            "'32-true' or 'bf16-mixed', or fused_client_update=False"
        )
    if transport == "distributed" and plugin.precision != "32-true":
        raise ValueError(
            f"precision={plugin.precision!r}: a distributed run computes in float32 on both sides (the server "
            "has no precision plugin), so use precision '32-true' or transport='in_process'"
        )
    if MODES[mode].zo_halves and isinstance(plugin, HalfPrecision):
        raise ValueError(
            f"precision={plugin.precision!r} stores weights in half precision, but mode={mode!r} updates "
            "client weights by zeroth-order steps, which need float32: use precision '32-true' or 'bf16-mixed'"
        )
    if mode == "zo" and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            "precision='16-mixed' uses a GradScaler, which must never touch zeroth-order updates, and "
            "mode='zo' trains only by them: use precision '32-true' or 'bf16-mixed'"
        )
    if estimator == "forward" and isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        raise ValueError(
            "precision='16-mixed' scales the server's loss by its GradScaler, so the dL/dh that zo_optimizer "
            "'forward_gradient' turns into the client's coefficients would be scaled too: use precision '32-true' or "
            "'bf16-mixed'"
        )


def check_zo_dtype(named: list[tuple[str, Any]], mode: str, dtype: str | None) -> None:
    """Weights loaded in reduced precision are refused for the ZO side naming ``dtype``, their cause (the precision
    plugin is checked apart, by :func:`check_precision`, before anything loads)."""
    reduced = next(((name, p) for name, p in named if p.is_floating_point() and p.element_size() < 4), None)
    if reduced is None:
        return
    name, param = reduced
    named_dtype = str(param.dtype) == f"torch.{dtype}"  # the module's dtype option is the cause
    cause = f"dtype={dtype!r} loads the model's weights" if named_dtype else "the model's weights are"
    fix = ("use dtype='float32' (the default)" if named_dtype else
           "load the model in float32 (from_pretrained(..., dtype=torch.float32))")
    raise ValueError(f"{cause} in {param.dtype} (e.g. {name!r}), but mode={mode!r} updates them by zeroth-order "
                     f"steps, which vanish or drift in reduced precision: {fix}, or use mode='fo'; for speed, "
                     "precision='bf16-mixed' computes in bfloat16 over float32 weights")
