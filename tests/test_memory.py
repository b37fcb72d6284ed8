"""The product's claim, measured: a hosl client holds less memory than an fo client at the same cut."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.measurement import measure_client_inference, measure_client_step
from hosl_lightning.modes import ZOSettings


def _split(cut: int) -> SplitCausalLM:
    torch.manual_seed(0)
    config = dict(TINY_LLAMA, hidden_size=64, intermediate_size=256, num_hidden_layers=4)
    return SplitCausalLM(load_causal_lm(model_config=config), cut)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (16, 64), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("cut", [1, 3])
def test_hosl_client_peak_is_below_fo_and_holds_no_gradients_or_optimizer_state(cut: int) -> None:
    fo = measure_client_step(_split(cut), _batch(), "fo")
    model = _split(cut)
    hosl = measure_client_step(model, _batch(), "hosl", ZOSettings(queries=2))
    floor = measure_client_inference(_split(cut), _batch())

    assert hosl.peak < fo.peak, (hosl, fo)
    assert hosl.grads == 0 and hosl.optimizer_state == 0
    assert all(p.grad is None for p in model.client.parameters())
    assert fo.optimizer_state > 0  # AdamW's two moments for every client parameter
    assert fo.grads == sum(p.numel() * p.element_size() for p in model.client.parameters())  # kept between steps
    assert hosl.params == fo.params == floor.params  # the same client weights are counted on every path
    assert floor.peak <= hosl.peak <= 1.25 * floor.peak  # probes are sent as they come: no 2Q activations kept
