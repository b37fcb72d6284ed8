"""Measure the client's peak memory for one step of each mode at the same cut (CPU, torch MemTracker).

    python examples/client_memory.py

Prints one row per mode plus the pure-inference floor (weights + one forward). A small Llama-shaped
model with random weights: memory does not depend on the values.
"""

from __future__ import annotations

import torch

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.measurement import measure_client_inference, measure_client_step
from hosl_lightning.modes import ZOSettings

CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2)
CUT, BATCH, SEQ, QUERIES = 2, 16, 64, 2


def fresh() -> SplitCausalLM:
    torch.manual_seed(0)
    return SplitCausalLM(load_causal_lm(model_config=CONFIG), CUT)


def main() -> None:
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = {mode: measure_client_step(fresh(), batch, mode, ZOSettings(queries=QUERIES)) for mode in ("fo", "zo", "hosl")}
    rows["floor"] = measure_client_inference(fresh(), batch)
    print(f"cut={CUT} batch={BATCH} seq={SEQ} q={QUERIES}; client peak memory in MiB")
    print(f"{'mode':6} {'peak':>7} {'params':>7} {'activ.':>7} {'temp':>7} {'optim':>7}")
    for mode, m in rows.items():
        mib = lambda b: b / 2**20  # noqa: E731
        print(f"{mode:6} {mib(m.peak):7.2f} {mib(m.params):7.2f} {mib(m.activations):7.2f} "
              f"{mib(m.temporaries):7.2f} {mib(m.optimizer_state):7.2f}")
    print(f"fo/hosl peak ratio: {rows['fo'].peak / rows['hosl'].peak:.2f}; "
          f"hosl/floor: {rows['hosl'].peak / rows['floor'].peak:.2f}")


if __name__ == "__main__":
    main()
