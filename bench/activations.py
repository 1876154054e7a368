"""Activation bytes saved for backward, per rank, in the all-reduce layout: the baseline that
sequence parallelism (issue 19) is measured against. Each rank of a gloo group builds the same
Llama-shaped model, transforms it and runs one forward under a saved-tensors hook that counts
every activation autograd keeps for backward (each storage once; the weights are not counted). The untouched model is counted
the same way, in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/activations.py [--hidden 256] [--layers 4]
        [--seq 256] [--batch 2] [--world-sizes 2 4]

"replicated region" is what every rank holds whole: saved tensors of `batch x seq x hidden`
elements (the norms' inputs and outputs, the residual stream, the inputs of column-parallel
linears). Sequence parallelism would hold 1/N of it per rank; the rest (sharded attention and
MLP activations) is 1/N already. `[b, ., s, s]` counts saved masks and attention weights: they
grow with the square of the sequence.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def config(args):
    from transformers import AutoConfig

    # 3 x hidden: a rank's share of the MLP width never equals the hidden width (at 4 x, a
    # world-4 rank's quarter would be counted as the replicated region)
    return AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=8,
                                num_key_value_heads=8, vocab_size=512, use_cache=False)


def saved_bytes(module: torch.nn.Module, ids: torch.Tensor, width: int) -> tuple[int, int, int]:
    """(every saved activation's bytes, those of `batch x seq x width` elements, those shaped
    `[batch, ., seq, seq]`: masks and attention weights), one forward; the weights (and views
    of them: a linear saves its weight transposed) are not counted."""
    seen: set = {(p.untyped_storage().data_ptr(), p.dtype) for p in module.parameters()}
    total, whole, square = [0], [0], [0]
    tokens = ids.numel()
    batch, seq = ids.shape

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            n = t.untyped_storage().nbytes()
            total[0] += n
            if t.numel() == tokens * width and t.shape[-1] == width and t.dim() <= 3:
                whole[0] += n
            if t.dim() == 4 and t.shape[0] == batch and tuple(t.shape[2:]) == (seq, seq):
                square[0] += n
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    return total[0], whole[0], square[0]


def rank_main(rank: int, ws: int, args) -> dict:
    from transformers import AutoModelForCausalLM

    import fxtp

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args)).train()
    ids = torch.randint(0, 512, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    tp = fxtp.for_training(fxtp.transform(model, ws))
    mine = saved_bytes(tp, ids, args.hidden)
    full = saved_bytes(model, ids, args.hidden) if rank == 0 else (0, 0, 0)
    return {"tp": mine, "model": full}


def main() -> None:
    from fxtp.testing.ranks import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    mb = 1 / 2 ** 20
    print(f"Llama-shaped: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
          f"seq {args.seq}, fp32; saved-for-backward MiB per rank, all-reduce layout")
    for ws in args.world_sizes:
        ranks = run_ranks(rank_main, ws, args, timeout=900)
        total, whole, square = ranks[0]["model"]
        print(f"world {ws}: untouched model {total * mb:7.1f} (replicated region "
              f"{whole * mb:6.1f}, [b, ., s, s] {square * mb:6.1f})")
        for r, out in enumerate(ranks):
            t, w, q = out["tp"]
            print(f"  rank {r}: {t * mb:7.1f} = {t / total:.3f} of the model; replicated region "
                  f"{w * mb:6.1f} = {w / whole:.3f} of the model's, {w / t:.0%} of this rank's; "
                  f"[b, ., s, s] {q * mb:6.1f}")


if __name__ == "__main__":
    main()
