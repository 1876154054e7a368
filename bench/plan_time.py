"""Plan time vs layer count for a Llama-3-70B architecture on the meta device (no weights).

    .venv/bin/python bench/plan_time.py [--layers 8 16 32 80] [--full-up-to 16] [--world-size 8]

`fxtp.plan` captures a probe of two repeated layers (fxtp/planning/repeats.py) and writes their
decisions for every layer; `probe=False` captures every layer, which is what the time would be
without it (run only up to --full-up-to layers: it grows with depth). Both are timed in this
process, one after the other; building the meta model is timed apart.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def llama70b(layers: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672,
                               num_hidden_layers=layers, num_attention_heads=64,
                               num_key_value_heads=8, vocab_size=128256,
                               max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def main() -> None:
    import torch

    import fxtp

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 80])
    ap.add_argument("--full-up-to", type=int, default=16)
    ap.add_argument("--world-size", type=int, default=8)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    fxtp.plan(llama70b(4), args.world_size)          # warm-up: imports, first export
    print(f"Llama-3-70B shapes (hidden 8192, 64 heads, 8 kv heads, vocab 128256) on meta, "
          f"world size {args.world_size}")
    print(f"{'layers':>6} {'build s':>8} {'plan s':>7} {'all layers s':>13} {'AR/layer':>8} "
          f"{'rank 0 GiB':>10} {'full GiB':>9}")
    for n in args.layers:
        t = time.perf_counter()
        model = llama70b(n)
        build = time.perf_counter() - t
        t = time.perf_counter()
        plan = fxtp.plan(model, args.world_size)
        probe = time.perf_counter() - t
        full = "-"
        if n <= args.full_up_to:
            t = time.perf_counter()
            whole = fxtp.plan(model, args.world_size, probe=False)
            full = f"{time.perf_counter() - t:.1f}"
            assert whole.mismatches(plan) == [], whole.mismatches(plan)
        per_layer = sorted(set(plan.all_reduces.values()))
        print(f"{n:>6} {build:>8.1f} {probe:>7.1f} {full:>13} {str(per_layer):>8} "
              f"{plan.local_param_bytes[0] / 2**30:>10.2f} {plan.full_param_bytes / 2**30:>9.1f}")


if __name__ == "__main__":
    main()
