"""The forward-gradient client side by side with fo, hosl and frozen: seconds per step (server seconds apart) and client
peak.

    python -m benchmarks.diagnostics.forward_gradient [--steps 3] [--quick] [--out benchmarks/results]

One process, one model (SmolLM2-135M through ``load_causal_lm("smollm2-135m")``; ``--quick``: its shape with 4
blocks and random weights), cut after block 2, a batch of 8 x 64 tokens with one answer token per row, AdamW on
the first-order side. Timed in CPU seconds (this process's, all threads): fo, hosl with ZO-SGD at Q=1,
``forward_gradient`` at Q=1 and Q=8, and frozen (the client never learns: any learning client's floor), each the
median of ``--steps`` steps after a warm-up step. Server seconds are its forward, its backward and its optimizer's
step. Then each client's peak memory during a step (``measure_client_step``, torch's MemTracker) against the
inference floor (``measure_client_inference``), and the cost of the predicted-decrease diagnostic's two passes over
the server's gradients and weights. On a shared machine even CPU seconds are contended (caches, memory bandwidth):
compare them within one run only.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.lightning.decrease import gradient_dot_weights
from hosl_lightning.measurement import MIB, measure_client_inference, measure_client_step
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import fo_step, hosl_step, in_process_step
from hosl_lightning.zo_optimizers import ForwardGradient

from ..common.environment import code_state
from ..common.models import SMOLLM2_SHAPE

SETTINGS = {  # name -> (mode, client optimizer class, settings)
    "fo": ("fo", None, ZOSettings()),
    "hosl zo_sgd Q=1": ("hosl", ZOSGD, ZOSettings(queries=1)),
    "hosl forward_gradient Q=1": ("hosl", ForwardGradient, ZOSettings(queries=1, estimator="forward")),
    "hosl forward_gradient Q=8": ("hosl", ForwardGradient, ZOSettings(queries=8, estimator="forward")),
    "frozen": ("frozen", None, ZOSettings()),
}


def timed(seconds: list[float], call: Callable[..., Any]) -> Callable[..., Any]:
    """``call``, adding the CPU seconds each call takes to ``seconds[0]``."""
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            seconds[0] += time.process_time() - started
    return run


def time_steps(model: SplitCausalLM, name: str, batch: dict, steps: int) -> tuple[float, float]:
    """Median CPU seconds per step and median server CPU seconds per step of setting ``name`` over ``steps`` steps
    (medians both: a mean of a few steps let one slow step put the server above the whole step).

    CPU seconds (``time.process_time``: every thread of this process), not wall time: on a machine shared with
    other jobs the wall time of one step varied 2x from one setting to the next, the CPU time it takes much less.
    """
    mode, zo_class, settings = SETTINGS[name]
    split = copy.deepcopy(model)
    for p in split.client.parameters():
        p.requires_grad_(mode == "fo")
    zo = None if zo_class is None else zo_class(split.client.named_parameters(), lr=1e-6)
    optimizer = torch.optim.AdamW([p for p in split.parameters() if p.requires_grad], lr=1e-5)
    server_s = [0.0]
    split.server.forward = timed(server_s, split.server.forward)  # type: ignore[method-assign]
    step_optimizer = timed(server_s, optimizer.step)  # fo's covers the client's weights too: charged to the server
    backward = timed(server_s, lambda loss: loss.backward())  # the server's (fo's client backward runs in fo_step)

    seconds, server = [], []
    for step in range(steps + 1):
        server_s[0] = 0.0
        started = time.process_time()
        if mode == "fo":
            fo_step(split, batch, backward)
        elif zo is None:
            in_process_step(split, mode, batch, settings, step, backward)
        else:
            hosl_step(split, batch, zo, settings, step, backward)
        step_optimizer()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            seconds.append(time.process_time() - started)
            server.append(server_s[0])
    return statistics.median(seconds), statistics.median(server)


def client_peak_mib(model: SplitCausalLM, name: str, batch: dict) -> float:
    mode, zo_class, settings = SETTINGS[name]
    factory = None if zo_class is None else (lambda named: zo_class(named, lr=0.0))
    return measure_client_step(copy.deepcopy(model), batch, mode, settings, zo_optimizer=factory).peak / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2's shape with 4 blocks, random weights")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--peaks", choices=("all", "forward_gradient"), default="all",
                        help="whose client peak to measure: every setting's, or forward_gradient Q=1's only (the "
                             "target; each measured step runs under the tracker, which a busy machine pays for)")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)  # CPU seconds then count work, not the spinning of a second thread waiting for it
    torch.manual_seed(0)
    causal_lm = (load_causal_lm(model_config=dict(SMOLLM2_SHAPE, num_hidden_layers=4)) if args.quick
                 else load_causal_lm("smollm2-135m"))
    model = SplitCausalLM(causal_lm, args.cut).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # a classification prompt: one answer token per row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    rows = []
    for name in SETTINGS:
        step_s, server_s = time_steps(model, name, batch, args.steps)
        rows.append((name, step_s, server_s))
        print(f"{name}: {step_s:.3f} CPU s/step, server {server_s:.3f} CPU s", flush=True)
    floor = measure_client_inference(copy.deepcopy(model), batch).peak / MIB
    measured = list(SETTINGS) if args.peaks == "all" else ["hosl forward_gradient Q=1"]
    peaks = {name: client_peak_mib(model, name, batch) for name in measured}
    server_params = [p for p in model.server.parameters()]
    for p in server_params:
        p.grad = torch.randn_like(p)
    diagnostic_started = time.process_time()
    gradient_dot_weights(server_params)
    diagnostic_s = 2 * (time.process_time() - diagnostic_started)  # before and after the server's step

    seconds = {name: step_s for name, step_s, _ in rows}
    server = {name: server_s for name, _, server_s in rows}
    fg1, fg8 = "hosl forward_gradient Q=1", "hosl forward_gradient Q=8"
    lines = [
        "# forward_gradient beside fo and hosl (one process; CPU seconds, contended on a shared machine)",
        "",
        (f"Command: `python -m benchmarks.diagnostics.forward_gradient{' --quick' if args.quick else ''} --steps {args.steps} "
         f"--peaks {args.peaks}` "
         f"({(time.perf_counter() - started) / 60:.1f} min). Machine: {platform.processor() or platform.machine()}, "
         f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Code: {code_state()}. Model: "
         f"{'SmolLM2 shape, 4 blocks, random weights' if args.quick else 'SmolLM2-135M'}, cut {args.cut}, batch "
         f"{args.batch} x {args.seq} tokens, one answer token per row; median of {args.steps} steps after a warm-up."),
        "",
        "| setting | CPU s/step | server CPU s/step | client peak MiB | peak / floor |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {step_s:.3f} | {server_s:.3f} | " + (f"{peaks[name]:.1f} | {peaks[name] / floor:.2f} |"
                                                             if name in peaks else "not measured | |")
          for name, step_s, server_s in rows],
        f"| inference floor | | | {floor:.1f} | 1.00 |",
        "",
        f"- forward_gradient Q=1 / fo CPU seconds a step: {seconds[fg1] / seconds['fo']:.2f} (target <= 1).",
        (f"- forward_gradient Q=1 / hosl zo_sgd Q=1 CPU seconds a step: {seconds[fg1] / seconds['hosl zo_sgd Q=1']:.2f} "
         "(target <= 0.75)."),
        (f"- frozen / hosl zo_sgd Q=1 CPU seconds a step: {seconds['frozen'] / seconds['hosl zo_sgd Q=1']:.2f}; "
         f"forward_gradient Q=1 / frozen: {seconds[fg1] / seconds['frozen']:.2f} (what learning costs the client)."),
        f"- forward_gradient server CPU seconds Q=8 / Q=1: {server[fg8] / server[fg1]:.2f} (target within 10%).",
        ("- forward_gradient client peak / floor: "
         + ", ".join(f"{name.split()[-1]} {peaks[name] / floor:.2f}" for name in (fg1, fg8) if name in peaks)
         + " (target <= 1.25)."),
        (f"- The predicted-decrease diagnostic's two passes over the server's gradients and weights: "
         f"{diagnostic_s:.3f} CPU s a step."),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forward_gradient.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
