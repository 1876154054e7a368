"""Prints how the world_size=1 fxtp graph compiles and runs next to the untouched model, both
under torch.compile (inductor, fullgraph=True so no graph break), measured side by side in one
run: compile time, graphs compiled after each new batch/sequence size (a counting backend in
front of inductor), and the median latency ratio (fxtp / model).

    .venv/bin/python bench/compile.py [--model llama] [--repeats 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SIZES = ((2, 16), (3, 24), (4, 32))


def _latency(fn, ids, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import torch

    import fxtp
    from fxtp.cli import _load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model = _load_model(args.model)
    tp = fxtp.transform(model, 1)
    vocab = model.config.vocab_size
    rows = []
    for name, module, call in (
            ("model", model, lambda m, ids: m(input_ids=ids, use_cache=False).logits),
            ("fxtp ws=1", tp, lambda m, ids: m(input_ids=ids).logits)):
        torch._dynamo.reset()
        graphs: list[int] = []

        def counting_inductor(gm, example_inputs, graphs=graphs):
            from torch._inductor.compile_fx import compile_fx

            graphs.append(len(gm.graph.nodes))
            return compile_fx(gm, example_inputs)

        # fullgraph=True: a graph break would raise, so a run that finishes has none
        compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counting_inductor)
        first = torch.randint(0, vocab, SIZES[0])
        t0 = time.perf_counter()
        with torch.no_grad():
            call(compiled, first)
            compile_s = time.perf_counter() - t0
            counts = []
            for b, s in SIZES:
                call(compiled, torch.randint(0, vocab, (b, s)))
                counts.append(len(graphs))
            ids = torch.randint(0, vocab, SIZES[-1])
            lat = _latency(lambda x: call(compiled, x), ids, args.repeats)
        rows.append((name, compile_s, counts, lat))
    print(f"{args.model}: torch.compile(fullgraph=True, dynamic=True), CPU, median of "
          f"{args.repeats} runs at batch x seq = {SIZES[-1]}")
    print(f"{'graph':<10} {'compile s':>9} {'graphs compiled after each size':>32} "
          f"{'latency ms':>10}")
    for name, c, counts, lat in rows:
        print(f"{name:<10} {c:9.1f} {str(counts):>32} {lat * 1e3:10.2f}")
    print("graph breaks: 0 for both (fullgraph=True)")
    print(f"latency ratio fxtp / model: {rows[1][3] / rows[0][3]:.3f}")


if __name__ == "__main__":
    main()
