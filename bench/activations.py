"""Sequence parallelism against the all-reduce layout, per rank: activation bytes saved for
backward, bytes communicated per token, and forward+backward time, side by side in one run.

Each rank of a gloo group builds the same Llama-shaped model and transforms it three times:
without `sequence_parallel=True`, with it, and with it but the gathered inputs saved whole
(`fxtp.for_training(tp, regather=False)`). Saved bytes are counted in one training forward by a
saved-tensors hook (`fxtp.testing.memory`: each storage once, weights not counted; it packs
through fxtp's regather, so an all-gathered input its readers gather again in backward counts
as the rank's tokens it keeps). The untouched model is counted the
same way, in the same process. Communication is counted by a dispatch mode that sees every
functional collective the graph runs, forward and backward, as the bytes one rank sends
with ring algorithms (an all-reduce of B bytes: 2 (N - 1) / N x B; a reduce-scatter of B
bytes or an all-gather into B bytes: (N - 1) / N x B).

    OMP_NUM_THREADS=1 .venv/bin/python bench/activations.py [--hidden 256] [--layers 4]
        [--seq 256] [--batch 2] [--world-sizes 2 4] [--repeats 5]

"replicated region": saved tensors whose last dim is the hidden width (the norms' inputs and
outputs, the residual stream, the inputs of column-parallel linears): every rank holds them
whole in the all-reduce layout, its own tokens of them with sequence parallelism (goal: at
most 1/N + 5% of the all-reduce layout's). `[b, ., s, s]` counts saved masks and attention
weights: they grow with the square of the sequence.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def config(args):
    from transformers import AutoConfig

    # 3 x hidden: a rank's share of the MLP width never equals the hidden width (at 4 x, a
    # world-4 rank's quarter would be counted as the replicated region)
    return AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=8,
                                num_key_value_heads=8, vocab_size=512, use_cache=False)


def saved_bytes(module: torch.nn.Module, ids: torch.Tensor, width: int) -> tuple[int, int, int]:
    """(every saved activation's bytes, those whose last dim is `width`, those shaped
    `[batch, ., seq, seq]`) of one training forward, then its backward."""
    from fxtp.testing.memory import saved_activation_bytes

    got = saved_activation_bytes(module, lambda: module(input_ids=ids).logits, width)
    got["output"].float().pow(2).mean().backward()
    return got["total"], got["width"], got["square"]


class Sent(TorchDispatchMode):
    """Bytes one rank sends in the functional collectives it runs (ring algorithms)."""

    def __init__(self, world_size: int):
        super().__init__()
        self.n, self.bytes = world_size, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("_c10d_functional::"):
            x, share = args[0], (self.n - 1) / self.n
            if "all_reduce" in name:
                self.bytes += 2 * share * x.nbytes
            elif "reduce_scatter" in name:
                self.bytes += share * x.nbytes
            elif "all_gather" in name:
                self.bytes += share * x.nbytes * self.n
        return func(*args, **(kwargs or {}))


def sent_per_token(module, ids, world_size: int) -> tuple[float, float]:
    """(forward, backward) bytes sent per token by this rank in one training step."""
    with Sent(world_size) as fwd:
        out = module(input_ids=ids).logits
    loss = out.float().pow(2).mean()
    with Sent(world_size) as bwd:
        loss.backward()
    return fwd.bytes / ids.numel(), bwd.bytes / ids.numel()


def step_seconds(modules: dict, ids, repeats: int) -> dict:
    """Median forward+backward seconds of each module, the modules taking turns."""
    times: dict = {k: [] for k in modules}
    for _ in range(repeats):
        for name, m in modules.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            m(input_ids=ids).logits.float().pow(2).mean().backward()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rank_main(rank: int, ws: int, args) -> dict:
    from transformers import AutoModelForCausalLM

    import fxtp

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args)).train()
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    plan = fxtp.plan(model, ws)
    sp = plan.replan(sequence_parallel=True)
    layouts = {"all-reduce": fxtp.for_training(fxtp.transform(model, ws, plan=plan)),
               "sequence": fxtp.for_training(fxtp.transform(model, ws, plan=sp)),
               # the gathered inputs saved whole: fewer bytes sent, less memory saved
               "no regather": fxtp.for_training(fxtp.transform(model, ws, plan=sp),
                                                regather=False)}
    out = {name: {"saved": saved_bytes(tp, ids, args.hidden),
                  "sent": sent_per_token(tp, ids, ws)} for name, tp in layouts.items()}
    seconds = step_seconds(layouts, ids, args.repeats)
    for name in layouts:
        out[name]["seconds"] = seconds[name]
    out["model"] = saved_bytes(model, ids, args.hidden) if rank == 0 else (0, 0, 0)
    return out


def main() -> None:
    from fxtp.testing.ranks import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    mb = 1 / 2 ** 20
    print(f"Llama-shaped: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
          f"seq {args.seq}, fp32; per rank: saved-for-backward MiB, bytes sent per token "
          f"(forward / backward), forward+backward seconds (median of {args.repeats})")
    for ws in args.world_sizes:
        ranks = run_ranks(rank_main, ws, args, timeout=1800)
        total, region, square = ranks[0]["model"]
        print(f"world {ws}: untouched model {total * mb:7.1f} (replicated region "
              f"{region * mb:6.1f}, [b, ., s, s] {square * mb:6.1f})")
        for r, out in enumerate(ranks):
            base = out["all-reduce"]
            for name in ("all-reduce", "sequence", "no regather"):
                t, w, q = out[name]["saved"]
                fwd, bwd = out[name]["sent"]
                line = (f"  rank {r} {name:>11}: saved {t * mb:7.1f} = {t / total:.3f} of the "
                        f"model; region {w * mb:6.1f} = {w / base['saved'][1]:.3f} of the "
                        f"all-reduce layout's; [b, ., s, s] {q * mb:5.1f}; sent/token "
                        f"{fwd:7.1f} / {bwd:7.1f} B; {out[name]['seconds'] * 1e3:7.1f} ms")
                if name != "all-reduce":
                    line += (f" ({out[name]['seconds'] / base['seconds']:.2f}x); sent "
                             f"{(fwd + bwd) / sum(base['sent']):.3f}x")
                print(line)


if __name__ == "__main__":
    main()
