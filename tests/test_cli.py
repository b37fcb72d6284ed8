"""The hosl-lightning command: configs run, --print_config round-trips, bad values fail before training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hosl_lightning.cli import build_cli, main
from hosl_lightning.core.options import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.init_args.train_size=64"]


@pytest.mark.parametrize("name", ["synthetic", "synthetic-fo", "synthetic-zo"])
def test_each_mode_config_fits(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *FAST])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["mode"] == {"synthetic": "hosl"}.get(name, name.split("-")[-1])


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "synthetic.yaml"), "--print_config"])
    first = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(printed), "--print_config"])
    assert capsys.readouterr().out == first
    assert yaml.safe_load(first)["trainer"]["strategy"]["class_path"] == "hosl_lightning.HOSLStrategy"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--trainer.strategy.init_args.mode=hsol", "Expected a typing.Literal['hosl', 'fo', 'zo', 'frozen']. Got value: hsol"),
        ("--trainer.strategy.init_args.q=0", "q=0 is not valid"),
        ("--trainer.strategy.init_args.mu=0", "mu=0"),
        ("--trainer.strategy.init_args.direction=uniform", "direction='uniform' is not valid"),
    ],
)
def test_invalid_values_fail_before_training(override: str, message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hosl_lightning.cli", "fit", "--config", str(CONFIGS / "synthetic.yaml"), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Epoch 0" not in result.stderr + result.stdout  # it never started training


def test_validate_scores_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["validate", "--config", str(CONFIGS / "synthetic.yaml"), "--trainer.limit_val_batches=2",
                     "--trainer.enable_progress_bar=false"])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 0
    assert float(metrics["val_ppl"]) == pytest.approx(float(metrics["val_loss"].exp()), rel=1e-5)
    assert float(metrics["val_loss"]) > 4.0  # an untrained 128-token model is near log(128) = 4.85


def test_the_command_line_runs_without_lightnings_args_warning() -> None:
    """The CLI lets LightningCLI read sys.argv itself; passing it as args too printed a warning on every run."""
    result = subprocess.run([sys.executable, "-m", "hosl_lightning.cli", "fit", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "not recommended" not in result.stderr + result.stdout


@pytest.mark.parametrize("override", ["--trainer.strategy.init_args.mode=hsol", "--trainer.strategy.init_args.q=0",
                                      "--trainer.strategy.init_args.mode=fo", "--model.model=./no/such/dir",
                                      "--trainer.strategy.init_args.cut_layer=9"])
def test_every_refused_option_reports_in_one_style(override: str, tmp_path: Path) -> None:
    """A value jsonargparse refuses, one a constructor refuses and one found once the model is there (cut_layer=9
    of 4 blocks, a traceback before) all print one line, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "hosl_lightning.cli", "fit", "--config", str(CONFIGS / "synthetic.yaml"), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-1500:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hosl-lightning fit: error: "), result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def _refusal(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line in this process; the one line it printed for a user error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hosl-lightning ")]
    assert len(lines) == 1, lines
    return lines[0]


FIT = ["fit", "--config", str(CONFIGS / "synthetic.yaml"), "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--trainer.strategy.init_args.cut_layer=-1", "cut_layer=-1 is not valid: it must be an integer >= 0"),
        ("--trainer.strategy.init_args.cut_layer=9",
         "cut_layer=9 is out of range for this llama model with 4 decoder blocks: choose an integer in [0, 4]"),
        ("--trainer.strategy.init_args.mu=inf", "mu=inf is not valid: it must be a number > 0 and finite"),
        ("--trainer.strategy.init_args.mu=1e999", "mu=inf is not valid: it must be a number > 0 and finite"),
        ("--trainer.strategy.init_args.zo_lr=-Infinity", "zo_lr=-inf is not valid: it must be a number >= 0 and finite"),
        ("--trainer.accumulate_grad_batches=2", ("trainer.accumulate_grad_batches=2 is not valid: HOSLModule steps its "
                                                 "optimizers itself (manual optimization), which Lightning cannot "
                                                 "accumulate; use 1, and a larger data batch_size instead")),
        ("--trainer.max_steps=-3", "trainer.max_steps=-3 is not valid: it must be an integer >= 0, or -1 for no limit"),
        ("--model.optimizer.init_args.lr=-0.1", "model.optimizer.init_args.lr=-0.1 is not valid: it must be a number >= 0"),
        ("--model.optimizer.init_args.betas=[2,3]", ("model.optimizer.init_args.betas=(2.0, 3.0) is not valid: each beta "
                                                     "must be a number in [0, 1), e.g. [0.9, 0.999]")),
        ("--model.optimizer.init_args.betas=[0.9,1]", ("model.optimizer.init_args.betas=(0.9, 1.0) is not valid: each "
                                                       "beta must be a number in [0, 1), e.g. [0.9, 0.999]")),

        ("--model.optimizer.init_args.eps=-1e-8", "model.optimizer.init_args.eps=-1e-08 is not valid: it must be a number >= 0"),
        ("--model.optimizer.init_args.weight_decay=-0.01",
         "model.optimizer.init_args.weight_decay=-0.01 is not valid: it must be a number >= 0"),
    ],
)
def test_user_errors_found_early_or_late_read_alike(override: str, message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """cut_layer=-1 and cut_layer=9 one way; inf as 1e999; Lightning's own refusals before the model loads."""
    monkeypatch.chdir(tmp_path)
    assert _refusal([*FIT, override], capsys) == f"hosl-lightning fit: error: {message}"


@pytest.mark.parametrize("override", ["--trainer.strategy.init_args.mode=fo", "--trainer.max_steps=-3",
                                      "--model.optimizer.init_args.lr=-0.1", "--model.optimizer.init_args.betas=[2,3]"])
def test_print_config_refuses_what_fit_refuses_before_the_model_loads(override: str, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """``--print_config`` printed these configs (exit status 0), which ``fit`` then refused: mode fo over a config
    that sets q. It refuses them as ``fit`` does, and still loads no model."""
    from hosl_lightning.lightning import module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "load_causal_lm", lambda *a: pytest.fail("the model loaded"))
    refused = _refusal([*FIT, override], capsys)
    with pytest.raises(SystemExit) as exit_:
        main([*FIT, override, "--print_config"])
    printed = capsys.readouterr()
    assert exit_.value.code == 2 and printed.out == ""
    assert [line for line in printed.err.splitlines() if line.startswith("hosl-lightning ")] == [refused]


def test_the_optimizers_betas_in_the_yaml_are_refused_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """AdamW's betas out of [0, 1) ended in torch's traceback once the model had loaded and the fit started."""
    from hosl_lightning.lightning import module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "load_causal_lm", lambda *a: pytest.fail("the model loaded"))
    config = yaml.safe_load((CONFIGS / "synthetic.yaml").read_text())
    config["model"]["optimizer"]["init_args"]["betas"] = [0.9, -0.5]
    (tmp_path / "betas.yaml").write_text(yaml.safe_dump(config))
    assert _refusal(["fit", "--config", str(tmp_path / "betas.yaml")], capsys) == (
        "hosl-lightning fit: error: model.optimizer.init_args.betas=(0.9, -0.5) is not valid: each beta must be a "
        "number in [0, 1), e.g. [0.9, 0.999]")


TORCHRUN = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_a_distributed_run_started_without_torchrun_says_how_to_launch_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """It ended in a traceback (our ValueError about the rank, raised again while Lightning handled it; with a rank
    but no MASTER_ADDR, torch's once the half had loaded). Its config still prints: the check is the launch's."""
    monkeypatch.chdir(tmp_path)
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    distributed = [*FIT, "--trainer.max_steps=1", "--trainer.strategy.init_args.transport=distributed"]
    assert _refusal(distributed, capsys) == (
        "hosl-lightning fit: error: transport='distributed' needs this process's rank, the number of processes and "
        "where the processes meet, but RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set: launch every "
        "process with torchrun, which sets them (torchrun --nproc_per_node 2 --no-python hosl-lightning fit ...), or "
        "set them yourself, or give the strategy's rank, world_size and init_method='tcp://<server host>:<port>' "
        "(rank 0 is the server, 1.. the clients)")
    ranked = [*distributed, "--trainer.strategy.init_args.rank=1", "--trainer.strategy.init_args.world_size=2"]
    assert _refusal(ranked, capsys).startswith(
        "hosl-lightning fit: error: transport='distributed' needs where the processes meet, but MASTER_ADDR and "
        "MASTER_PORT are not set: launch every process with torchrun")
    with pytest.raises(SystemExit) as exit_:
        main([*distributed, "--print_config"])
    assert exit_.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["init_args"]["transport"] == "distributed"


UNUSED_Q = "q=2 is not valid with mode='fo', which does not use it: remove q, or choose a mode that uses it ('hosl', 'zo')"
UNION_NOISE = "Does not validate against any of the Union subtypes"


def _fo_config_with_q(tmp_path: Path) -> str:
    config = yaml.safe_load((CONFIGS / "synthetic-fo.yaml").read_text())
    config["trainer"]["strategy"]["init_args"]["q"] = 2
    path = tmp_path / "fo-with-q.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", str(CONFIGS / "synthetic.yaml"), "--trainer.strategy.init_args.mode=fo"], UNUSED_Q),
        (["--config", str(CONFIGS / "synthetic-fo.yaml"), "--trainer.strategy.init_args.q", "2"], UNUSED_Q),
        (["--config", "FO_WITH_Q"], UNUSED_Q),  # set in the YAML itself
        (["--config", str(CONFIGS / "synthetic.yaml"), "--trainer.strategy.init_args.zo_optimizer=fzoo",
          "--trainer.strategy.init_args.pair_probes=true"],
         ("pair_probes=True is not valid with zo_optimizer 'fzoo', which does not use it: remove pair_probes, or choose "
          "a zo_optimizer that uses it ('zo_sgd', 'zo_momentum')")),
    ],
    ids=["mode-on-the-command-line", "q-on-the-command-line", "q-in-the-yaml", "pair_probes-with-fzoo"],
)
def test_a_strategys_refusal_prints_its_own_line_not_jsonargparses_union_error(
        args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """HOSLStrategy refuses these when jsonargparse builds it, inside the Trainer's ``strategy: str | Strategy``:
    jsonargparse wraps the refusal in its union-type error, which the command line used to print around it."""
    monkeypatch.chdir(tmp_path)
    args = [_fo_config_with_q(tmp_path) if arg == "FO_WITH_Q" else arg for arg in args]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [f"hosl-lightning fit: error: {message}"]
    assert UNION_NOISE not in err and "ValueError" not in err


@pytest.mark.parametrize("where", ["command-line", "yaml"])
def test_a_misspelt_strategy_option_keeps_jsonargparses_own_error(where: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Only a constructor's own refusal replaces jsonargparse's message: an option the strategy has no parameter
    for is jsonargparse's to name."""
    if where == "yaml":
        config = yaml.safe_load((CONFIGS / "synthetic.yaml").read_text())
        config["trainer"]["strategy"]["init_args"]["qq"] = 2
        (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
        args = ["--config", str(tmp_path / "typo.yaml")]
    else:
        args = ["--config", str(CONFIGS / "synthetic.yaml"), "--trainer.strategy.init_args.qq=2"]
    line = _refusal(["fit", *args, "--print_config"], capsys)
    assert line.startswith('hosl-lightning fit: error: Parser key "trainer.strategy": ')
    assert line.endswith("Option 'qq' is not accepted")


def test_a_refusal_jsonargparse_got_past_is_not_blamed_for_another_error() -> None:
    from hosl_lightning.lightning.cli import _Refusals

    def refuse(**options: object) -> None:
        raise UserError("q=2 is not valid with mode='fo'")

    refusals = _Refusals()
    with pytest.raises(UserError):
        refusals(refuse, q=2)
    assert refusals.cause_of(ValueError("Errors:\n  - q=2 is not valid with mode='fo'\n")) is refusals.raised[0]
    assert refusals.cause_of(ValueError("Option 'qq' is not accepted")) is None


def test_a_quoted_inf_stays_text_and_the_loader_is_left_as_it_was() -> None:
    from jsonargparse._loaders_dumpers import yaml_load

    from hosl_lightning.lightning.cli import reading_non_finite

    with reading_non_finite():
        assert yaml_load("{a: inf, b: '-inf', c: nan, d: Infinity}")["a"] == float("inf")
        assert yaml_load("'inf'") == "inf"
    assert yaml_load("inf") == "inf"  # outside a parse, jsonargparse's YAML is unchanged


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from hosl_lightning import cli

    def broken(args: object) -> None:
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "build_cli", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["fit"])


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "directory"])
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_bad_checkpoint_file_is_named_before_anything_loads(kind: str, command: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from hosl_lightning.lightning import module

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 10)
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "directory":
        path.mkdir()
    monkeypatch.setattr(module, "load_causal_lm", lambda *a: pytest.fail("the model loaded before the file was checked"))
    line = _refusal([command, "--config", str(CONFIGS / "synthetic.yaml"), f"--ckpt_path={path}"], capsys)
    why = {"missing": "no such file", "directory": "a directory, not a checkpoint file"}.get(
        kind, "it cannot be read as a checkpoint (truncated, empty or not a torch file)")
    assert line.startswith(f"hosl-lightning {command}: error: ckpt_path='{path}' is not valid: {why}")


def _fit_checkpoint(tmp_path: Path, *model_args: str) -> Path:
    """Fit 2 steps of the synthetic config and keep the last checkpoint."""
    build_cli(["fit", "--config", str(CONFIGS / "synthetic.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
               "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
               f"--trainer.default_root_dir={tmp_path}", *model_args])
    return next(tmp_path.rglob("*.ckpt"))


def test_the_model_named_on_the_command_line_is_the_model_that_runs(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint's hyperparameters no longer overwrite the model the user names; one of another shape fails
    naming both models instead of silently evaluating the checkpoint's."""
    monkeypatch.chdir(tmp_path)
    ckpt = _fit_checkpoint(tmp_path)
    other = ["--model.model_config.hidden_size=32", "--model.model_config.intermediate_size=64"]
    with pytest.raises(ValueError, match=r"the checkpoint's weights do not fit this run's model: .*'hidden_size': 64.*"
                                         r"this run has .*'hidden_size': 32"):
        build_cli(["validate", "--config", str(CONFIGS / "synthetic.yaml"), *other, f"--ckpt_path={ckpt}",
                   "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])
    cli = build_cli(["validate", "--config", str(CONFIGS / "synthetic.yaml"), f"--ckpt_path={ckpt}",
                     "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])
    assert cli.model.hparams["model_config"]["hidden_size"] == 64


def test_a_moved_model_directory_is_named_by_the_user_and_works(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    source = tmp_path / "model-old"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(source)
    ckpt = _fit_checkpoint(tmp_path, "--model.model_config=null", f"--model.model={source}")
    moved = source.rename(tmp_path / "model-new")
    validate = ["validate", "--config", str(CONFIGS / "synthetic.yaml"), "--model.model_config=null", f"--ckpt_path={ckpt}",
                "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    with pytest.raises(ValueError, match=r"was saved with model='.*model-old', which does not exist here: pass "
                                         r"--model.model=<where the model is now>"):
        build_cli(validate)
    cli = build_cli([*validate, f"--model.model={moved}"])
    assert cli.trainer.state.finished and cli.model.hparams["model"] == str(moved)


def test_predict_on_language_model_data_says_what_to_use_instead(tmp_path: Path, capsys, monkeypatch) -> None:
    """It said "Trainer.predict requires forward method to run"; on classification data it predicts (test_bad_input)."""
    monkeypatch.chdir(tmp_path)
    line = _refusal(["predict", "--config", str(CONFIGS / "synthetic.yaml")], capsys)
    assert line.startswith("hosl-lightning predict: error: predict is not valid for this data: it predicts label words "
                           "of a classification DataModule (PromptClassificationDataModule); for a language model use "
                           "validate or test")


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ") and line.split()}
    assert {"fit", "validate", "test", "predict", "tune", "export"} <= listed
