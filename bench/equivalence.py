"""Prints, per model and world size: max error vs the untouched model, all-reduces per layer,
and the local fraction of the layers' linear parameters (measured in real gloo ranks).

    .venv/bin/python bench/equivalence.py [--world-sizes 2 4] [--examples 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import fxtp  # noqa: E402
from fxtp.testing.models import tiny_model

CASES = {
    "llama (GQA 4/2)": lambda: tiny_model("llama"),
    "llama (MQA 4/1)": lambda: tiny_model("llama", num_key_value_heads=1),
    "gpt2": lambda: tiny_model("gpt2"),
    "bert": lambda: tiny_model("bert"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--examples", type=int, default=10)
    args = ap.parse_args()
    print(f"{'model':<18} {'ws':>3} {'max error':>10} {'all-reduces/layer':>18} "
          f"{'local linear params':>20} {'time':>6}")
    for name, build in CASES.items():
        for ws in args.world_sizes:
            model = build()
            plan = fxtp.plan(model, ws)
            t0 = time.perf_counter()
            reports = fxtp.verify(model, ws, max_examples=args.examples)
            worst = max(max(r["max_error"].values()) for r in reports)
            per_layer = sorted(set(plan.all_reduces.values()))
            print(f"{name:<18} {ws:>3} {worst:>10.2e} {str(per_layer):>18} "
                  f"{plan.param_fraction():>20.3f} {time.perf_counter() - t0:>5.1f}s", flush=True)


if __name__ == "__main__":
    main()
