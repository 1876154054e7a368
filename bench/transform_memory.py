"""Peak resident memory of fxtp.transform on a model that is already in memory: each rank of a
gloo group builds the same Llama with random weights, then transforms it. Prints, per rank, the
model's bytes, the rank's shard (what tp holds), and the peak RSS above the baseline (after the
model was built) over the shard. The goal: transform costs the model (already there) plus one
shard, so the ratio is about 1 (plus the capture's own working memory, which holds no weights).

    OMP_NUM_THREADS=1 .venv/bin/python bench/transform_memory.py [--hidden 1024] [--layers 8]
        [--world-size 2]

Before this measurement existed, `rewrite` deep-copied the captured graph with all its weights
before slicing, so a rank briefly held a second full model: (peak - base) / shard was 1.55 with
the defaults (hidden 1024, 8 layers, world 2); 1.14 since, the rest being the capture's own
working memory.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from load_memory import _reset_peak, _rss_kb, config, model_arguments  # noqa: E402  (bench/ is not a package)


def rank_main(rank: int, ws: int, args) -> dict:
    from transformers import AutoModelForCausalLM

    import fxtp

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args)).eval()
    model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    gc.collect()
    reset = _reset_peak()
    baseline = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    tp = fxtp.transform(model, ws)
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") * 1024
    shard = sum(t.nbytes for t in [*tp.parameters(), *tp.buffers()])
    gc.collect()
    after = _rss_kb("VmRSS") * 1024
    return {"rank": rank, "model": model_bytes, "shard": shard, "baseline": baseline,
            "peak": peak, "after": after, "seconds": seconds, "peak_reset": reset,
            "plan_bytes": tp.meta["fxtp"].plan.local_param_bytes[rank]}


def main() -> None:
    args = model_arguments(__doc__, hidden=1024).parse_args()
    from fxtp.testing.ranks import run_ranks

    results = run_ranks(rank_main, args.world_size, args, timeout=1800)
    mib = 2 ** 20
    print(f"fxtp.transform of a Llama in memory (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, float32), world size {args.world_size}")
    print("rank  model MiB  shard MiB  peak-base MiB  (peak-base)/shard  after-base MiB  "
          "transform s")
    for r in sorted(results, key=lambda r: r["rank"]):
        extra = r["peak"] - r["baseline"]
        print(f"{r['rank']:4d}  {r['model'] / mib:9.0f}  {r['shard'] / mib:9.0f}  "
              f"{extra / mib:13.0f}  {extra / r['shard']:17.3f}  "
              f"{(r['after'] - r['baseline']) / mib:14.0f}  {r['seconds']:11.1f}"
              + ("" if r["peak_reset"] else "  (VmHWM not reset: peak includes the build)"))


if __name__ == "__main__":
    main()
