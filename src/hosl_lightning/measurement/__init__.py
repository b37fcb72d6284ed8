"""Per-side memory accounting, measured (not estimated): what the client and the server each hold during a step.

Client and server share a process here, so each allocation must be attributed to one of them. Two rules:

- **Ownership** for what persists between steps: a side's parameters, buffers, gradients and optimizer
  state are its own wherever they are created. They are counted exactly from the tensors (optimizer state
  per parameter, so in ``fo`` mode, where one optimizer steps both halves, each half gets its own share).
- **Who is working** for everything else (activations, temporaries): every piece of a step runs inside
  ``SplitCausalLM.client_side()`` or ``server_side()`` (see :mod:`hosl_lightning.steps`). A
  :class:`SideSwitch` tracks which is open: the innermost wins, work outside both is the client's (the
  step functions run on the client), and ``"shared"`` marks work that belongs to neither alone: the one
  optimizer step over both halves in ``fo`` and ``zo`` modes, and in ``fo`` mode with a drop-in module
  Lightning's one backward through both. Their temporaries are counted for neither side; the gradients and
  optimizer state they create are counted by ownership. What crosses the cut is delivered as a copy during
  a measured step, as a wire would, so sender and receiver never share a tensor.

How a side's peak is measured depends on its device:

- **CPU** (``method="tracker"``): torch's ``MemTracker`` (a dispatch mode that sees every tensor created
  while it is on), one per side, each recording only while its side works. It gives the peak and the
  breakdown at the peak by category.
- **CUDA** (``method="cuda"``): the caching allocator's counters (``torch.cuda.memory_allocated``,
  ``max_memory_allocated``, ``reset_peak_memory_stats``), read and reset at every switch of side, so each
  phase of work is measured alone. A side holds its exact persistent bytes plus the net allocations of its
  own phases so far; its peak is the highest of that level plus the rise within one of its phases. This
  works whether the halves share a device or not. It resets the device's peak statistics on measured steps
  (the user's ``max_memory_allocated`` and ``DeviceStatsMonitor`` read the same counters: that is why
  ``HOSLStrategy(memory_every_n_steps=...)`` is off unless asked for),
  and a library's one-off workspace (e.g. cuBLAS's, on the first matmul) is charged to the side that
  triggered it. The tests check this arithmetic on CPU against the trackers, with a simulated allocator.

Modules: :mod:`~hosl_lightning.measurement.sides` (which half works), :mod:`~hosl_lightning.measurement.ownership`
(exact counts), :mod:`~hosl_lightning.measurement.tracker` (CPU; imported only when a CPU side is measured),
:mod:`~hosl_lightning.measurement.cuda` (CUDA), :mod:`~hosl_lightning.measurement.meter` (one training step),
:mod:`~hosl_lightning.measurement.reports` (the results), :mod:`~hosl_lightning.measurement.standalone`
(the client's peak outside a Lightning run), :mod:`~hosl_lightning.measurement.resident` (a process's peak
resident memory).
"""

from hosl_lightning.measurement.cuda import CudaCounters
from hosl_lightning.measurement.meter import StepMemoryMeter
from hosl_lightning.measurement.reports import MIB, ClientMemory, MemoryReport, SideMemory
from hosl_lightning.measurement.resident import process_peak_rss_mib
from hosl_lightning.measurement.sides import SIDES, WORK_SIDES, Side, SideSwitch
from hosl_lightning.measurement.standalone import measure_client_inference, measure_client_step

__all__ = [
    "MIB",
    "SIDES",
    "WORK_SIDES",
    "ClientMemory",
    "CudaCounters",
    "MemoryReport",
    "Side",
    "SideMemory",
    "SideSwitch",
    "StepMemoryMeter",
    "measure_client_inference",
    "measure_client_step",
    "process_peak_rss_mib",
]
