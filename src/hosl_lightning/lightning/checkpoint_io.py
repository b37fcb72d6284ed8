"""Checkpoints of a split run: the client process writes its file, and the server its half beside it.

Lightning's CheckpointIO plug-in is where a checkpoint meets storage, so this is where the server is asked to
save (first: a client checkpoint on disk always has its server half) and to load its half. It wraps the user's own
CheckpointIO (``HOSLStrategy(checkpoint_io=...)`` or ``Trainer(plugins=[...])``), which still does the storing. The server keeps
its half on its own disk (``HOSLStrategy(server_checkpoint_dir=...)``); the client names the file only.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from hosl_lightning.core.options import UserError
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.models.sources import looks_like_path
from hosl_lightning.modes import DIVERGENCE_HINT, DivergenceError

_UNREADABLE = (RuntimeError, EOFError, OSError, IndexError, pickle.UnpicklingError, zipfile.BadZipFile)


def unreadable_checkpoint(option: str, path: Any, error: BaseException) -> UserError:
    """The error for a file that torch cannot read as a checkpoint: what was given, and which of the usual causes."""
    message = str(error)
    if "WeightsUnpickler error:" in message:  # torch's long advice first; its finding after this marker
        message = message.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = f"{type(error).__name__}: {lines[0].split('. ')[0] if lines else ''}".rstrip(": ")
    if "Unsupported global" in str(error):
        why = ("it holds objects other than tensors and plain values, and checkpoints are read with weights_only=True, "
               "which refuses to unpickle them (they could run code); load only checkpoints you trust")
    else:
        why = "it cannot be read as a checkpoint (truncated, empty or not a torch file)"
    return UserError(f"{option}={str(path)!r} is not valid: {why} ({detail})")


def read_checkpoint(path: str | os.PathLike, option: str = "ckpt_path") -> dict[str, Any]:
    """A checkpoint file read on the CPU with ``weights_only=True``, or a :class:`UserError` naming ``option``.

    Checked before anything else loads, so a missing, empty, truncated or garbage file is named at once, not after
    the model has loaded with a raw ``PytorchStreamReader``, ``EOFError`` or ``IndexError``.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{option}={str(path)!r} is not valid: no such file")
    if not file.is_file():
        raise UserError(f"{option}={str(path)!r} is not valid: a directory, not a checkpoint file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        raise unreadable_checkpoint(option, path, error) from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"{option}={str(path)!r} is not valid: it holds a {type(checkpoint).__name__}, not a "
                        "checkpoint's dict")
    return checkpoint


def check_saved_model(ckpt_path: Any, saved: Any, flag: str) -> None:
    """A checkpoint saved with a model directory that is not there any more (moved, or another machine): name the
    path the checkpoint holds, which the user never typed, and the option that points at the model's new place."""
    if isinstance(saved, str) and looks_like_path(saved) and not Path(saved).expanduser().exists():
        raise UserError(f"ckpt_path={str(ckpt_path)!r} was saved with model={saved!r}, which does not exist here: "
                        f"pass {flag}=<where the model is now>")


class SplitCheckpointIO(CheckpointIO):
    """The run's CheckpointIO (the user's own, or torch's), wrapped to keep the server's half in step with it.

    Every save, load and removal goes to ``checkpoint_io``; a client process first asks its server to save, and
    after a load to load, its half of the same file.
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        super().__init__()
        self.checkpoint_io = checkpoint_io  # the user's; None: torch's (TorchCheckpointIO)
        self.remote: Any = None  # the client's RemoteServer, once connected; None in-process
        self._default: CheckpointIO | None = None

    @property
    def inner(self) -> CheckpointIO:
        """Where checkpoints meet storage: the user's CheckpointIO, or torch's."""
        io = self.checkpoint_io
        if io is None:
            self._default = self._default or TorchCheckpointIO()
            return self._default
        if isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:  # e.g. AsyncCheckpointIO(), as Lightning
            io.checkpoint_io = TorchCheckpointIO()
        return io

    @staticmethod
    def name_of(path: Any) -> str:
        return os.path.basename(os.fspath(path))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self.remote is not None:
            self.remote.save(self.name_of(path))
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """The CheckpointIO's load, weights-only unless the caller asks otherwise, with a truncated, empty or garbage
        file named instead of a bare unpickling error."""
        try:
            where = {} if map_location is None else {"map_location": map_location}
            return self.inner.load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **where)
        except FileNotFoundError:
            raise
        except _UNREADABLE as error:
            raise unreadable_checkpoint("ckpt_path", path, error) from error

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()

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
            raise UserError(
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
        raise UserError(
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
        raise UserError(f"the checkpoint's weights do not fit this run's model: the checkpoint was saved with "
                         f"{described[0] or 'another model'}, this run has {described[1] or 'its own'}; name the "
                         f"checkpoint's model, or another checkpoint ({str(error).splitlines()[0]})") from error


class SplitCheckpoints:
    """A strategy's checkpoints, for :class:`~.strategy.HOSLStrategy`: what it saves and loads beside the weights.

    ``checkpoint_io`` is the user's (``checkpoint_io=`` or a Trainer plugin; torch's by default), wrapped in one
    :class:`SplitCheckpointIO`, so that a distributed run's server saves and loads its half with it. A checkpoint
    carries the ZO state (``hosl_state_dict()``), is never written with NaN weights, and resumes only a run with
    the same settings (:data:`RESUME_KEYS`): ``hosl_state_dict()`` and ``_apply_pending_state()`` are here. The
    strategy provides ``zo_steps``, ``client_optimizer``, ``client_scheduler`` and ``optimizers``.
    """

    _checkpoint_io: CheckpointIO | None  # Lightning's Strategy keeps what it was given here
    zo_steps: int
    _pending_state: dict[str, Any] | None
    client_optimizer: Any
    client_scheduler: Any
    optimizers: list[Any]
    lightning_module: Any

    @property
    def checkpoint_io(self) -> SplitCheckpointIO:
        split = self.__dict__.setdefault("_split_io", SplitCheckpointIO())
        split.checkpoint_io = self._checkpoint_io
        return split

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO | None) -> None:
        self._checkpoint_io = io.checkpoint_io if isinstance(io, SplitCheckpointIO) else io

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        check_finite_weights(checkpoint.get("state_dict", {}), filepath, self.zo_steps)  # never a NaN checkpoint
        super().save_checkpoint({**checkpoint, "hosl": self.hosl_state_dict()}, filepath, storage_options)  # type: ignore[misc]

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        with weights_must_fit(checkpoint, self.lightning_module):
            super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[misc]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)  # type: ignore[misc]
        state = checkpoint.get("hosl")
        if state is not None:
            check_resumable(state, {k: getattr(self, k) for k in RESUME_KEYS}, checkpoint_path)
            self.zo_steps = state["zo_steps"]
            self.checkpoint_io.load_server_half(checkpoint_path)
            self._pending_state = state
            self._apply_pending_state()
        return checkpoint

    def _drawing_optimizer(self) -> ZOSGD | None:
        """The ZOSGD whose directions this process draws (the client's; in zo the one over both halves)."""
        if self.client_optimizer is not None:
            return self.client_optimizer
        first = self.optimizers[0] if self.optimizers else None
        return first if isinstance(first, ZOSGD) else None

    def hosl_state_dict(self) -> dict[str, Any]:
        optimizer = None if self.client_optimizer is None else self.client_optimizer.state_dict()
        drawing = self._drawing_optimizer()
        scheduler = None if self.client_scheduler is None else self.client_scheduler.state_dict()
        return {**{k: getattr(self, k) for k in RESUME_KEYS}, "zo_steps": self.zo_steps, "client_optimizer": optimizer,
                "client_scheduler": scheduler, "directions": None if drawing is None else drawing.direction_signature()}

    def _apply_pending_state(self) -> None:
        """The client's ZO optimizer exists only after setup; restore it whichever comes first."""
        state = self._pending_state
        drawing = self._drawing_optimizer()
        if state is None or drawing is None:
            return
        restore_zo_state(state, drawing, self.client_optimizer, self.client_scheduler)
        self._pending_state = None
