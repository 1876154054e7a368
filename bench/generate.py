"""Prints tensor-parallel decoding (fxtp.generator at world 2, gloo ranks, one thread each)
next to the untouched model's `generate` in one process (one thread), measured in the same
run on the same machine: decode tokens/s, their ratio, the KV cache bytes per rank vs the full
cache, and whether the greedy tokens are equal.

Decode tokens/s = batch x (N2 - N1) / (t(N2 new tokens) - t(N1 new tokens)): the prefill cost
cancels out. Each time is the median of `--repeats` runs.

    .venv/bin/python bench/generate.py [--model llama|gpt2|<family>] [--hidden 256 --layers 4]
        [--batch 1 --max-batch 8] [--cuda-graph auto|on|off|emulate] [--device cuda --ws 0]

`--max-batch` builds the generators for more prompts than `--batch` (a small batch on a large
generator should cost what its rows cost); `--ws 0` skips the gloo ranks (e.g. on a GPU, where
the world-1 generator runs on `--device` and decodes through CUDA graphs by default).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def build(name: str, hidden: int, layers: int):
    """The named tiny model, optionally widened (heads of 16 features kept)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fxtp.testing.families import FAMILIES
    from fxtp.testing.models import TINY

    kw = dict(FAMILIES.get(name) or TINY[name])
    kw.setdefault("vocab_size", 128)
    if hidden:
        heads = hidden // 16
        if "n_embd" in kw:
            kw.update(n_embd=hidden, n_head=heads, n_layer=layers or kw["n_layer"])
        else:
            kv = kw.get("num_key_value_heads")
            kw.update(hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=hidden * 4 if "intermediate_size" in kw else None,
                      num_hidden_layers=layers or kw["num_hidden_layers"])
            if kv:
                kw["num_key_value_heads"] = max(1, heads // 2)
            kw = {k: v for k, v in kw.items() if v is not None}
    import torch

    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prompt(vocab: int, batch: int, length: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab, (batch, length), generator=g)


def _decode_rate(gen_fn, batch: int, n1: int, n2: int, repeats: int) -> float:
    gen_fn(n1)   # warm up
    t1 = _time(lambda: gen_fn(n1), repeats)
    t2 = _time(lambda: gen_fn(n2), repeats)
    return batch * (n2 - n1) / max(t2 - t1, 1e-9)


def tp_rank(rank: int, ws: int, args: dict) -> dict:
    import warnings

    import torch

    import fxtp

    warnings.filterwarnings("ignore")
    model = build(args["model"], args["hidden"], args["layers"]).to(getattr(torch, args["dtype"]))
    ids = _prompt(model.config.vocab_size, args["batch"], args["prompt"])
    t0 = time.perf_counter()
    gen = fxtp.generator(model, ws, max_len=args["prompt"] + args["n2"],
                         max_batch=args["max_batch"] or args["batch"],
                         cuda_graph=args["cuda_graph"])
    build_s = time.perf_counter() - t0
    kw = dict(do_sample=False, pad_token_id=0)
    rate = _decode_rate(lambda n: gen.generate(ids, max_new_tokens=n, **kw), args["batch"],
                        args["n1"], args["n2"], args["repeats"])
    tokens = gen.generate(ids, max_new_tokens=args["n2"], **kw)
    return {"rate": rate, "build_s": build_s, "cache_bytes": gen.cache_bytes(),
            "full_cache_bytes": gen.full_cache_bytes, "tokens": tokens.tolist(),
            "cache_shape": tuple(next(iter(gen.cache().values())).shape)}


def main() -> None:
    import torch

    from fxtp.testing.ranks import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--hidden", type=int, default=0, help="widen the tiny model (0: as is)")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--n1", type=int, default=8)
    ap.add_argument("--n2", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ws", type=int, default=2, help="0: no gloo ranks")
    ap.add_argument("--max-batch", type=int, default=0, help="generator's max_batch (0: --batch)")
    ap.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off", "emulate"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = vars(ap.parse_args())
    args["cuda_graph"] = {"auto": None, "on": True, "off": False}.get(args["cuda_graph"],
                                                                      args["cuda_graph"])

    torch.set_num_threads(1)
    model = build(args["model"], args["hidden"], args["layers"])
    model = model.to(args["device"], getattr(torch, args["dtype"]))
    ids = _prompt(model.config.vocab_size, args["batch"], args["prompt"]).to(args["device"])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf_rate = _decode_rate(lambda n: model.generate(ids, max_new_tokens=n, **kw),
                               args["batch"], args["n1"], args["n2"], args["repeats"])
        ref = model.generate(ids, max_new_tokens=args["n2"], **kw).tolist()
    import fxtp

    one = fxtp.generator(model, 1, max_len=args["prompt"] + args["n2"],
                         max_batch=args["max_batch"] or args["batch"],
                         cuda_graph=args["cuda_graph"])
    one_rate = _decode_rate(lambda n: one.generate(ids, max_new_tokens=n, **kw), args["batch"],
                            args["n1"], args["n2"], args["repeats"])
    one_tokens, mode = one.generate(ids, max_new_tokens=args["n2"], **kw).tolist(), one.decode_mode
    one = None     # free the world-1 copy before the ranks build theirs
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args['model']} ({params / 1e6:.2f}M params, {args['dtype']} on "
          f"{args['device']}), batch {args['batch']} (generators' max_batch "
          f"{args['max_batch'] or args['batch']}), prompt {args['prompt']}, decode measured "
          f"between {args['n1']} and {args['n2']} new tokens")
    print(f"  model.generate, 1 process, 1 thread : {hf_rate:8.1f} tokens/s")
    print(f"  fxtp.generator, world 1, 1 thread : {one_rate:8.1f} tokens/s (the step graph alone, "
          f"decode {mode}, ratio {one_rate / hf_rate:.2f}; tokens equal: {one_tokens == ref})")
    if args["ws"] < 2:
        return
    args["device"] = "cpu"
    ranks = run_ranks(tp_rank, args["ws"], args, timeout=1200)
    r = ranks[0]
    print(f"  fxtp.generator, world {args['ws']} (gloo)   : {r['rate']:8.1f} tokens/s per rank set "
          f"(ratio {r['rate'] / hf_rate:.2f}; ranks: "
          + ", ".join(f"{x['rate']:.1f}" for x in ranks) + ")")
    print(f"  KV cache per rank: {r['cache_bytes']} bytes vs {r['full_cache_bytes']} full "
          f"({r['cache_bytes'] / r['full_cache_bytes']:.3f}); each cache tensor {r['cache_shape']}")
    print(f"  greedy tokens equal to model.generate on every rank: "
          f"{all(x['tokens'] == ref for x in ranks)}; build {r['build_s']:.1f} s")


if __name__ == "__main__":
    main()
