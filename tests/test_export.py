"""The model you trained is the model you get back: a plain transformers model whose logits equal the split
model's, through a save_pretrained / from_pretrained round trip, with a tied head untied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hosl_lightning import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import hosl_step


def _trained_split(tied: bool) -> SplitCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied)
    split = SplitCausalLM(LlamaForCausalLM(config), 1)
    split.client.requires_grad_(False)
    zo, server = ZOSGD(split.client.named_parameters(), lr=1e-2), torch.optim.SGD(split.server.parameters(), lr=1.0)
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    for step in range(2):  # the client's embedding and the server's head now differ
        hosl_step(split, {"input_ids": ids, "labels": ids}, zo, ZOSettings(queries=2), step, lambda l: l.backward())
        server.step()
        server.zero_grad()
    return split


@pytest.mark.parametrize("tied", [True, False])
def test_to_pretrained_round_trips_with_the_split_models_logits(tied: bool, tmp_path: Path) -> None:
    split = _trained_split(tied).eval()
    embedding = split.client.embeddings["embed_tokens"].weight
    assert not tied or not torch.equal(embedding, split.server.lm_head.weight)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = split(ids).logits
    plain = split.to_pretrained()
    assert type(plain) is LlamaForCausalLM and plain.config.tie_word_embeddings is False
    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_one_half_cannot_pose_as_the_whole_model() -> None:
    split = _trained_split(False)
    half = SplitCausalLM.from_halves(split.client, None, split.config, 1)
    with pytest.raises(ValueError, match="holds one half only"):
        half.to_pretrained()


@pytest.mark.parametrize("distributed", [False, True])
def test_export_rebuilds_the_trained_model_from_its_checkpoint_halves(distributed: bool, tmp_path: Path) -> None:
    from conftest import TINY_LLAMA, quiet_trainer, tiny_data
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hosl_lightning import HOSLModule, HOSLStrategy
    from hosl_lightning.cli import main

    module = HOSLModule(model_config=dict(TINY_LLAMA, tie_word_embeddings=True))
    checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=2, filename="last")
    quiet_trainer(HOSLStrategy(cut_layer=1, zo_lr=1e-2), max_steps=2, enable_checkpointing=True,
                  callbacks=[checkpoint]).fit(module, tiny_data())
    ckpt, extra = tmp_path / "last.ckpt", []
    if distributed:  # the client's file holds its half; the server's half lies beside it, as a server saves it
        state = torch.load(ckpt, weights_only=True)
        server = {k[len("model.server."):]: v for k, v in state["state_dict"].items() if k.startswith("model.server.")}
        state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("model.server.")}
        torch.save(state, ckpt)
        torch.save({"server": server}, tmp_path / "last.ckpt.server.pt")
        with pytest.raises(SystemExit, match="2"):
            main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "never")])
        assert not (tmp_path / "never").exists()
        extra = ["--server_checkpoint", str(tmp_path / "last.ckpt.server.pt")]
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "plain"), *extra])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, module.model.eval()(ids).logits)


# --- export trusts none of its arguments -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_LLAMA, quiet_trainer, tiny_data
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hosl_lightning import HOSLModule, HOSLStrategy

    folder = tmp_path_factory.mktemp("trained")
    checkpoint = ModelCheckpoint(folder, every_n_train_steps=1, filename="last")
    quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=1, enable_checkpointing=True,
                  callbacks=[checkpoint]).fit(HOSLModule(model_config=TINY_LLAMA), tiny_data())
    return folder / "last.ckpt"


def _export_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from hosl_lightning.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", *args])
    assert exit_.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hosl-lightning ")]
    assert line.startswith("hosl-lightning export: error: ")
    return line.removeprefix("hosl-lightning export: error: ")


def test_export_refuses_an_out_that_is_a_file_or_holds_a_model(trained_checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from hosl_lightning.cli import main

    file = tmp_path / "model.txt"
    file.write_text("keep me")
    assert _export_error(["--ckpt_path", str(trained_checkpoint), "--out", str(file)], capsys) == (
        f"out='{file}' is not valid: a file, not a directory; name a directory to write the model into "
        "(config.json + model.safetensors)")
    assert file.read_text() == "keep me"  # it said "wrote" and left it, before
    out = tmp_path / "plain"
    main(["export", "--ckpt_path", str(trained_checkpoint), "--out", str(out)])
    written = (out / "model.safetensors").read_bytes()
    assert _export_error(["--ckpt_path", str(trained_checkpoint), "--out", str(out)], capsys) == (
        f"out='{out}' is not valid: it already holds a model (config.json, model.safetensors); name another "
        "directory, or pass --overwrite to replace it")
    (out / "model.safetensors").write_bytes(b"stale")
    main(["export", "--ckpt_path", str(trained_checkpoint), "--out", str(out), "--overwrite"])
    assert (out / "model.safetensors").read_bytes() == written


@pytest.mark.parametrize("kind", ["missing", "truncated"])
def test_export_names_a_missing_or_truncated_checkpoint(kind: str, trained_checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "bad.ckpt"
    if kind == "truncated":
        ckpt.write_bytes(trained_checkpoint.read_bytes()[:4096])
    why = "no such file" if kind == "missing" else "it cannot be read as a checkpoint (truncated, empty or not a torch file)"
    assert _export_error(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")], capsys).startswith(
        f"ckpt_path='{ckpt}' is not valid: {why}")
    assert not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_whose_model_directory_moved_hints_at_model(trained_checkpoint: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(trained_checkpoint, weights_only=True)
    state["hyper_parameters"] = {**state["hyper_parameters"], "model": str(tmp_path / "gone"), "model_config": None}
    torch.save(state, tmp_path / "moved.ckpt")
    assert _export_error(["--ckpt_path", str(tmp_path / "moved.ckpt"), "--out", str(tmp_path / "out")], capsys) == (
        f"ckpt_path='{tmp_path / 'moved.ckpt'}' was saved with model='{tmp_path / 'gone'}', which does not exist here: "
        "pass --model=<where the model is now>")


class _Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["export", "fit"])
def test_a_checkpoint_carrying_code_is_refused_without_running_it(where: str, trained_checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """export read checkpoints with weights_only=False: a checkpoint could run code. Every load is weights-only."""
    from hosl_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(trained_checkpoint, weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, tmp_path / "evil.ckpt")
    args = (["export", "--ckpt_path", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "out")] if where == "export"
            else ["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml"),
                  f"--ckpt_path={tmp_path / 'evil.ckpt'}"])
    with pytest.raises(SystemExit):
        main(args)
    assert not marker.exists()
    assert ("is not valid: it holds objects other than tensors and plain values, and checkpoints are read with "
            "weights_only=True") in capsys.readouterr().err


def test_lightnings_own_load_is_weights_only(trained_checkpoint: Path, tmp_path: Path) -> None:
    """Lightning's resume goes through SplitCheckpointIO, which asks for weights_only unless told otherwise."""
    from hosl_lightning.core.options import UserError
    from hosl_lightning.lightning.checkpoint_io import SplitCheckpointIO

    marker = tmp_path / "code-ran"
    torch.save({"extra": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="weights_only=True"):
        SplitCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
