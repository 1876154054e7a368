"""Prints, for every tiny family in fxtp/testing/families.py and each world size: max error vs the
untouched model on hypothesis-drawn inputs, all-reduces per layer, local fraction of the
linear parameters, and what stayed replicated. One spawn of gloo ranks per world size.

    .venv/bin/python bench/families.py [--world-sizes 2 4] [--examples 5] [--families falcon_mqa bamba]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def measure(rank: int, world_size: int, examples: int, names: list) -> dict:
    import fxtp
    from fxtp.testing.checks import check_equivalence
    from fxtp.testing.families import FAMILIES, family_model
    from fxtp.testing.strategies import hf_inputs_for

    out = {}
    for name in names or FAMILIES:
        model = family_model(name)
        tp = fxtp.transform(model, world_size)
        rep = check_equivalence(model, tp, hf_inputs_for(model, max_seq=16), max_examples=examples)
        plan = tp.meta["fxtp"].plan
        layers = {k: v for k, v in plan.all_reduces.items() if "." in k}
        out[name] = (rep.worst, sorted(set(layers.values())), plan.param_fraction(),
                     sorted({why.split(" at ")[0] for m, why in plan.replicated.items()
                             if m != "lm_head"}))
    return out


def main() -> None:
    from fxtp.testing.ranks import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--families", nargs="+", default=None, help="names of testing/families.py")
    args = ap.parse_args()
    print(f"{'family':<12} {'ws':>3} {'max error':>10} {'AR/layer':>9} {'local linears':>14}  replicated")
    for ws in args.world_sizes:
        t0 = time.perf_counter()
        results = run_ranks(measure, ws, args.examples, args.families, timeout=1800)
        for name, (err, ars, frac, why) in results[0].items():
            worst = max(r[name][0] for r in results)
            print(f"{name:<12} {ws:>3} {worst:>10.2e} {str(ars):>9} {frac:>14.3f}  "
                  f"{'; '.join(why)[:90]}")
        print(f"(world size {ws}: {time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
