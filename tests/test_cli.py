"""The hosl-lightning command: configs run, --print_config round-trips, bad values fail before training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hosl_lightning.cli import build_cli, main

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
        ("--trainer.strategy.init_args.mode=hsol", "Expected a typing.Literal['hosl', 'fo', 'zo']. Got value: hsol"),
        ("--trainer.strategy.init_args.q=0", "q=0 is not valid"),
        ("--trainer.strategy.init_args.mu=0", "mu=0"),
        ("--trainer.strategy.init_args.direction=uniform", "direction='uniform' is not valid"),
    ],
)
def test_invalid_values_fail_before_training(override: str, message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hosl_lightning.cli", "fit", "--config", str(CONFIGS / "synthetic.yaml"), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
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
    result = subprocess.run([sys.executable, "-m", "hosl_lightning.cli", "fit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "not recommended" not in result.stderr + result.stdout


@pytest.mark.parametrize("override", ["--trainer.strategy.init_args.mode=hsol", "--trainer.strategy.init_args.q=0",
                                      "--model.model=./no/such/dir"])
def test_every_refused_option_reports_in_one_style(override: str, tmp_path: Path) -> None:
    """A value jsonargparse refuses and one a constructor refuses both print usage and the message, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "hosl_lightning.cli", "fit", "--config", str(CONFIGS / "synthetic.yaml"), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-1500:]
    assert "usage:" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr
