"""fxtp on a GPU, measured side by side with the untouched Hugging Face model in one run.

    python bench/gpu.py                      # one GPU, <= 5 minutes (Llama 0.85B, bf16)
    python bench/gpu.py --quick              # a smaller Llama (hidden 1024, 4 layers)
    python bench/gpu.py --device cpu --quick # smoke test without a GPU (tiny Llama, seconds)

No virtual environment, no internet, no downloads: it imports fxtp from this checkout and the
torch / transformers installed beside it, and builds Llama-shaped models from configs with
random weights. Prints one labelled line per figure, with the goal beside it:

- forward at world 1 against the model, eager (goal <= 1.02x) and torch.compile'd, with and
  without an attention_mask (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 5632,
  vocab 32000, bf16; batch 8 x 512 tokens); contenders interleaved round by round, CUDA
  events, median of N, ratios are medians of the per-round ratios;
- greedy decode tokens/s at batch 1 and 8, fxtp.generator against `model.generate` (dynamic
  cache, eager) and against `generate(cache_implementation="static")` (compiled), and as a
  fraction of the HBM limit (bytes of weights + KV cache read per step / bandwidth); goals at
  batch 1: compiled >= 40% of the limit and >= 1.2x HF's compiled static-cache generate;
- greedy tokens equal to HF's (the first new-token position that differs, if any);
- recompiles during the timed decode calls (goal 0: none per token);
- peak device memory of transform and of fxtp.load against the rank's shard;
- meta build -> transform -> fxtp.load(device=, dtype=) of a checkpoint written to /tmp,
  equal to the model;
- two ranks on one GPU over gloo, against the model;
- with 2+ GPUs: TP=2 (and 4) over NCCL, forward and decode against world 1.

Each section runs in its own try/except (a failure prints its error and the run goes on) and is
skipped when the time budget (`--budget`, default 280 s) would not leave it enough time; the
most important sections run first.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)            # this checkout's fxtp, no install needed
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GOAL_EAGER_FORWARD = 1.02       # world-1 eager forward / model
GOAL_BANDWIDTH = 0.40           # compiled decode at batch 1, fraction of the HBM limit
GOAL_VS_HF_STATIC = 1.2         # compiled decode at batch 1 / HF's compiled static-cache generate
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}   # see _rel_err

# HBM bandwidth in TB/s by GPU name (first match); --bandwidth overrides
BANDWIDTHS = [("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35), ("GH200", 4.0),
              ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935),
              ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6), ("L4", 0.3)]


@dataclass(frozen=True)
class Shape:
    """A Llama config and the workload sizes run on it."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int          # forward batch
    seq: int            # forward sequence length
    prompt: int         # decode prompt length
    new_tokens: int     # decode: new tokens per timed generate


FULL = Shape(2048, 16, 32, 8, 5632, 32000, batch=8, seq=512, prompt=128, new_tokens=128)
QUICK_CUDA = Shape(1024, 4, 16, 4, 2816, 32000, batch=8, seq=256, prompt=64, new_tokens=64)
QUICK_CPU = Shape(64, 2, 4, 2, 128, 128, batch=2, seq=16, prompt=8, new_tokens=8)

# seconds a section needs on the full shape with cold compile caches (inductor compiles a
# 16-layer graph in ~30 s): it is skipped when less is left (quick shapes: a fraction of it)
NEEDS = {"forward": 40, "decode1": 35, "decode_compiled": 110, "meta": 50, "gloo": 50,
         "nccl": 120, "decode8": 35, "compiled": 130}
SECTIONS = ("forward", "decode1", "meta", "gloo", "nccl", "decode8", "compiled")


# ---------------------------------------------------------------------------------------------
# output

def figure(label: str, value: str, goal: Optional[str] = None, met: Optional[bool] = None) -> None:
    """One labelled figure per line, with its goal and whether it is met."""
    tail = ""
    if goal is not None:
        tail = f"   [goal {goal}" + ("" if met is None else (": met" if met else ": NOT met")) + "]"
    print(f"  {label:<58} {value}{tail}", flush=True)


def note(text: str) -> None:
    print(f"  - {text}", flush=True)


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def size(n: float) -> str:
    """Bytes in GB, or MB below 0.1 GB (the CPU smoke test's tiny model)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


# ---------------------------------------------------------------------------------------------
# state shared by the sections

@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    start: float
    bandwidth: float = 0.0                  # bytes/s
    compile_backend: str = "inductor"
    model: Any = None                       # the untouched model on the device
    tp: Any = None                          # fxtp.transform(model, 1)
    decode: dict = field(default_factory=dict)   # batch -> results of the decode section
    skipped: list = field(default_factory=list)  # sections the budget left out, whole or part

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def need(self, key: str) -> float:
        return NEEDS[key] * {FULL: 1.0, QUICK_CUDA: 0.35}.get(self.shape, 0.1)

    def ensure_model(self):
        """The untouched model (built by the forward section, or here when it did not run)."""
        if self.model is None:
            self.model = build(self.shape, self.device, self.dtype)
        return self.model

    def ensure_tp(self):
        """fxtp.transform(model, 1) (from the forward section, or made here)."""
        import fxtp

        if self.tp is None:
            self.tp = fxtp.transform(self.ensure_model(), 1)
        return self.tp


def run_section(bench: Bench, title: str, key: str, fn: Callable[[Bench], None],
                needs_cuda: bool = False, needs_gpus: int = 0) -> None:
    """Runs one section; its failure is printed, not raised, so the other figures still come."""
    print(f"\n== {title} ==", flush=True)
    if (needs_cuda or needs_gpus) and not bench.cuda:
        print("  skipped: no CUDA", flush=True)
        return
    if bench.args.only and key != "env" and key not in bench.args.only:
        print("  skipped: not in --only", flush=True)
        return
    if needs_gpus and torch.cuda.device_count() < needs_gpus:
        print(f"  skipped: {torch.cuda.device_count()} GPU(s), this needs {needs_gpus}", flush=True)
        return
    if key != "env" and bench.left() < bench.need(key):
        print(f"  skipped: time budget ({bench.left():.0f} s left of {bench.args.budget:.0f} s, "
              f"this section needs ~{bench.need(key):.0f} s)", flush=True)
        bench.skipped.append(key)
        return
    t0 = time.perf_counter()
    try:
        fn(bench)
    except Exception as e:  # noqa: BLE001  (report and go on to the next section)
        print(f"  FAILED: {first_line(e)}", flush=True)
        print("    " + traceback.format_exc().strip().replace("\n", "\n    "), flush=True)
    finally:
        gc.collect()
        if bench.cuda:
            torch.cuda.empty_cache()
        print(f"  ({time.perf_counter() - t0:.1f} s; {time.perf_counter() - bench.start:.0f} s "
              "since start)", flush=True)


# ---------------------------------------------------------------------------------------------
# models, inputs, timing

def decode_batch(shape: Shape) -> int:
    """The larger decode batch: 8, or the forward batch of a smaller (CPU) shape."""
    return min(8, shape.batch)


def llama_config(shape: Shape):
    """A Llama config of `shape` with no eos token, so every generate runs its full length."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=max(4096, shape.seq, shape.prompt + shape.new_tokens),
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights made on `device` from `seed`: every process that builds it on the same
    kind of device gets the same values (the ranks, and the reference)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def forward_inputs(shape: Shape, device: torch.device, seed: int = 1):
    """[batch, seq] ids and a left-padded mask (odd rows padded by up to a quarter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, shape.vocab, (shape.batch, shape.seq), generator=g)
    mask = torch.ones_like(ids)
    for r in range(1, shape.batch, 2):
        mask[r, : (r * shape.seq) // (4 * shape.batch) + 1] = 0
    return ids.to(device), mask.to(device)


def prompt(shape: Shape, batch: int, device: torch.device, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, shape.vocab, (batch, shape.prompt), generator=g).to(device)
    return ids, torch.ones_like(ids)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU (after a synchronize, so the stream starts
    idle), perf_counter on the CPU."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rounds(fns: dict[str, Callable[[], Any]], n: int, warmup: int,
           device: torch.device) -> dict[str, list[float]]:
    """Each contender once per round, interleaved, so a slow spell hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b."""
    return statistics.median(x / y for x, y in zip(a, b))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(1, max |ref|), in float32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def tensor_bytes(module, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the module's parameters and buffers, each tensor once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        if id(t) in seen or name in skip:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets `peak` (bytes above the memory allocated at entry) on exit."""
    out: dict[str, int] = {}
    if device.type != "cuda":
        yield out
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        yield out
    finally:
        sync(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - base


def unique_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def first_difference(a: torch.Tensor, b: torch.Tensor, prompt_len: int) -> str:
    """'equal' or the first new-token position (0-based, over the batch) where a and b differ."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape:
        return f"shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a != b)[:, prompt_len:]
    if not diff.any():
        return "equal"
    cols = diff.any(0).nonzero().flatten()
    rows = diff[:, cols[0]].nonzero().flatten().tolist()
    return f"differ from new token {int(cols[0])} of {diff.shape[1]} (rows {rows[:8]})"


# ---------------------------------------------------------------------------------------------
# fxtp calls shared by the sections

def make_generator(model, ws: int, max_len: int, max_batch: int):
    """fxtp.generator; its decode step is replayed as a CUDA graph when the model is on CUDA."""
    import fxtp

    return fxtp.generator(model, ws, max_len=max_len, max_batch=max_batch, cuda_graph=None)


def load_into(target, path: str, device: torch.device, dtype: torch.dtype):
    """fxtp.load onto the device as a user writes it on one GPU ("cuda": the current one)."""
    import fxtp

    return fxtp.load(target, path, device=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# sections

def section_environment(b: Bench) -> None:
    import transformers

    import fxtp

    figure("torch / transformers / fxtp", f"{torch.__version__} / {transformers.__version__} / "
           f"{fxtp.__version__} ({fxtp.__file__})")
    if b.cuda:
        name = torch.cuda.get_device_name(b.device)
        total = torch.cuda.get_device_properties(b.device).total_memory
        figure("device", f"{name}, {gib(total)}, {torch.cuda.device_count()} GPU(s)")
    else:
        figure("device", f"cpu ({torch.get_num_threads()} threads)")
    if b.cuda:
        figure("HBM bandwidth used for the decode limit", f"{b.bandwidth / 1e12:.3f} TB/s"
               + ("" if b.args.bandwidth else " (from the GPU name)"))
    s = b.shape
    figure("model", f"Llama hidden {s.hidden}, {s.layers} layers, {s.heads} heads / {s.kv_heads} "
           f"kv, intermediate {s.intermediate}, vocab {s.vocab}, {dtype_name(b.dtype)}")
    figure("workloads", f"forward {s.batch} x {s.seq}; decode prompt {s.prompt} + "
           f"{s.new_tokens} new tokens at batch 1 and {decode_batch(s)}")
    figure("torch.compile backend", b.compile_backend)


def section_forward(b: Bench) -> None:
    import fxtp

    t0 = time.perf_counter()
    b.model = build(b.shape, b.device, b.dtype)
    figure("model build", f"{time.perf_counter() - t0:.1f} s, {size(tensor_bytes(b.model))}")
    with peak_memory(b.device) as mem:
        t0 = time.perf_counter()
        b.tp = fxtp.transform(b.model, 1)
        took = time.perf_counter() - t0
    shard = tensor_bytes(b.tp)
    figure("fxtp.transform(model on device, 1)", f"{took:.1f} s")
    if "peak" in mem:
        figure("  peak device memory of transform / shard",
               f"{gib(mem['peak'])} / {gib(shard)} = {mem['peak'] / shard:.2f}x",
               "<= 1.0x (the graph is copied before slicing)", mem["peak"] <= 1.05 * shard)
    ids, mask = forward_inputs(b.shape, b.device)
    model, tp = b.model, b.tp
    with torch.no_grad():
        for label, kw in (("with attention_mask", dict(attention_mask=mask)),
                          ("without attention_mask", {})):
            out = tp(input_ids=ids, **kw).logits
            ref = model(input_ids=ids, **kw).logits
            exact = torch.equal(out, ref)
            figure(f"logits tp vs model, {label}",
                   "bitwise equal" if exact else f"max rel diff {_rel_err(out, ref):.2e}",
                   "equal", exact)
        del out, ref
        fns = {"model+mask": lambda: model(input_ids=ids, attention_mask=mask),
               "tp+mask": lambda: tp(input_ids=ids, attention_mask=mask),
               "model": lambda: model(input_ids=ids),
               "tp": lambda: tp(input_ids=ids)}
        t = rounds(fns, b.args.repeats, b.args.warmup, b.device)
    for m in ("+mask", ""):
        label = "with attention_mask" if m else "without attention_mask"
        figure(f"eager forward, {label}: model / fxtp ws=1",
               f"{med(t['model' + m]) * 1e3:8.2f} / {med(t['tp' + m]) * 1e3:8.2f} ms")
        r = paired(t["tp" + m], t["model" + m])
        figure(f"eager forward, {label}: fxtp / model", f"{r:.3f}x",
               f"<= {GOAL_EAGER_FORWARD}x", r <= GOAL_EAGER_FORWARD)


def _hf_static_kwargs(b: Bench) -> dict:
    """generate() arguments of HF's compiled static-cache decode; on the CPU (smoke test) the
    compile is forced with the configured backend (HF compiles on accelerators only)."""
    kw: dict[str, Any] = {"cache_implementation": "static"}
    from transformers import CompileConfig

    # HF's default mode is reduce-overhead (CUDA graphs), which only inductor takes
    cfg = (CompileConfig(backend=b.compile_backend) if b.compile_backend == "inductor" else
           CompileConfig(backend=b.compile_backend, mode="default"))
    if b.cuda:
        if b.compile_backend != "inductor":
            kw["compile_config"] = cfg
        return kw
    if not hasattr(cfg, "_compile_all_devices"):
        raise RuntimeError("this transformers' CompileConfig cannot compile on the CPU")
    cfg._compile_all_devices = True
    kw["compile_config"] = cfg
    return kw


def _fxtp_compile_options(b: Bench) -> dict:
    opts: dict[str, Any] = {"backend": b.compile_backend}
    if b.args.fxtp_compile_mode:
        opts["mode"] = b.args.fxtp_compile_mode
    return opts


def decode_limit(b: Bench, model, batch: int) -> tuple[float, float]:
    """(bytes read per decode step, tokens/s at the bandwidth limit): every weight once per step
    (the input embedding table only for the rows looked up) plus the KV cache of the tokens
    attended to, at the mean context length of the timed steps."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    weights = tensor_bytes(model) - emb.numel() * emb.element_size() \
        + batch * emb.shape[1] * emb.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size()
    context = b.shape.prompt + b.shape.new_tokens / 2
    step = weights + batch * context * per_token
    return step, batch * b.bandwidth / step


def section_decode(b: Bench, batch: int) -> None:
    """Greedy decode: fxtp.generator vs model.generate, eager then compiled."""
    from transformers import CompileConfig  # noqa: F401  (fail early if missing)

    model, s = b.ensure_model(), b.shape
    ids, mask = prompt(s, batch, b.device)
    n = s.new_tokens
    res: dict[str, Any] = {}
    b.decode[batch] = res
    hf_kw = dict(attention_mask=mask, do_sample=False)
    t0 = time.perf_counter()
    gen = make_generator(model, 1, max_len=s.prompt + n, max_batch=batch)
    figure("fxtp.generator build (capture + transform)", f"{time.perf_counter() - t0:.1f} s")

    def rate(t: dict, key: str) -> list[float]:
        """Per-round decode tokens/s: batch x (n - 1) new tokens over t(n) - t(1)."""
        return [batch * (n - 1) / max(x - y, 1e-9) for x, y in zip(t[key + "_n"], t[key + "_1"])]

    def of_limit(r: float) -> str:
        """The fraction of the HBM limit (meaningless on the CPU smoke test: left out)."""
        return f" = {r / limit:6.1%} of the limit" if b.cuda else ""

    step, limit = decode_limit(b, model, batch)
    with torch.no_grad():
        # -- eager: HF's dynamic cache vs fxtp (its step as a CUDA graph where supported) --
        fns = {"hf_n": lambda: model.generate(ids, max_new_tokens=n, **hf_kw),
               "hf_1": lambda: model.generate(ids, max_new_tokens=1, **hf_kw),
               "fx_n": lambda: gen.generate(ids, max_new_tokens=n, **hf_kw),
               "fx_1": lambda: gen.generate(ids, max_new_tokens=1, **hf_kw)}
        t = rounds(fns, b.args.decode_repeats, 1, b.device)
        hf, fx = rate(t, "hf"), rate(t, "fx")
        res["hf_eager"], res["fx_eager"] = med(hf), med(fx)
        figure(f"batch {batch} eager: HF generate (dynamic cache)",
               f"{med(hf):9.1f} tokens/s{of_limit(med(hf))}")
        figure(f"batch {batch} eager: fxtp generator",
               f"{med(fx):9.1f} tokens/s{of_limit(med(fx))} "
               f"({statistics.median(x / y for x, y in zip(fx, hf)):.2f}x HF)")
        hf_tokens = model.generate(ids, max_new_tokens=n, **hf_kw)
        fx_tokens = gen.generate(ids, max_new_tokens=n, **hf_kw)
        res["tokens"] = fx_tokens.cpu()
        d = first_difference(fx_tokens, hf_tokens, s.prompt)
        figure(f"batch {batch} eager tokens: fxtp vs HF", d, "equal", d == "equal")
        if b.cuda:
            figure(f"batch {batch} bandwidth limit", f"{limit:9.1f} tokens/s ({step / 1e9:.3f} "
                   f"GB per step at {b.bandwidth / 1e12:.2f} TB/s)")

        # -- compiled: HF's static cache under torch.compile vs fxtp's compiled step --
        if b.left() < b.need("decode_compiled"):
            print(f"  compiled decode skipped: time budget ({b.left():.0f} s left, it needs "
                  f"~{b.need('decode_compiled'):.0f} s)", flush=True)
            b.skipped.append("decode1" if batch == 1 else "decode8")
            return
        hf_static = dict(hf_kw, **_hf_static_kwargs(b))
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, **hf_static)
        model.generate(ids, max_new_tokens=1, **hf_static)
        figure(f"batch {batch} HF static-cache compile + first runs",
               f"{time.perf_counter() - t0:.1f} s")
        gen.compile(**_fxtp_compile_options(b))
        t0 = time.perf_counter()
        gen.generate(ids, max_new_tokens=n, **hf_kw)
        gen.generate(ids, max_new_tokens=1, **hf_kw)
        figure(f"batch {batch} fxtp compile + first runs", f"{time.perf_counter() - t0:.1f} s")
        fns = {"hf_n": lambda: model.generate(ids, max_new_tokens=n, **hf_static),
               "hf_1": lambda: model.generate(ids, max_new_tokens=1, **hf_static),
               "fx_n": lambda: gen.generate(ids, max_new_tokens=n, **hf_kw),
               "fx_1": lambda: gen.generate(ids, max_new_tokens=1, **hf_kw)}
        before = unique_graphs()
        gen.generate(ids, max_new_tokens=n, **hf_kw)          # warm: n - 1 decode steps
        per_token = unique_graphs() - before
        before = unique_graphs()
        t = rounds(fns, b.args.decode_repeats, 0, b.device)
        recompiles = unique_graphs() - before
        hf, fx = rate(t, "hf"), rate(t, "fx")
        res["hf_compiled"], res["fx_compiled"] = med(hf), med(fx)
        vs = statistics.median(x / y for x, y in zip(fx, hf))
        figure(f"batch {batch} compiled: HF generate (static cache)",
               f"{med(hf):9.1f} tokens/s{of_limit(med(hf))}")
        goal_bw = batch == 1 and b.cuda
        figure(f"batch {batch} compiled: fxtp generator",
               f"{med(fx):9.1f} tokens/s{of_limit(med(fx))}",
               f">= {GOAL_BANDWIDTH:.0%} of the limit" if goal_bw else None,
               med(fx) / limit >= GOAL_BANDWIDTH if goal_bw else None)
        figure(f"batch {batch} compiled: fxtp / HF static", f"{vs:.2f}x",
               f">= {GOAL_VS_HF_STATIC}x" if goal_bw else None,
               vs >= GOAL_VS_HF_STATIC if goal_bw else None)
        figure(f"batch {batch} graphs compiled during a warm fxtp generate of {n} tokens",
               f"{per_token}", "0 (no recompile per token)", per_token == 0)
        figure(f"batch {batch} graphs compiled during the interleaved rounds (fxtp + HF)",
               f"{recompiles}", "0", recompiles == 0)
        hf_tokens = model.generate(ids, max_new_tokens=n, **hf_static)
        fx_tokens = gen.generate(ids, max_new_tokens=n, **hf_kw)
        figure(f"batch {batch} compiled tokens: fxtp vs HF static",
               first_difference(fx_tokens, hf_tokens, s.prompt),
               "equal (bf16 compiled: first difference shown)")
        figure(f"batch {batch} compiled tokens: fxtp compiled vs fxtp eager",
               first_difference(fx_tokens, res["tokens"], s.prompt))
    del gen
    torch._dynamo.reset()


def _same_checkpoints(a: str, b: str) -> bool:
    """The same tensor names and values in two checkpoint directories (one tensor at a time)."""
    from safetensors import safe_open

    def where(d: str) -> dict:
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as h:
                    out.update({k: os.path.join(d, f) for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    if sorted(wa) != sorted(wb):
        return False
    for k in wb:
        with safe_open(wa[k], "pt") as x, safe_open(wb[k], "pt") as y:
            if not torch.equal(x.get_tensor(k), y.get_tensor(k)):
                return False
    return True


def section_meta_load(b: Bench) -> None:
    """meta build -> transform -> fxtp.load(device, dtype) of a checkpoint written here."""
    from transformers import AutoModelForCausalLM

    import fxtp

    b.ensure_model()
    path = tempfile.mkdtemp(prefix="fxtp_gpu_bench_", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        t0 = time.perf_counter()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        b.model.save_pretrained(path)
        figure("checkpoint written (save_pretrained)", f"{time.perf_counter() - t0:.1f} s, {path}")
        with fxtp.init_empty():
            meta = AutoModelForCausalLM.from_config(llama_config(b.shape), dtype=b.dtype).eval()
        with peak_memory(b.device) as mem:
            t0 = time.perf_counter()
            tp = fxtp.transform(meta, 1)
            took = time.perf_counter() - t0
        if "peak" in mem:
            figure("fxtp.transform(meta model, 1)", f"{took:.1f} s, peak device memory "
                   f"{gib(mem['peak'])}", "~0 on the device", mem["peak"] < 2**26)
        else:
            figure("fxtp.transform(meta model, 1)", f"{took:.1f} s")
        with peak_memory(b.device) as mem:
            t0 = time.perf_counter()
            report = load_into(tp, path, b.device, b.dtype)
            took = time.perf_counter() - t0
        shard = tensor_bytes(tp)
        figure(f"fxtp.load(device={b.device.type}, dtype={dtype_name(b.dtype)})",
               f"{took:.1f} s, {size(report.bytes_read)} read")
        if "peak" in mem:
            figure("  peak device memory of load / shard",
                   f"{gib(mem['peak'])} / {gib(shard)} = {mem['peak'] / shard:.2f}x", "<= 1.05x",
                   mem["peak"] <= 1.05 * shard)
        placed = {str(t.device) for t in [*tp.parameters(), *tp.buffers()]}
        figure("  devices of the loaded graph's tensors", ", ".join(sorted(placed)),
               f"{b.device}", all(p.startswith(b.device.type) for p in placed))
        ids, mask = forward_inputs(b.shape, b.device)
        with torch.no_grad():
            out = tp(input_ids=ids, attention_mask=mask).logits
            ref = b.model(input_ids=ids, attention_mask=mask).logits
        exact = torch.equal(out, ref)
        figure("  loaded graph vs the model that wrote the checkpoint",
               "bitwise equal" if exact else f"max rel diff {_rel_err(out, ref):.2e}",
               "equal", exact)
        del out, ref
        try:        # fxtp.save of the loaded graph: tensor by tensor through host memory
            saved = path + "_saved"
            with peak_memory(b.device) as mem:
                t0 = time.perf_counter()
                fxtp.save(tp, saved)
                took = time.perf_counter() - t0
            same = _same_checkpoints(saved, path)
            figure("  fxtp.save(tp) of the loaded graph", f"{took:.1f} s; tensors equal to "
                   f"save_pretrained's: {same}", "equal", same)
            if "peak" in mem:
                extra = mem["peak"] - shard
                figure("  peak device memory of save above the shard", gib(max(0, extra)),
                       "<= 5% of the shard", extra <= 0.05 * shard)
        except Exception as e:  # noqa: BLE001
            figure("  fxtp.save(tp)", f"FAILED: {first_line(e)}")
        finally:
            shutil.rmtree(path + "_saved", ignore_errors=True)
        del tp

        # a generator built on the meta model, filled by the same load
        try:
            with fxtp.init_empty():
                meta = AutoModelForCausalLM.from_config(llama_config(b.shape), dtype=b.dtype).eval()
            n = min(16, b.shape.new_tokens)
            gen = make_generator(meta, 1, max_len=b.shape.prompt + n, max_batch=1)
            load_into(gen, path, b.device, b.dtype)
            p_ids, p_mask = prompt(b.shape, 1, b.device)
            with torch.no_grad():
                got = gen.generate(p_ids, attention_mask=p_mask, max_new_tokens=n, do_sample=False)
                want = b.model.generate(p_ids, attention_mask=p_mask, max_new_tokens=n,
                                        do_sample=False)
            d = first_difference(got, want, b.shape.prompt)
            figure("  generator on meta + fxtp.load(gen, ...): tokens vs HF", d, "equal",
                   d == "equal")
        except Exception as e:  # noqa: BLE001
            figure("  generator on meta + fxtp.load(gen, ...)",
                   f"FAILED: {first_line(e)}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _two_rank_worker(rank: int, ws: int, shape: Shape, device: str, dtype: str) -> dict:
    """A gloo rank whose tensors all live on `device` (both ranks share cuda:0)."""
    import fxtp

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dt = getattr(torch, dtype)
    model = build(shape, dev, dt)
    tp = fxtp.transform(model, ws)
    ids, mask = forward_inputs(shape, dev)
    with torch.no_grad():
        out = tp(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    return {"err": _rel_err(out, ref), "device": str(out.device),
            "argmax": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "local_fraction": tensor_bytes(tp) / tensor_bytes(model)}


def section_two_ranks_gloo(b: Bench) -> None:
    from fxtp.testing.ranks import run_ranks

    dtype = b.args.two_rank_dtype
    t0 = time.perf_counter()
    res = run_ranks(_two_rank_worker, 2, b.shape, str(b.device), dtype, timeout=max(60, b.left()))
    figure("2 gloo ranks on one device: transform + forward", f"{time.perf_counter() - t0:.1f} s "
           f"(outputs on {', '.join(r['device'] for r in res)})")
    tol = TOL[getattr(torch, dtype)]
    worst = max(r["err"] for r in res)
    figure(f"  logits vs the model ({dtype}), max rel diff over ranks", f"{worst:.2e}",
           f"<= {tol:g}", worst <= tol)
    figure("  greedy argmax equal to the model's",
           f"{min(r['argmax'] for r in res):.2%} of positions")
    figure("  bytes held per rank / model", ", ".join(f"{r['local_fraction']:.3f}" for r in res))


def _nccl_worker(rank: int, ws: int, port: int, shape: Shape, dtype: str, n_new: int,
                 repeats: int, decode_repeats: int, reference_tokens: Optional[torch.Tensor],
                 queue, device_type: str = "cuda") -> None:
    """One NCCL rank on GPU `rank`: the TP forward against the untouched model on the same GPU
    (world 1), and TP greedy decode at batch 1 (tokens compared with world 1's).
    `device_type="cpu"` runs the same code over gloo (to check this function without GPUs)."""
    try:
        import torch.distributed as dist

        import fxtp

        warnings.filterwarnings("ignore")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(ws), LOCAL_RANK=str(rank))
        if device_type == "cuda":
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dev = torch.device("cpu")
            dist.init_process_group("gloo")
        model = build(shape, dev, getattr(torch, dtype))
        # same seed on the same kind of GPU: the same weights; checked, since TP needs it
        check = torch.stack([p.float().sum() for p in model.parameters()]).sum().reshape(1)
        sums = [torch.zeros_like(check) for _ in range(ws)]
        dist.all_gather(sums, check)
        same_weights = all(torch.equal(x, sums[0]) for x in sums)
        tp = fxtp.transform(model, ws)
        ids, mask = forward_inputs(shape, dev)
        with torch.no_grad():
            err = _rel_err(tp(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
            # every rank runs the same sequence, so the TP forwards' collectives line up
            t = rounds({"model": lambda: model(input_ids=ids, attention_mask=mask),
                        "tp": lambda: tp(input_ids=ids, attention_mask=mask)}, repeats, 3, dev)
        # fxtp.save over this backend (point-to-point exchanges of the slices), compared on
        # rank 0 with the untouched model's save_pretrained
        saved, ref_dir = f"/tmp/fxtp_gpu_bench_save_{port}", f"/tmp/fxtp_gpu_bench_ref_{port}"
        t0 = time.perf_counter()
        fxtp.save(tp, saved)
        save_s = time.perf_counter() - t0
        same_saved = None
        if rank == 0:
            model.save_pretrained(ref_dir)
            same_saved = _same_checkpoints(saved, ref_dir)
            shutil.rmtree(saved, ignore_errors=True)
            shutil.rmtree(ref_dir, ignore_errors=True)
        del tp
        gen = make_generator(model, ws, shape.prompt + n_new, 1)
        p_ids, p_mask = prompt(shape, 1, dev)
        kw = dict(attention_mask=p_mask, do_sample=False)
        with torch.no_grad():
            td = rounds({"n": lambda: gen.generate(p_ids, max_new_tokens=n_new, **kw),
                         "1": lambda: gen.generate(p_ids, max_new_tokens=1, **kw)},
                        decode_repeats, 1, dev)
            tokens = gen.generate(p_ids, max_new_tokens=n_new, **kw)
        queue.put((rank, {
            "same_weights": same_weights, "err": err,
            "model_ms": med(t["model"]) * 1e3, "tp_ms": med(t["tp"]) * 1e3,
            "speedup": paired(t["model"], t["tp"]), "save_s": save_s, "same_saved": same_saved,
            "rate": statistics.median((n_new - 1) / max(x - y, 1e-9)
                                      for x, y in zip(td["n"], td["1"])),
            "tokens": (first_difference(tokens, reference_tokens, shape.prompt)
                       if reference_tokens is not None else
                       "n/a (no world-1 decode in this run)")}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (the parent prints it)
        queue.put((rank, traceback.format_exc()))


def section_nccl(b: Bench) -> None:
    """TP=2 and 4 over NCCL, one process per GPU (spawned), against world 1."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    from fxtp.testing.ranks import free_port

    one = b.decode.get(1, {})
    n_new = b.shape.new_tokens
    for ws in (2, 4):
        if torch.cuda.device_count() < ws:
            note(f"TP={ws}: skipped, {torch.cuda.device_count()} GPUs")
            continue
        if b.left() < b.need("nccl") / 2:
            note(f"TP={ws}: skipped, time budget ({b.left():.0f} s left)")
            b.skipped.append("nccl")
            continue
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_nccl_worker, daemon=True,
                             args=(r, ws, port, b.shape, dtype_name(b.dtype),
                                   n_new, b.args.repeats, b.args.decode_repeats,
                                   one.get("tokens"), q)) for r in range(ws)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        deadline = time.monotonic() + max(120.0, b.left())
        try:
            while len(results) < ws and time.monotonic() < deadline:
                try:
                    rank, value = q.get(timeout=1.0)
                except queue_mod.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        break
                    continue
                results[rank] = value
                if isinstance(value, str):
                    break
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
        failed = {r: v for r, v in results.items() if isinstance(v, str)}
        if failed or len(results) < ws:
            raise RuntimeError(f"TP={ws} over NCCL: " + (
                "\n".join(f"rank {r}:\n{v}" for r, v in failed.items()) if failed else
                f"ranks {sorted(set(range(ws)) - set(results))} did not report (exit codes "
                f"{[p.exitcode for p in procs]})"))
        r0 = results[0]
        same = all(r["same_weights"] for r in results.values())
        figure(f"TP={ws} NCCL: same random weights on every rank", str(same), "True", same)
        worst = max(r["err"] for r in results.values())
        figure(f"TP={ws} NCCL: logits vs world 1 (the model), max rel diff", f"{worst:.2e}",
               f"<= {TOL[b.dtype]:g}", worst <= TOL[b.dtype])
        figure(f"TP={ws} NCCL: forward model / fxtp (rank 0)",
               f"{r0['model_ms']:.2f} / {r0['tp_ms']:.2f} ms = {r0['speedup']:.2f}x faster",
               f"~{ws}x (compute-bound)")
        base = one.get("fx_eager")
        figure(f"TP={ws} NCCL: decode batch 1 eager, fxtp TP / world 1",
               f"{r0['rate']:.1f} / " + (f"{base:.1f} tokens/s = {r0['rate'] / base:.2f}x"
                                         if base else "n/a (no world-1 decode in this run)"))
        figure(f"TP={ws} NCCL: greedy tokens vs world 1", r0["tokens"])
        figure(f"TP={ws} NCCL: fxtp.save, tensors vs save_pretrained's",
               f"{r0['save_s']:.1f} s, equal: {r0['same_saved']}", "equal",
               r0["same_saved"] is True)
        note(f"TP={ws}: {time.perf_counter() - t0:.1f} s")


def section_compiled_forward(b: Bench) -> None:
    model, tp = b.ensure_model(), b.ensure_tp()
    ids, mask = forward_inputs(b.shape, b.device)
    cm = torch.compile(model, backend=b.compile_backend)
    ct = torch.compile(tp, backend=b.compile_backend)
    fns = {"model+mask": lambda: cm(input_ids=ids, attention_mask=mask),
           "tp+mask": lambda: ct(input_ids=ids, attention_mask=mask),
           "model": lambda: cm(input_ids=ids),
           "tp": lambda: ct(input_ids=ids)}
    with torch.no_grad():
        for k, fn in fns.items():
            if k == "model" and b.left() < b.need("compiled") / 2:
                fns = {k2: v for k2, v in fns.items() if k2.endswith("+mask")}
                note(f"without attention_mask skipped: time budget ({b.left():.0f} s left)")
                b.skipped.append("compiled")
                break
            t0 = time.perf_counter()
            fn()
            sync(b.device)
            figure(f"compile + first call: {k}", f"{time.perf_counter() - t0:.1f} s")
        before = unique_graphs()
        t = rounds(fns, b.args.repeats, b.args.warmup, b.device)
        again = unique_graphs() - before
    for m in ("+mask", ""):
        if "tp" + m not in t:
            continue
        label = "with attention_mask" if m else "without attention_mask"
        figure(f"compiled forward, {label}: model / fxtp ws=1",
               f"{med(t['model' + m]) * 1e3:8.2f} / {med(t['tp' + m]) * 1e3:8.2f} ms")
        figure(f"compiled forward, {label}: fxtp / model",
               f"{paired(t['tp' + m], t['model' + m]):.3f}x")
    figure("graphs compiled during the timed rounds", str(again), "0", again == 0)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------

def bandwidth_of(device: torch.device, flag: Optional[float]) -> float:
    """Bytes/s: --bandwidth (TB/s), else looked up from the GPU name, else H200's 4.8 TB/s."""
    if flag:
        return flag * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tbs in BANDWIDTHS:
            if key.lower() in name.lower():
                return tbs * 1e12
        note(f"unknown GPU {name!r}: bandwidth 4.8 TB/s assumed, pass --bandwidth")
    return 4.8e12


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="a smaller model (tiny on the CPU)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="default bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="HBM bandwidth in TB/s for the decode limit (default: from the GPU name)")
    ap.add_argument("--budget", type=float, default=280.0,
                    help="seconds; later sections are skipped rather than run past it")
    ap.add_argument("--repeats", type=int, default=None, help="timed forward rounds")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up forward rounds")
    ap.add_argument("--decode-repeats", type=int, default=None, help="timed decode rounds")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor on CUDA, eager on the CPU)")
    ap.add_argument("--fxtp-compile-mode", default=None,
                    help="mode for gen.compile (default: none; the generator's own CUDA graph "
                         "replays the step; 'reduce-overhead' where this fxtp has no cuda_graph)")
    ap.add_argument("--two-rank-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the 2-rank gloo check (float32: a tight tolerance)")
    ap.add_argument("--only", nargs="*", default=None, choices=SECTIONS,
                    help="run only these sections (e.g. the ones a budgeted run skipped)")
    args = ap.parse_args(argv)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available here; use --device cpu --quick")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")]
    shape = (QUICK_CUDA if cuda else QUICK_CPU) if args.quick else FULL
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.decode_repeats = args.decode_repeats or (3 if cuda else 1)
    bench = Bench(args=args, device=device, dtype=dtype, shape=shape, start=start,
                  compile_backend=args.compile_backend or ("inductor" if cuda else "eager"))
    print(f"fxtp GPU bench ({'quick' if args.quick else 'full'}, budget {args.budget:.0f} s)",
          flush=True)
    bench.bandwidth = bandwidth_of(device, args.bandwidth)
    run_section(bench, "environment", "env", section_environment)
    if cuda and args.fxtp_compile_mode:
        note(f"fxtp compiled decode uses torch.compile mode={args.fxtp_compile_mode!r}")
    run_section(bench, "forward, world 1, eager", "forward", section_forward)
    run_section(bench, "decode, batch 1", "decode1", lambda b: section_decode(b, 1))
    run_section(bench, "meta build -> transform -> fxtp.load", "meta", section_meta_load)
    run_section(bench, "two ranks on one device over gloo", "gloo", section_two_ranks_gloo)
    run_section(bench, "tensor parallel over NCCL (TP=2, 4)", "nccl", section_nccl, needs_gpus=2)
    run_section(bench, f"decode, batch {decode_batch(shape)}", "decode8",
                lambda b: section_decode(b, decode_batch(shape)))
    run_section(bench, "forward, world 1, torch.compile", "compiled", section_compiled_forward)
    print(f"\ndone in {time.perf_counter() - start:.0f} s", flush=True)
    if bench.skipped:
        keys = " ".join(dict.fromkeys(bench.skipped))
        print(f"left out (in whole or in part) by the time budget: {keys}; run them with: "
              f"python bench/gpu.py{' --quick' if args.quick else ''} --only {keys}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
