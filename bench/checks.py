"""What fxtp's agreement checks cost, measured side by side in one run on gloo ranks.

1. `check_weights` (on by default): `fxtp.transform(model, ws, plan=plan)` with the check on and
   off, alternated, the same capture shared; the median of each and their ratio (noisy: the
   transform's own time varies by 20% from run to run on CPU). Then what the check adds,
   timed inside the transform: the checksums (`WeightDigests.read`, called by the rewrite's
   own reads) and the gather (which also waits for the slower rank, as the graph's first
   all-reduce would); the checksums of every tensor alone; and `read_late`, the tensors whose
   checksum was not taken during the rewrite's own read (0: no extra pass).
2. `check_inputs` (off by default): the time per call of `tp(**inputs)` with the check on and
   off, alternated, and the difference per call (a barrier, a roll-call write and a gather of a
   few int64, plus a host sync).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checks.py [--hidden 1024] [--layers 8]
        [--world-size 2] [--calls 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from load_memory import config  # noqa: E402  (bench/ is not a package)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rank_main(rank: int, ws: int, args) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import fxtp
    import fxtp.runtime.weight_check as weight_check
    from fxtp.graph.tensors import tensor_attrs
    from fxtp.runtime.agreement import tensor_digest

    spent = {"read": 0.0, "check": 0.0}     # inside transform: checksums, and the gather

    def timing(fn, key):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return timed

    weight_check.WeightDigests.read = timing(weight_check.WeightDigests.read, "read")
    weight_check.WeightDigests.check = timing(weight_check.WeightDigests.check, "check")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args)).eval()
    plan = fxtp.plan(model, ws, probe=False)    # the whole capture, shared by every transform
    on, off, reads, checks = [], [], [], []
    for i in range(2 * args.repeats):        # alternated, each first in turn
        check = (i % 2 == 0) == (i // 2 % 2 == 0)
        spent.update(read=0.0, check=0.0)
        dist.barrier()
        (on if check else off).append(
            _timed(lambda: fxtp.transform(model, ws, plan=plan, check_weights=check)))
        if check:
            reads.append(spent["read"])
            checks.append(spent["check"])
    tensors = list({id(t): t for t in tensor_attrs(plan.captured.gm).values()}.values())
    digest_only = statistics.median(_timed(lambda: [tensor_digest(t) for t in tensors])
                                    for _ in range(args.repeats))
    tp = fxtp.transform(model, ws, plan=plan, check_inputs=True)
    info = tp.meta[fxtp.META_KEY]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    checked, unchecked = [], []
    with torch.no_grad():
        tp(input_ids=ids)
        for _ in range(args.calls):
            info.state.check_inputs = True
            dist.barrier()
            checked.append(_timed(lambda: tp(input_ids=ids)))
            info.state.check_inputs = False
            dist.barrier()
            unchecked.append(_timed(lambda: tp(input_ids=ids)))
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"model_mib": model_bytes / 2 ** 20, "transform_on": statistics.median(on),
            "in_reads": statistics.median(reads), "in_check": statistics.median(checks),
            "transform_off": statistics.median(off), "digest_only": digest_only,
            "read_late": info.weight_check.read_late if info.weight_check else None,
            "checked_tensors": info.weight_check.tensors if info.weight_check else None,
            "call_on": statistics.median(checked), "call_off": statistics.median(unchecked)}


def main() -> None:
    from fxtp.testing.ranks import run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    args = p.parse_args()
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, "
          f"world {args.world_size} (gloo, CPU), torch {torch.__version__}")
    for rank, r in enumerate(run_ranks(rank_main, args.world_size, args, timeout=1800)):
        print(f"rank {rank}: model {r['model_mib']:.0f} MiB, {r['checked_tensors']} tensors "
              f"checked, read_late={r['read_late']}")
        print(f"  transform: check_weights on {r['transform_on']:.3f} s, off "
              f"{r['transform_off']:.3f} s, ratio {r['transform_on'] / r['transform_off']:.3f} "
              f"(checksums alone {r['digest_only']:.3f} s)")
        print(f"    inside transform: checksums {r['in_reads']:.3f} s "
              f"({r['in_reads'] / r['transform_off']:.1%} of the transform), check "
              f"{r['in_check']:.3f} s (the gather, including the wait for the slower rank)")
        print(f"  call ({args.batch}x{args.seq} tokens): check_inputs on "
              f"{r['call_on'] * 1e3:.2f} ms, off {r['call_off'] * 1e3:.2f} ms, "
              f"+{(r['call_on'] - r['call_off']) * 1e3:.2f} ms per call "
              f"(ratio {r['call_on'] / r['call_off']:.3f})")


if __name__ == "__main__":
    main()
