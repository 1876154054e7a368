"""Forward time of one family of fxtp/testing/families.py, widened, at long sequences: the
untouched model against fxtp at world 1 (in process) and at world 2 (gloo ranks, one thread
each, a round lasting as long as its slowest rank), measured side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/family_speed.py [--family falcon_mqa]
        [--hidden 512] [--heads 8] [--layers 2] [--seq 2048 4096] [--repeats 5]
        [--set mamba_n_heads=64]

Prints per length the median times and the ratios fxtp/model (goal: world 1 <= 1.02, world 2
below 1: each rank computes its shard of every linear and of attention). The model and the
world-1 graph run in turns, round by round; their ratio is the median of the rounds' ratios.
`--set` overrides other config fields the wider size needs (Bamba: mamba_n_heads x
mamba_d_head = 2 x hidden).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(args: dict):
    """The family's tiny config (fxtp/testing/families.py) widened to --hidden / --heads /
    --layers, random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fxtp.testing.families import FAMILIES

    kwargs = {**FAMILIES[args["family"]], "hidden_size": args["hidden"],
              "num_attention_heads": args["heads"], "num_hidden_layers": args["layers"],
              "vocab_size": 1000, "max_position_embeddings": max(args["seq"]), **args["set"]}
    if "intermediate_size" in kwargs:          # the MLP widened with the rest
        kwargs["intermediate_size"] = 4 * args["hidden"]
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def timed(fns: list, repeats: int) -> list[list[float]]:
    """Seconds of each of `fns` per round, after 2 warm-up rounds; in a round each runs once."""
    import torch

    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for round_ in range(repeats + 2):
            for fn, out in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                if round_ >= 2:
                    out.append(time.perf_counter() - t0)
    return times


def rank_times(rank: int, ws: int, args: dict) -> dict:
    import torch
    import torch.distributed as dist

    import fxtp

    torch.set_num_threads(1)
    model = build(args)
    tp = fxtp.transform(model, ws)
    out = {}
    for seq in args["seq"]:
        ids = torch.randint(0, model.config.vocab_size, (1, seq))

        def step():
            dist.barrier()
            tp(input_ids=ids)
            dist.barrier()
        out[seq] = statistics.median(timed([step], args["repeats"])[0])
    return out


def main() -> None:
    import torch

    import fxtp
    from fxtp.testing.ranks import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="falcon_mqa")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], help="config field=int")
    args = vars(ap.parse_args())
    args["set"] = {k: int(v) for k, v in (kv.split("=") for kv in args["set"])}
    torch.set_num_threads(1)
    model = build(args)
    one = fxtp.transform(model, 1)
    ranks = run_ranks(rank_times, 2, args, timeout=1800)
    print(f"{args['family']}: hidden {args['hidden']}, {args['heads']} heads, "
          f"{args['layers']} layers, batch 1, fp32, one thread per process")
    print(f"{'tokens':>7} {'model s':>9} {'world 1 s':>10} {'w1/model':>9} {'world 2 s':>10} "
          f"{'w2/model':>9}")
    for seq in args["seq"]:
        ids = torch.randint(0, model.config.vocab_size, (1, seq))
        base, w1 = timed([lambda: model(input_ids=ids), lambda: one(input_ids=ids)],
                         args["repeats"])
        ratio = statistics.median(b / a for a, b in zip(base, w1))
        base, w1, w2 = statistics.median(base), statistics.median(w1), max(r[seq] for r in ranks)
        print(f"{seq:>7} {base:>9.3f} {w1:>10.3f} {ratio:>9.3f} {w2:>10.3f} {w2 / base:>9.3f}")


if __name__ == "__main__":
    main()
