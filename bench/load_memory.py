"""Peak resident memory of fxtp.load: each rank of a gloo group builds a Llama under
fxtp.init_empty(), transforms it on the meta device and loads its slices from a >= 1 GB
safetensors checkpoint written here (random weights, float32). Prints, per rank, the baseline
RSS (after the transform, before loading), the peak RSS during the load, the rank's shard bytes
and (peak - baseline) / shard. The goal is <= 1.15. With `--dtype bfloat16` the model is built
in bf16 and each tensor is cast while reading: a float32 host buffer of one local tensor is
staged beside the bf16 shard.

    OMP_NUM_THREADS=1 .venv/bin/python bench/load_memory.py [--layers 8] [--hidden 2048]
        [--world-size 2] [--reader direct|safetensors] [--dir DIR] [--dtype bfloat16]

The checkpoint is written one tensor at a time (never the whole model in memory) into a
temporary directory that is removed at the end (unless --dir is given).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def config(args):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512), vocab_size=args.vocab,
        max_position_embeddings=256, tie_word_embeddings=False)


def write_checkpoint(cfg, root: str, max_file_bytes: int = 400 << 20) -> int:
    """The model's state dict as sharded safetensors + index, written tensor by tensor with
    random values: names and shapes come from a meta model, values never all in memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    files: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        b = 4 * int(torch.Size(s).numel())
        if size and size + b > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(k)
        size += b
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, names in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        header, off = {}, 0
        for k in names:
            n = 4 * int(torch.Size(shapes[k]).numel())
            header[k] = {"dtype": "F32", "shape": list(shapes[k]), "data_offsets": [off, off + n]}
            off += n
            weight_map[k] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(root, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k in names:
                t = torch.randn(shapes[k], generator=g) * 0.02
                if k.endswith("norm.weight"):
                    t = torch.ones(shapes[k])
                f.write(t.numpy().tobytes())
                total += t.numel() * 4
                del t
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg.save_pretrained(root)
    return total


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0), so the peak
    measured is the load's, not the capture's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rank_main(rank: int, ws: int, root: str, hidden: int, layers: int, vocab: int, reader: str,
              dtype: str = "float32"):
    from transformers import AutoConfig, AutoModelForCausalLM

    import fxtp

    cfg = AutoConfig.from_pretrained(root)
    t0 = time.perf_counter()
    with fxtp.init_empty():
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    tp = fxtp.transform(model, ws)
    t_transform = time.perf_counter() - t0
    del model
    gc.collect()
    reset = _reset_peak()
    hwm_before = _rss_kb("VmHWM") * 1024
    baseline = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    rep = fxtp.load(tp, root, reader=reader, dtype=getattr(torch, dtype))   # cast while reading
    t_load = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") * 1024
    after = _rss_kb("VmRSS") * 1024
    ids = torch.randint(0, vocab, (1, 8))
    with torch.no_grad():
        logits = tp(input_ids=ids).logits
    return {"rank": rank, "baseline": baseline, "peak": peak, "after": after,
            "shard": rep.bytes_loaded, "read": rep.bytes_read, "full": rep.full_bytes,
            "plan_bytes": tp.meta["fxtp"].plan.local_param_bytes[rank],
            "transform_s": t_transform, "load_s": t_load,
            "peak_reset": reset, "hwm_before": hwm_before,
            "logits_finite": bool(torch.isfinite(logits).all())}


def model_arguments(doc: str, hidden: int) -> argparse.ArgumentParser:
    """The Llama size and world size options of the memory benches."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--world-size", type=int, default=2)
    return ap


def main() -> None:
    ap = model_arguments(__doc__, hidden=2048)
    ap.add_argument("--reader", default="direct", choices=["direct", "safetensors"])
    ap.add_argument("--dir", default=None, help="keep/reuse the checkpoint here")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's dtype: bfloat16 casts the float32 checkpoint while reading")
    args = ap.parse_args()
    from fxtp.testing.ranks import run_ranks

    root = args.dir or tempfile.mkdtemp(prefix="fxtp_load_")
    try:
        if not os.path.exists(os.path.join(root, "model.safetensors.index.json")):
            os.makedirs(root, exist_ok=True)
            t0 = time.perf_counter()
            total = write_checkpoint(config(args), root)
            print(f"wrote {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s to {root}")
        results = run_ranks(rank_main, args.world_size, root, args.hidden, args.layers,
                            args.vocab, args.reader, args.dtype, timeout=1800)
        mib = 2 ** 20
        print(f"reader={args.reader}, world size {args.world_size}, Llama hidden {args.hidden}, "
              f"{args.layers} layers, vocab {args.vocab}, float32 checkpoint, {args.dtype} model")
        print("rank  baseline MiB  peak MiB  shard MiB  read MiB  full MiB  (peak-base)/shard"
              "  transform s  load s")
        for r in sorted(results, key=lambda r: r["rank"]):
            ratio = (r["peak"] - r["baseline"]) / r["shard"]
            print(f"{r['rank']:4d}  {r['baseline'] / mib:12.0f}  {r['peak'] / mib:8.0f}  "
                  f"{r['shard'] / mib:9.0f}  {r['read'] / mib:8.0f}  {r['full'] / mib:8.0f}  "
                  f"{ratio:17.3f}  {r['transform_s']:11.1f}  {r['load_s']:6.1f}"
                  + ("" if r["logits_finite"] else "  (non-finite logits!)")
                  + ("" if r["peak_reset"] else
                     f"  (VmHWM not reset: {r['hwm_before'] / mib:.0f} MiB before loading)"))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
