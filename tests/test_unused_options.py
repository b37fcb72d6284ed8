"""An option the chosen mode or zo_optimizer does not read is refused when the user sets it, never ignored.

Each mode declares the options it reads (``Mode.options``) and each zo_optimizer its own
(``ZOSGD.strategy_options``); left unset (None), every option stands for its default in every mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hosl_lightning import HOSLStrategy
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.lightning.option_use import UNSET
from hosl_lightning.modes import MODES, ZO_OPTIONS
from hosl_lightning.zo_optimizers import ZO_OPTIMIZERS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A value of each option that its own check accepts (so that only the applicability check can refuse it).
SET = {"q": 2, "mu": 1e-3, "zo_lr": 1e-6, "zo_weight_decay": 0.0, "zo_lr_schedule": "constant",
       "zo_optimizer": "zo_sgd", "embedding_directions": "dense", "pair_probes": False, "direction": "gaussian",
       "seed": 0, "server_grad": "perturbed", "batch_probes": True}


@pytest.mark.parametrize(("mode", "option"), [("fo", name) for name in (*ZO_OPTIONS, "server_grad", "batch_probes")]
                         + [("zo", "server_grad"), ("zo", "batch_probes")])
def test_an_option_the_mode_does_not_use_is_refused_naming_both(mode: str, option: str) -> None:
    users = ", ".join(repr(m.name) for m in MODES.values() if option in m.options)
    with pytest.raises(ValueError, match=(rf"^{option}={SET[option]!r} is not valid with mode='{mode}', which does not "
                                          rf"use it: remove {option}, or choose a mode that uses it \({users}\)$")):
        HOSLStrategy(mode=mode, **{option: SET[option]})


def test_pair_probes_is_refused_with_fzoo_which_has_no_pairs() -> None:
    with pytest.raises(ValueError, match=r"^pair_probes=True is not valid with zo_optimizer 'fzoo', which does not use "
                                         r"it: remove pair_probes, or choose a zo_optimizer that uses it "
                                         r"\('zo_sgd', 'zo_momentum'\)$"):
        HOSLStrategy(q=2, zo_optimizer="fzoo", pair_probes=True)
    HOSLStrategy(q=2, zo_optimizer="fzoo")  # unset: fine


@pytest.mark.parametrize("mode", ["hosl", "zo"])
def test_the_options_a_mode_uses_are_taken(mode: str) -> None:
    options = {name: SET[name] for name in MODES[mode].options}
    strategy = HOSLStrategy(mode=mode, **options)
    assert (strategy.settings.queries, strategy.zo_lr, strategy.seed) == (2, 1e-6, 0)


@pytest.mark.parametrize("mode", list(MODES))
def test_unset_options_stand_for_their_defaults_in_every_mode(mode: str) -> None:
    strategy = HOSLStrategy(mode=mode)
    assert strategy.settings.queries == UNSET["q"] and strategy.settings.mu == UNSET["mu"]
    assert (strategy.zo_lr, strategy.zo_weight_decay, strategy.seed, strategy.direction) == (1e-6, 0.0, 0, "gaussian")
    assert strategy.zo_optimizer == {"name": "zo_sgd"} and strategy.settings.pair_probes is False


def test_a_new_mode_or_zo_optimizer_declares_what_it_reads() -> None:
    assert set(MODES["fo"].options) == {"client_checkpointing", "fused_client_update"}  # a backprop client's memory
    assert set(MODES["frozen"].options) == set()
    assert set(MODES["zo"].options) == set(ZO_OPTIONS)
    assert set(MODES["hosl"].options) == {*ZO_OPTIONS, "server_grad", "batch_probes"}
    assert ZOSGD.strategy_options == ("mu", "server_grad", "batch_probes", "pair_probes")
    assert ZO_OPTIMIZERS["fzoo"].strategy_options == ("mu", "server_grad", "batch_probes")
    assert ZO_OPTIMIZERS["forward_gradient"].strategy_options == ()  # no probes: none of them


@pytest.mark.parametrize("name", ["quickstart", "synthetic", "synthetic-fo", "synthetic-zo"])
def test_the_shipped_configs_set_only_what_their_mode_uses(name: str) -> None:
    init_args: dict[str, Any] = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"]["strategy"]["init_args"]
    HOSLStrategy(**init_args)  # refuses an option the mode does not use


def test_the_quickstart_switches_mode_on_the_command_line() -> None:
    init_args = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["trainer"]["strategy"]["init_args"]
    for mode in MODES:
        HOSLStrategy(**{**init_args, "mode": mode})  # README: --trainer.strategy.init_args.mode=fo


def test_a_drop_in_module_refuses_pair_probes() -> None:
    strategy = HOSLStrategy(pair_probes=True)
    with pytest.raises(ValueError, match=r"^pair_probes=True is not valid with a drop-in module"):
        strategy.check_dropin()
