"""``hosl-lightning export``: a plain transformers model directory from a split run's checkpoint.

An in-process checkpoint holds both halves; a distributed client's holds its half, and the server keeps the
other beside it (``<name>.server.pt`` in ``server_checkpoint_dir``). Either way the whole model is rebuilt
the way ``HOSLModule`` built it (from the checkpoint's hyperparameters), both halves are loaded, and
:meth:`SplitCausalLM.to_pretrained` gives the model that ``save_pretrained`` writes (its head untied).

Checkpoints are read with ``weights_only=True`` (a checkpoint cannot run code), and every argument is checked
before the model is built: the checkpoint files, and ``out``, which must not be a file, nor a directory that
already holds a model unless ``overwrite`` says to replace it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hosl_lightning.core.options import UserError
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.lightning.checkpoint_io import check_saved_model, read_checkpoint
from hosl_lightning.models import load_causal_lm

_PREFIX = "model."  # HOSLModule keeps its (split) model as .model
_MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf")  # what makes a directory hold a model


def check_out(out: Path, overwrite: bool) -> None:
    """``out`` must be a new directory, or an existing one that holds no model (or ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={str(out)!r} is not valid: a file, not a directory; name a directory to write the "
                        "model into (config.json + model.safetensors)")
    held = sorted({path.name for pattern in _MODEL_FILES for path in out.glob(pattern)}) if out.is_dir() else []
    if held and not overwrite:
        raise UserError(f"out={str(out)!r} is not valid: it already holds a model ({', '.join(held)}); name another "
                        "directory, or pass --overwrite to replace it")


def export_checkpoint(ckpt_path: str | Path, out: str | Path, server_checkpoint: str | Path | None = None,
                      model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``out`` (config.json + safetensors) from ``ckpt_path``; ``server_checkpoint`` for a distributed run's
    server half; ``model`` overrides where the architecture comes from (e.g. a moved model directory);
    ``overwrite`` replaces a model already in ``out``."""
    out = Path(out)
    check_out(out, overwrite)
    checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
    if "hosl" not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"ckpt_path={str(ckpt_path)!r} is not valid: it is not a checkpoint of a HOSLStrategy run")
    server_half = None
    if server_checkpoint is not None:
        server_half = read_checkpoint(server_checkpoint, "server_checkpoint").get("server")
        if not isinstance(server_half, dict):
            raise UserError(f"server_checkpoint={str(server_checkpoint)!r} is not valid: it holds no 'server' half "
                            "(a server saves <name>.server.pt in its server_checkpoint_dir)")
    hparams: dict[str, Any] = checkpoint.get("hyper_parameters", {})
    if model is None:
        check_saved_model(ckpt_path, hparams.get("model"), "--model")
    source = model if model is not None else hparams.get("model")
    whole = load_causal_lm(source, hparams.get("model_config"), hparams.get("dtype", "float32"), hparams.get("gguf_file"))
    split = SplitCausalLM(whole, checkpoint["hosl"]["cut_layer"])
    state = checkpoint["state_dict"]
    halves = {side: {k[len(f"{_PREFIX}{side}."):]: v for k, v in state.items() if k.startswith(f"{_PREFIX}{side}.")}
              for side in ("client", "server")}
    if server_half is not None:
        halves["server"] = server_half
    if not halves["server"]:
        raise UserError(f"ckpt_path={str(ckpt_path)!r} holds the client's half only (a distributed run): pass "
                        "server_checkpoint=<name>.server.pt from the server's server_checkpoint_dir")
    split.client.load_state_dict(halves["client"])
    split.server.load_state_dict(halves["server"])
    split.to_pretrained().save_pretrained(out)
    return out


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hosl-lightning export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="the client's (or in-process) checkpoint")
    parser.add_argument("--out", required=True, help="the directory to write (config.json + model.safetensors)")
    parser.add_argument("--server_checkpoint", help="a distributed run's server half, <name>.server.pt")
    parser.add_argument("--model", help="where the architecture comes from, if not the checkpoint's own")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    options = parser.parse_args(args)
    written = export_checkpoint(options.ckpt_path, options.out, options.server_checkpoint, options.model,
                                options.overwrite)
    print(f"wrote {written}")
