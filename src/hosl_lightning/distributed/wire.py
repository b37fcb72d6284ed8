"""Typed messages between a client and a server process over torch.distributed (gloo on CPU, NCCL on GPUs).

A message is a kind, a few JSON-able fields and named tensors. It travels as three sends: the header's
length, the header (JSON: kind, fields, and each tensor's name, dtype and shape) and then each tensor. The
header is plain JSON, never pickle: unpickling bytes from a peer would run whatever code they name. The
receiver checks what arrives before allocating or using it (a known kind, an allowed dtype, a bounded size)
and every wait has a deadline, so a dead or stalled peer becomes a clear error instead of a hang.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_ELEMENTS = 1 << 31


class WireError(RuntimeError):
    """The peer is gone, stalled, or broke the protocol."""


class PeerTimeout(WireError):
    """Nothing arrived from the peer within the deadline."""


class MalformedPayload(WireError):
    """What arrived cannot be trained on: wrong kind, dtype, shape, or non-finite values."""


class RemoteError(WireError):
    """The peer failed and said why."""


@dataclass
class Message:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Wire:
    """One peer-to-peer link: ``send`` and ``recv`` of :class:`Message` with a deadline on every wait.

    Args:
        peer: the other process's rank in the default process group.
        peer_name: how errors name the peer, e.g. ``"client (rank 1)"``.
        timeout_s: how long a receive waits before :class:`PeerTimeout`.
        device: where tensors travel from and arrive on (CPU for gloo, the process's GPU for NCCL).
    """

    def __init__(self, peer: int, peer_name: str, timeout_s: float, device: torch.device | str = "cpu") -> None:
        self.peer, self.peer_name, self.timeout_s = peer, peer_name, float(timeout_s)
        self.device = torch.device(device)
        self._pending: list[tuple[Any, Tensor]] = []  # unfinished sends of wait=False, with their buffers

    def flush(self) -> None:
        """Wait (up to the deadline) for the sends made with ``wait=False``."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            try:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except RuntimeError as error:
                raise WireError(f"could not send to {self.peer_name}: {error}") from None

    def send(self, kind: str, tensors: dict[str, Tensor | None] | None = None, *, wait: bool = True, **fields: Any) -> int:
        """Send a message; returns the bytes of its tensors (the payload, as the traffic counters count it).

        ``wait=False`` returns before the peer has received it (finish with :meth:`flush`): a side that fails
        mid-step can then tell its peer why while the peer is still sending to it.
        """
        present = {name: t for name, t in (tensors or {}).items() if t is not None}
        specs = []
        for name, tensor in present.items():
            if tensor.dtype not in _NAMES:
                raise TypeError(f"cannot send {name!r} of dtype {tensor.dtype}: allowed {', '.join(DTYPES)}")
            specs.append([name, _NAMES[tensor.dtype], list(tensor.shape)])
        header = json.dumps({"kind": kind, "fields": fields, "tensors": specs}).encode()
        parts = [torch.tensor([len(header)], dtype=torch.int64), torch.frombuffer(bytearray(header), dtype=torch.uint8)]
        parts += [tensor.detach().contiguous() for tensor in present.values()]
        for part in parts:
            if wait:
                self._send(part)
            else:
                part = part.to(self.device)
                self._pending.append((dist.isend(part, dst=self.peer), part))
        return sum(t.numel() * t.element_size() for t in present.values())

    def recv(self, expect: str | tuple[str, ...] | None, waiting_for: str, header_size: int | None = None,
             timeout_s: float | None = None) -> Message:
        """The next message, which must be of a kind in ``expect`` (None: any); a peer's ``error`` is raised here.

        ``header_size``: the message's first part, when :func:`recv_from_any` already received it.
        ``timeout_s``: a deadline for the message's first part other than the wire's (waiting for other clients).
        """
        expected = (expect,) if isinstance(expect, str) else expect
        size = header_size if header_size is not None else int(
            self._recv(self._buffer([1], torch.int64), waiting_for, timeout_s).item())
        if not 0 < size <= MAX_HEADER_BYTES:
            raise MalformedPayload(f"{self.peer_name} announced a header of {size} bytes while we waited for {waiting_for}")
        raw = self._recv(self._buffer([size], torch.uint8), waiting_for)
        try:
            header = json.loads(bytes(raw.cpu().tolist()).decode())
            kind, fields, specs = header["kind"], header["fields"], header["tensors"]
        except (ValueError, KeyError, TypeError) as error:
            raise MalformedPayload(f"{self.peer_name} sent an unreadable header while we waited for {waiting_for}: {error}") from None
        if not isinstance(specs, list) or not all(isinstance(t, list) and len(t) == 3 and isinstance(t[2], list) for t in specs):
            raise MalformedPayload(f"{self.peer_name} sent a header whose tensor list is not [name, dtype, shape] entries")
        total = 0
        for name, dtype, shape in specs:
            if dtype not in DTYPES:
                raise MalformedPayload(f"{self.peer_name} sent {name!r} as {dtype!r}; allowed dtypes: {', '.join(DTYPES)}")
            if not all(isinstance(n, int) and n >= 0 for n in shape):
                raise MalformedPayload(f"{self.peer_name} sent {name!r} with an invalid shape {shape}")
            total += math.prod(shape)
        if total > MAX_TENSOR_ELEMENTS:  # checked before anything is allocated
            raise MalformedPayload(f"{self.peer_name} announced {total} elements in one message (at most {MAX_TENSOR_ELEMENTS})")
        tensors = {}
        for name, dtype, shape in specs:
            tensors[name] = self._recv(self._buffer(shape, DTYPES[dtype]), waiting_for)
        message = Message(kind, fields, tensors)
        if kind == "error":
            raise RemoteError(f"{self.peer_name} failed: {fields.get('message', '(no message)')}")
        if expected is not None and kind not in expected:
            raise MalformedPayload(
                f"{self.peer_name} sent a {kind!r} message while we waited for {waiting_for} (expected {' or '.join(expected)})"
            )
        return message

    def _buffer(self, shape: list[int], dtype: torch.dtype) -> Tensor:
        """An empty tensor on the wire's device: what arrives lands in it, and it is the tensor read afterwards."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _send(self, tensor: Tensor) -> None:
        try:
            dist.send(tensor.to(self.device), dst=self.peer)
        except RuntimeError as error:
            raise WireError(f"could not send to {self.peer_name}: {error}") from None

    def _recv(self, buffer: Tensor, waiting_for: str, timeout_s: float | None = None) -> Tensor:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            work = dist.irecv(buffer, src=self.peer)
            work.wait(timeout=timedelta(seconds=timeout_s))
        except RuntimeError as error:
            if "timed out" in str(error).lower() or "timeout" in str(error).lower():
                raise PeerTimeout(
                    f"no answer from {self.peer_name} within timeout_s={timeout_s:g} s while waiting for {waiting_for}"
                ) from None
            raise WireError(f"lost {self.peer_name} while waiting for {waiting_for}: {error}") from None
        return buffer


def recv_from_any(wires: dict[int, Wire], expect: str | tuple[str, ...] | None, waiting_for: str) -> tuple[int, Message]:
    """The next message from whichever peer sends first, and its rank (a server with several clients)."""
    anyone = next(iter(wires.values()))
    size = anyone._buffer([1], torch.int64)  # received into and read from the same tensor, on the wire's device
    try:
        work = dist.irecv(size, src=None)
        work.wait(timeout=timedelta(seconds=anyone.timeout_s))
        source = int(work._source_rank())
    except RuntimeError as error:
        names = ", ".join(w.peer_name for w in wires.values())
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            raise PeerTimeout(f"no message from any of {names} within timeout_s={anyone.timeout_s:g} s while waiting for {waiting_for}") from None
        raise WireError(f"lost a peer ({names}) while waiting for {waiting_for}: {error}") from None
    if source not in wires:
        raise MalformedPayload(f"rank {source} sent a message but is not one of {sorted(wires)}")
    return source, wires[source].recv(expect, waiting_for, header_size=int(size.item()))


def check_finite(message: Message, waiting_for: str, peer_name: str) -> None:
    """Reject NaN or inf in any floating tensor of ``message``: training on them corrupts the weights silently."""
    for name, tensor in message.tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise MalformedPayload(f"{peer_name} sent {name!r} with NaN or inf values in a {message.kind!r} message ({waiting_for})")


def check_shape(message: Message, name: str, expected: tuple[int | None, ...], dtypes: tuple[torch.dtype, ...], peer_name: str) -> Tensor:
    """The tensor ``name`` of ``message``, checked against a shape (None = any size) and allowed dtypes."""
    tensor = message.tensors.get(name)
    if tensor is None:
        raise MalformedPayload(f"{peer_name} sent a {message.kind!r} message without {name!r}")
    shape_ok = len(tensor.shape) == len(expected) and all(e is None or e == n for e, n in zip(expected, tensor.shape))
    if not shape_ok or tensor.dtype not in dtypes:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise MalformedPayload(
            f"{peer_name} sent {name!r} of shape {list(tensor.shape)} and dtype {tensor.dtype}; expected shape {want} "
            f"and dtype {' or '.join(map(str, dtypes))}"
        )
    return tensor
