"""``hosl-lightning export``: a plain transformers model directory from a split run's checkpoint.

An in-process checkpoint holds both halves; a distributed client's holds its half, and the server keeps the
other beside it (``<name>.server.pt`` in ``server_checkpoint_dir``). Either way the whole model is rebuilt
the way ``HOSLModule`` built it (from the checkpoint's hyperparameters), both halves are loaded, and
:meth:`SplitCausalLM.to_pretrained` gives the model that ``save_pretrained`` writes (its head untied).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.models import load_causal_lm

_PREFIX = "model."  # HOSLModule keeps its (split) model as .model


def export_checkpoint(ckpt_path: str | Path, out: str | Path, server_checkpoint: str | Path | None = None,
                      model: str | None = None) -> Path:
    """Write ``out`` (config.json + safetensors) from ``ckpt_path``; ``server_checkpoint`` for a distributed run's
    server half; ``model`` overrides where the architecture comes from (e.g. a moved model directory)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "hosl" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} is not valid: it is not a checkpoint of a HOSLStrategy run")
    hparams: dict[str, Any] = checkpoint.get("hyper_parameters", {})
    source = model if model is not None else hparams.get("model")
    whole = load_causal_lm(source, hparams.get("model_config"), hparams.get("dtype", "float32"), hparams.get("gguf_file"))
    split = SplitCausalLM(whole, checkpoint["hosl"]["cut_layer"])
    state = checkpoint["state_dict"]
    halves = {side: {k[len(f"{_PREFIX}{side}."):]: v for k, v in state.items() if k.startswith(f"{_PREFIX}{side}.")}
              for side in ("client", "server")}
    if server_checkpoint is not None:
        halves["server"] = torch.load(server_checkpoint, map_location="cpu", weights_only=True)["server"]
    if not halves["server"]:
        raise ValueError(f"ckpt_path={str(ckpt_path)!r} holds the client's half only (a distributed run): pass "
                         "server_checkpoint=<name>.server.pt from the server's server_checkpoint_dir")
    split.client.load_state_dict(halves["client"])
    split.server.load_state_dict(halves["server"])
    out = Path(out)
    split.to_pretrained().save_pretrained(out)
    return out


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hosl-lightning export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="the client's (or in-process) checkpoint")
    parser.add_argument("--out", required=True, help="the directory to write (config.json + model.safetensors)")
    parser.add_argument("--server_checkpoint", help="a distributed run's server half, <name>.server.pt")
    parser.add_argument("--model", help="where the architecture comes from, if not the checkpoint's own")
    options = parser.parse_args(args)
    written = export_checkpoint(options.ckpt_path, options.out, options.server_checkpoint, options.model)
    print(f"wrote {written}")
