"""Time and peak resident memory of fxtp.save, per rank, against the rank's shard.

Each rank of a gloo group builds a Llama under fxtp.init_empty(), transforms it, loads its
slices of a float32 checkpoint written here (>= 1 GB, random weights), then saves the model
with fxtp.save. Printed per rank, measured side by side in the same run: the load and save
times, the RSS before saving (the shard and the process), the peak RSS during the save, the
shard, the largest tensor the rank wrote, and (peak - before) / shard and / largest tensor.
The goal: no rank holds the full model, so (peak - before) stays about one tensor (the
largest it writes, assembled from the ranks' slices), far below the shard once the model has
more than a few tensors per rank. The saved tensors are then compared with the checkpoint,
one at a time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/save.py [--layers 4] [--hidden 2048]
        [--world-size 2]
"""
from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.load_memory import (  # noqa: E402 - after the path set-up
    _reset_peak,
    _rss_kb,
    config,
    model_arguments,
    write_checkpoint,
)


def rank_main(rank: int, ws: int, root: str, out: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import fxtp

    cfg = AutoConfig.from_pretrained(root)
    with fxtp.init_empty():
        model = AutoModelForCausalLM.from_config(cfg)
    tp = fxtp.transform(model, ws)
    del model
    t0 = time.perf_counter()
    load = fxtp.load(tp, root)
    t_load = time.perf_counter() - t0
    gc.collect()
    reset = _reset_peak()
    before = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    rep = fxtp.save(tp, out)
    t_save = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") * 1024
    return {"rank": rank, "load_s": t_load, "save_s": t_save, "before": before, "peak": peak,
            "shard": load.bytes_loaded, "written": rep.bytes_written, "files": rep.written,
            "largest": rep.largest_tensor, "staged": rep.peak_staged, "peak_reset": reset}


def same_tensors(a: str, b: str) -> tuple[int, int]:
    """(tensors equal, tensors in b): read one tensor at a time from each checkpoint."""
    import json

    from safetensors import safe_open

    def where(d: str) -> dict[str, str]:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            return {k: os.path.join(d, v) for k, v in json.load(f)["weight_map"].items()}

    wa, wb = where(a), where(b)
    equal = 0
    for name, fb in wb.items():
        if name in wa:
            with safe_open(wa[name], "pt") as x, safe_open(fb, "pt") as y:
                equal += bool(torch.equal(x.get_tensor(name), y.get_tensor(name)))
    return equal, len(wb)


def main() -> None:
    ap = model_arguments(__doc__, hidden=2048)
    ap.set_defaults(layers=4)
    args = ap.parse_args()
    from fxtp.testing.ranks import run_ranks

    root = tempfile.mkdtemp(prefix="fxtp_save_")
    try:
        src, out = os.path.join(root, "source"), os.path.join(root, "saved")
        os.makedirs(src)
        total = write_checkpoint(config(args), src)
        results = run_ranks(rank_main, args.world_size, src, out, timeout=1800)
        mib = 2 ** 20
        print(f"fxtp.save, world size {args.world_size}, Llama hidden {args.hidden}, "
              f"{args.layers} layers, vocab {args.vocab}, float32, {total / 2**30:.2f} GiB")
        print("rank  load s  save s  before MiB  peak MiB  shard MiB  written MiB  largest MiB"
              "  (peak-before)/shard  (peak-before)/largest")
        for r in sorted(results, key=lambda r: r["rank"]):
            extra = r["peak"] - r["before"]
            print(f"{r['rank']:4d}  {r['load_s']:6.1f}  {r['save_s']:6.1f}  "
                  f"{r['before'] / mib:10.0f}  {r['peak'] / mib:8.0f}  {r['shard'] / mib:9.0f}  "
                  f"{r['written'] / mib:11.0f}  {r['largest'] / mib:11.0f}  "
                  f"{extra / r['shard']:19.3f}  {extra / max(1, r['largest']):21.3f}"
                  + ("" if r["peak_reset"] else "  (VmHWM not reset)"))
        equal, n = same_tensors(out, src)
        print(f"saved tensors equal to the checkpoint loaded: {equal} of {n}; files "
              f"{sorted(os.listdir(out))}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
