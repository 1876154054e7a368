"""Loading cases run inside the spawned gloo ranks of tests/test_load.py: a model built under
`fxtp.init_empty()`, transformed, filled by `fxtp.load` from checkpoints the test process
wrote, and compared with the model that wrote them. Ranks return plain data."""
from __future__ import annotations

import traceback
from typing import Any

import torch

import fxtp
from fxtp.graph.devices import graph_devices
from fxtp.graph.tensors import tensor_attrs
from fxtp.testing.checks import check_equivalence
from fxtp.testing.families import FAMILIES, family_model
from fxtp.testing.models import tiny_model
from fxtp.testing.strategies import hf_inputs

# model name -> how to build it (the same seed in the test process and in every rank)
MODELS = ("llama", "gpt2", "phi3", "llama_uneven", "llama_tied")
EXAMPLES = 3


def build(name: str, empty: bool = False):
    """The model `name` (tiny_model or a family), random weights from a fixed seed; under
    `fxtp.init_empty()` when `empty`."""
    if not empty:
        if name != "lora":
            return family_model(name) if name in FAMILIES else tiny_model(name)
        from .train_workers import lora_model

        return lora_model("llama")
    with fxtp.init_empty():
        if name == "lora":      # the same adapters as lora_model, on meta
            from peft import LoraConfig, get_peft_model

            from .train_workers import LORA_TARGETS

            cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS["llama"],
                             lora_dropout=0.0, task_type="CAUSAL_LM")
            return get_peft_model(tiny_model("llama"), cfg)
        return family_model(name) if name in FAMILIES else tiny_model(name)


def write_checkpoints(root: str) -> dict[str, str]:
    """In the test process: every model's checkpoint (several shards for llama), the LoRA
    base + adapter, and the broken ones. Returns name -> directory."""
    import os

    from safetensors.torch import load_file, save_file

    dirs = {}
    for name in MODELS:
        d = os.path.join(root, name)
        # small shards: several files and an index for every model
        build(name).save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
        dirs[name] = d
    lora = build("lora")
    dirs["lora_base"] = os.path.join(root, "lora_base")
    from .train_workers import train_model

    # the base model as Hugging Face saves it (lora_model wraps this one, same seed)
    train_model("llama").save_pretrained(dirs["lora_base"], safe_serialization=True)
    dirs["lora_adapter"] = os.path.join(root, "lora_adapter")
    lora.save_pretrained(dirs["lora_adapter"])
    # broken copies of the llama checkpoint, as one file
    one = os.path.join(root, "llama_one")
    build("llama").save_pretrained(one, safe_serialization=True)
    dirs["llama_one"] = one
    sd = load_file(os.path.join(one, "model.safetensors"))
    for kind in ("missing", "shape", "truncated"):
        d = os.path.join(root, kind)
        os.makedirs(d)
        dirs[kind] = d
        if kind == "truncated":
            src = os.path.join(one, "model.safetensors")
            data = open(src, "rb").read()
            open(os.path.join(d, "model.safetensors"), "wb").write(data[: len(data) - 1000])
            continue
        broken = dict(sd)
        if kind == "missing":
            del broken["model.layers.1.mlp.up_proj.weight"]
        else:
            broken["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
        save_file(broken, os.path.join(d, "model.safetensors"))
    dirs["other_arch"] = dirs["gpt2"]
    # the llama checkpoint in bf16 (a hub checkpoint's usual dtype)
    dirs["llama_bf16"] = os.path.join(root, "llama_bf16")
    build("llama").to(torch.bfloat16).save_pretrained(dirs["llama_bf16"], safe_serialization=True)
    return dirs


_PLANS: dict[str, Any] = {}


def empty_tp(name: str, ws: int):
    """A meta model's tensor-parallel graph; the capture is made once per model and rank."""
    empty = build(name, empty=True).eval()
    if name not in _PLANS:
        _PLANS[name] = fxtp.plan(empty, ws)
    return empty, fxtp.transform(empty, ws, plan=_PLANS[name])


def _load_case(name: str, ws: int, path: str, adapter: str | None = None) -> dict[str, Any]:
    model = build(name).eval()
    empty, tp = empty_tp(name, ws)
    held_before = sum(1 for p in empty.parameters() if p.device.type == "meta")
    info = tp.meta["fxtp"]
    meta_local = {k: tuple(v.shape) for k, v in tp.named_parameters(remove_duplicate=False)}
    meta_devices = {v.device.type for v in tp.parameters()}
    try:
        tp(input_ids=torch.zeros(1, 2, dtype=torch.long))
        called = "no error"
    except fxtp.FxtpError as e:
        called = type(e).__name__
    rep = fxtp.load(tp, path, adapter=adapter)
    eq = check_equivalence(model, tp, hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12),
                           max_examples=EXAMPLES)
    local = {k: tuple(v.shape) for k, v in tp.named_parameters(remove_duplicate=False)}
    held = sum(p.numel() * p.element_size() for p in tp.parameters())    # a tied tensor once
    held += sum(b.numel() * b.element_size() for n, b in tp.named_buffers() if n not in rep.kept)
    return {
        "meta_params_before": held_before, "meta_devices": sorted(meta_devices),
        "meta_shapes_are_local": meta_local == local, "call_before_load": called,
        "max_error": max(eq.max_error.values()), "examples": eq.examples,
        "bytes_read": rep.bytes_read, "bytes_loaded": rep.bytes_loaded, "held": held,
        "full_bytes": rep.full_bytes, "files": len(rep.files), "kept": rep.kept,
        "plan_bytes": info.plan.local_param_bytes[info.rank],
        "sliced": len(info.param_slices), "unloaded": list(info.state.unloaded),
        "devices": sorted({t.device.type for t in [*tp.parameters(), *tp.buffers()]}),
        "requires_grad": sorted({(k.split(".")[-2] if "lora" in k else "base", p.requires_grad)
                                 for k, p in tp.named_parameters()}),
    }


def _error_cases(ws: int, dirs: dict[str, str]) -> dict[str, Any]:
    """Each broken checkpoint into one meta llama graph: the error, then that nothing was
    loaded (the graph still refuses to run), then a good load."""
    _, tp = empty_tp("llama", ws)
    out: dict[str, Any] = {}
    for kind in ("missing", "shape", "other_arch", "truncated"):
        try:
            fxtp.load(tp, dirs[kind])
            out[kind] = {"error": None}
        except fxtp.FxtpError as e:
            out[kind] = {"error": type(e).__name__, "message": str(e)}
        out[kind]["meta_left"] = len(tp.meta["fxtp"].state.unloaded)
        out[kind]["all_meta"] = all(p.device.type == "meta" for p in tp.parameters())
    try:
        tp(input_ids=torch.zeros(1, 2, dtype=torch.long))
        out["call"] = None
    except fxtp.FxtpError as e:
        out["call"] = type(e).__name__
    # a plain torch.device("meta") model: inv_freq has no value and is in no checkpoint
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        bare = AutoModelForCausalLM.from_config(build("llama").config)
    tp2 = fxtp.transform(bare, ws)
    try:
        fxtp.load(tp2, dirs["llama_one"])
        out["bare_meta"] = {"error": None}
    except fxtp.FxtpError as e:
        out["bare_meta"] = {"error": type(e).__name__, "message": str(e)}
    rep = fxtp.load(tp, dirs["llama_one"])
    out["after"] = {"bytes_read": rep.bytes_read, "unloaded": len(tp.meta["fxtp"].state.unloaded)}
    return out


def _bf16_case(ws: int, dirs: dict[str, str]) -> dict[str, Any]:
    """bf16 end to end: a bf16 meta-built llama loaded from the fp32 checkpoint with the cast
    done while reading, and an fp32 one from the bf16 checkpoint. The references are Hugging
    Face's own loads of the same files in the same dtypes; a tensor-parallel bf16 forward sums
    its partial results in another order, so its error against the fp32 model is compared with
    Hugging Face's bf16 error against it (bf16 rounding, not a wrong answer)."""
    from transformers import AutoModelForCausalLM

    cfg = build("llama").config
    ids = torch.randint(1, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tp = fxtp.transform(empty, ws)
    rep = fxtp.load(tp, dirs["llama"], device="cpu", dtype=torch.bfloat16)

    def run(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits.float()

    fp32 = AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(dirs["llama"], dtype=torch.bfloat16).eval()
    exact = run(fp32)
    out = {"dtypes": sorted({str(p.dtype) for p in tp.parameters()}),
           "read_vs_loaded": (rep.bytes_read, rep.bytes_loaded),
           "tp_error": float((run(tp) - exact).abs().max()),
           "hf_bf16_error": float((run(hf16) - exact).abs().max())}
    out["generate"] = _bf16_generate(ws, dirs, ids, mask, hf16)
    with fxtp.init_empty():   # a fresh config: from_config(dtype=) wrote bf16 into cfg
        empty32 = AutoModelForCausalLM.from_config(build("llama").config)
    tp32 = fxtp.transform(empty32, ws)
    fxtp.load(tp32, dirs["llama_bf16"])          # dtype of the model: fp32, cast from bf16
    ref = AutoModelForCausalLM.from_pretrained(dirs["llama_bf16"], dtype=torch.float32).eval()
    out["fp32_dtypes"] = sorted({str(p.dtype) for p in tp32.parameters()})
    out["fp32_from_bf16_error"] = float((run(tp32) - run(ref)).abs().max())
    return out


def _bf16_generate(ws: int, dirs: dict[str, str], ids, mask, hf16) -> dict[str, Any]:
    """A bf16 generator built on meta and loaded from the fp32 checkpoint (cast while reading).
    Greedy decoding in bf16 is checked within its rounding: at every new position, the token
    fxtp chose has Hugging Face's bf16 logit within bf16 rounding of the largest one (a
    near-tie may go either way when the partial sums are added in another order)."""
    from transformers import AutoModelForCausalLM

    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(build("llama").config, dtype=torch.bfloat16)
    gen = fxtp.generator(empty, ws, max_len=24, max_batch=3)
    fxtp.load(gen, dirs["llama"], dtype=torch.bfloat16)
    new = 6
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    ref = hf16.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = hf16(input_ids=out, attention_mask=full_mask).logits.float()
    p = ids.shape[1]
    chosen = logits[:, p - 1:-1].gather(-1, out[:, p:, None]).squeeze(-1)
    gap = (logits[:, p - 1:-1].max(-1).values - chosen).max()
    return {"dtypes": sorted({str(t.dtype) for t in gen.tp.parameters()}),
            "cache_dtypes": sorted({str(t.dtype) for t in gen.cache().values()}),
            "shape": list(out.shape), "largest_gap": float(gap),
            "equal_to_hf": bool(torch.equal(out, ref))}


def _device_case(ws: int) -> dict[str, Any]:
    """Device leaks made visible without a GPU: a model built wholly on meta leaves nothing but
    meta in the graph and in fxtp's records; a real model transformed and run under a default
    device of meta still computes on the CPU (anything fxtp made on the default device would
    be a meta tensor with no data)."""
    from transformers import AutoModelForCausalLM

    from .test_device_dtype import tensors_in

    model = build("llama")
    with torch.device("meta"):
        bare = AutoModelForCausalLM.from_config(model.config)
    tp = fxtp.transform(bare, ws)
    out = {"graph_devices": sorted(str(d) for d in graph_devices(tp)),
           "tensor_devices": sorted({t.device.type for t in tensor_attrs(tp).values()}),
           "record_devices": sorted({t.device.type for t in tensors_in(tp.meta["fxtp"])})}
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with torch.device("meta"):       # vocab-parallel: the masked lookup and the gather too
            tp = fxtp.transform(model, ws, vocab_parallel=True)
            got = tp(input_ids=ids).logits
    out["default_meta"] = {"device": got.device.type, "error": float((got - ref).abs().max())}
    return out


def run_all(rank: int, ws: int, dirs: dict[str, str]) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    cases = [(n, n, dirs[n], None) for n in MODELS]
    cases.append(("lora", "lora", dirs["lora_base"], dirs["lora_adapter"]))
    cases.append(("llama_one_safetensors", "llama", dirs["llama_one"], "safetensors"))
    import time

    for key, name, path, extra in cases:
        t0 = time.perf_counter()
        try:
            if extra == "safetensors":
                out[key] = _reader_case(ws, path)
            else:
                out[key] = _load_case(name, ws, path, adapter=extra)
        except Exception:
            out[key] = {"exception": traceback.format_exc()}
        out[key]["seconds"] = time.perf_counter() - t0
    for key, fn in (("bf16", lambda: _bf16_case(ws, dirs)), ("devices", lambda: _device_case(ws))):
        t0 = time.perf_counter()
        try:
            out[key] = fn()
        except Exception:
            out[key] = {"exception": traceback.format_exc()}
        out[key]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        out["errors"] = _error_cases(ws, dirs)
    except Exception:
        out["errors"] = {"exception": traceback.format_exc()}
    out["errors"]["seconds"] = time.perf_counter() - t0
    return out


def _reader_case(ws: int, path: str) -> dict[str, Any]:
    """safetensors' own get_slice reader gives the same tensors."""
    _, a = empty_tp("llama", ws)
    _, b = empty_tp("llama", ws)
    ra = fxtp.load(a, path)
    rb = fxtp.load(b, path, reader="safetensors")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return {"equal": all(torch.equal(pa[k], pb[k]) for k in pa),
            "bytes": (ra.bytes_read, rb.bytes_read)}
