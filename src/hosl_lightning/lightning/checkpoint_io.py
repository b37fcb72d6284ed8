"""Checkpoints of a split run: the client process writes its file, and the server its half beside it.

Lightning's CheckpointIO plug-in is where a checkpoint meets storage, so this is where the server is asked to
save (first: a client checkpoint on disk always has its server half) and to load its half. The server keeps
its half on its own disk (``HOSLStrategy(server_checkpoint_dir=...)``); the client names the file only.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from hosl_lightning.modes import DIVERGENCE_HINT, DivergenceError


class SplitCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that keeps the server's half in step with each client checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: Any = None  # the client's RemoteServer, once connected; None in-process

    @staticmethod
    def name_of(path: Any) -> str:
        return os.path.basename(os.fspath(path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self.remote is not None:
            self.remote.save(self.name_of(path))
        super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Lightning's load, with a truncated, empty or garbage file named instead of a bare unpickling error."""
        try:
            where = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **where)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            raise ValueError(f"ckpt_path={str(path)!r} is not valid: it cannot be read as a checkpoint (truncated, "
                             f"empty or not a torch file): {type(error).__name__}: {error}") from error

    def load_server_half(self, path: Any) -> None:
        """Asked once the client's file has been read and checked against this run."""
        if self.remote is not None:
            self.remote.load(self.name_of(path))


RESUME_KEYS = ("mode", "cut_layer", "seed", "direction", "zo_optimizer")  # a run resumes only with these
RESUME_DEFAULTS = {"zo_optimizer": {"name": "zo_sgd"}}  # what a checkpoint saved before the key existed ran with


def check_resumable(state: dict[str, Any], current: dict[str, Any], path: Any) -> None:
    """Refuse to resume a checkpoint saved with other settings, naming the setting and both values."""
    for key in RESUME_KEYS:
        saved = state.get(key, RESUME_DEFAULTS.get(key))
        if saved != current[key]:
            raise ValueError(
                f"checkpoint {path} was saved with {key}={saved!r}, this run has "
                f"{key}={current[key]!r}: resume with the same {key}"
            )


def check_finite_weights(state_dict: dict[str, Any], path: Any, step: int) -> None:
    """Refuse to write a checkpoint whose weights hold NaN or inf: it could only poison whatever loads it."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DivergenceError(
                f"step {step}: weight {name!r} is not finite, so checkpoint {path} was not written: {DIVERGENCE_HINT}")


def restore_zo_state(state: dict[str, Any], drawing: Any, optimizer: Any, scheduler: Any) -> None:
    """Restore the client's ZO optimizer and zo_lr schedule, refusing a run that would draw other directions."""
    saved, current = state.get("directions"), drawing.direction_signature()
    if saved is not None:
        saved = {"embedding_directions": "dense", **saved}  # saved before sparse directions existed: dense
    if saved is not None and saved != current:
        differ = ", ".join(f"{k}={saved.get(k)!r} there, {current.get(k)!r} here" for k in sorted(saved.keys() | current.keys())
                           if saved.get(k) != current.get(k))
        raise ValueError(
            f"the checkpoint drew its directions with {saved}, this run draws them with {current} ({differ}): the "
            "same seeds would give other directions; resume with the same setting (direction_device: the same device "
            "type, client_device)"
        )
    if state["client_optimizer"] is not None and optimizer is not None:
        optimizer.load_state_dict(state["client_optimizer"])
    if state.get("client_scheduler") is not None and scheduler is not None:
        scheduler.load_state_dict(state["client_scheduler"])


@contextmanager
def weights_must_fit(checkpoint: dict[str, Any], module: Any) -> Iterator[None]:
    """A checkpoint of another model fails naming both models, not with a bare list of mismatched tensors."""
    try:
        yield
    except RuntimeError as error:
        saved, current = checkpoint.get("hyper_parameters", {}), dict(getattr(module, "hparams", {}))
        described = [", ".join(f"{k}={h.get(k)!r}" for k in ("model", "model_config") if h.get(k) is not None)
                     for h in (saved, current)]
        raise ValueError(f"the checkpoint's weights do not fit this run's model: the checkpoint was saved with "
                         f"{described[0] or 'another model'}, this run has {described[1] or 'its own'}; name the "
                         f"checkpoint's model, or another checkpoint ({str(error).splitlines()[0]})") from error
