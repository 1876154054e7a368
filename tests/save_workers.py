"""fxtp.save cases run inside one spawn of 4 gloo ranks (tests/test_save.py). Ranks 0 and 1
(a group of 2) train each model one step and save it; all 4 load that checkpoint at world 4
and save it again; ranks 0 and 1 load the world-4 checkpoint at world 2. Meanwhile ranks 2 and
3 (another group of 2) run the error cases. Ranks return plain data; the test process judges."""
from __future__ import annotations

import copy
import errno
import json
import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

import fxtp
from fxtp.testing.checks import check_equivalence
from fxtp.testing.strategies import hf_inputs

# tiny Llama (kv heads replicated on 4 ranks), GPT-2 (Conv1D, fused qkv, tied head) and a Llama
# with uneven shards (6 heads, 3 kv heads, 102 MLP features)
MODELS = ("llama", "gpt2", "llama_uneven")
TOL = 1e-5
EXAMPLES = 3


def build(name: str):
    from fxtp.testing.families import FAMILIES, family_model

    from .train_workers import _randomise_zeros, train_model

    return _randomise_zeros(family_model(name), 0) if name in FAMILIES else train_model(name)


def ids_for(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def train_step(model, ids: torch.Tensor, params=None) -> None:
    """One SGD step (lr 0.5: the weights move visibly) on next-token cross-entropy."""
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=0.5)
    out = model(input_ids=ids)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


def files_of(d: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors itself."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in b if k in a),
               default=0.0)


# ---------------------------------------------------------------------------------------------
# world 2: train one step, save, reload in transformers

def train_and_save(rank: int, name: str, group, root: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = build(name)
    ref = copy.deepcopy(model)
    tp = fxtp.transform(model, 2, group=group)
    fxtp.for_training(tp)
    ids = ids_for(model.config.vocab_size)
    train_step(tp, ids)
    train_step(ref, ids)
    out = os.path.join(root, f"{name}_w2")
    report = fxtp.save(tp, out)
    result = {"files": report.files, "written": report.written, "kind": report.kind,
              "bytes_written": report.bytes_written, "tensors": report.tensors,
              "largest": report.largest_tensor, "staged": report.peak_staged,
              "shard_bytes": sum(p.numel() * p.element_size() for p in tp.parameters())}
    dist.barrier(group)
    if rank == 0:
        ref_dir = os.path.join(root, f"{name}_ref")
        ref.save_pretrained(ref_dir)
        mine, theirs = files_of(out), files_of(ref_dir)
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        result.update(
            listing=sorted(os.listdir(out)), ref_listing=sorted(os.listdir(ref_dir)),
            names=sorted(mine), ref_names=sorted(theirs),
            layouts={k: (list(v.shape), str(v.dtype)) for k, v in mine.items()},
            ref_layouts={k: (list(v.shape), str(v.dtype)) for k, v in theirs.items()},
            file_error=max_diff(mine, theirs),
            reload_error=max_diff(reloaded.state_dict(), ref.state_dict()),
            moved=max_diff(ref.state_dict(), build(name).state_dict()),
            config_same=_json(out, "config.json") == _json(ref_dir, "config.json"),
            generation_same=_json(out, "generation_config.json")
            == _json(ref_dir, "generation_config.json"),
            index=_json(out, "model.safetensors.index.json"),
            leftovers=[f for f in os.listdir(root) if "fxtp-" in f])
    return result


def _json(d: str, name: str):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


# ---------------------------------------------------------------------------------------------
# reload at another world size (init_empty + transform + load), equal to transformers' reload

def reload(rank: int, ws: int, group, name: str, src: str, save_to: str = "") -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(cfg)
    tp = fxtp.transform(empty, ws, group=group)
    fxtp.load(tp, src)
    expected = AutoModelForCausalLM.from_pretrained(src).eval()
    rep = check_equivalence(expected, tp, hf_inputs(cfg.vocab_size, max_batch=2, max_seq=10),
                            max_examples=EXAMPLES)
    result = {"max_error": rep.worst, "examples": rep.examples,
              "sliced": sum(1 for n in tp.meta["fxtp"].param_slices)}
    if save_to:
        fxtp.save(tp, save_to)
        dist.barrier(group)
        if rank == 0:    # reassembled from 4 ranks' slices: the same bits as from 2
            a, b = files_of(save_to), files_of(src)
            result["resaved_same"] = sorted(a) == sorted(b) and all(
                torch.equal(a[k], b[k]) for k in b)
    return result


# ---------------------------------------------------------------------------------------------
# PEFT: the adapter, and the base with the adapters merged

def peft_case(rank: int, group, root: str) -> dict[str, Any]:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from .train_workers import lora_model, train_model

    model = lora_model("llama")
    ref = copy.deepcopy(model)
    tp = fxtp.transform(model, 2, group=group)
    fxtp.for_training(tp)
    ids = ids_for(128, seed=3)
    train_step(tp, ids, [p for p in tp.parameters() if p.requires_grad])
    train_step(ref, ids, [p for p in ref.parameters() if p.requires_grad])
    adapter, merged = os.path.join(root, "adapter"), os.path.join(root, "merged")
    report = fxtp.save(tp, adapter)
    merged_report = fxtp.save(tp, merged, merged=True)
    fxtp.fold_lora(tp)       # folded: the adapters are unchanged, the weights are merged
    folded_adapter, folded_merged = adapter + "_folded", merged + "_folded"
    fxtp.save(tp, folded_adapter)
    fxtp.save(tp, folded_merged, merged=True)
    fxtp.unfold_lora(tp)
    result = {"kind": report.kind, "files": report.files, "merged_kind": merged_report.kind,
              "merged_files": merged_report.files}
    dist.barrier(group)
    if rank == 0:
        ref_dir = os.path.join(root, "adapter_ref")
        ref.save_pretrained(ref_dir)
        expected = {k: v for k, v in get_peft_model_state_dict(ref).items()}
        reloaded = PeftModel.from_pretrained(train_model("llama"), adapter).eval()
        x = ids_for(128, seed=4)
        with torch.no_grad():
            err = (reloaded(input_ids=x).logits - ref.eval()(input_ids=x).logits).abs().max()
        ref_merged = copy.deepcopy(ref).merge_and_unload()
        merged_model = AutoModelForCausalLM.from_pretrained(merged)
        result.update(
            listing=sorted(os.listdir(adapter)), ref_listing=sorted(os.listdir(ref_dir)),
            adapter_error=max_diff(files_of(adapter), expected),
            names_same=sorted(files_of(adapter)) == sorted(files_of(ref_dir)),
            config_diff=_differ(_json(adapter, "adapter_config.json"),
                                _json(ref_dir, "adapter_config.json")),
            reload_error=float(err),
            merged_error=max_diff(merged_model.state_dict(), ref_merged.state_dict()),
            merged_names=sorted(files_of(merged)) == sorted(ref_merged.state_dict()),
            folded_adapter_same=_same_files(adapter, folded_adapter),
            folded_merged_error=max_diff(files_of(folded_merged), files_of(merged)))
    return result


def _differ(a: dict, b: dict) -> dict:
    """Keys whose values differ; lists compared as sets (PEFT writes sets, such as
    target_modules, as lists in the set's iteration order, which a copy may change)."""
    def norm(v):
        return sorted(map(str, v)) if isinstance(v, list) else v
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if norm(a.get(k)) != norm(b.get(k))}


def _same_files(a: str, b: str) -> bool:
    x, y = files_of(a), files_of(b)
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------
# a training snapshot (fxtp.save_state): resumed at the same world size, bit for bit

def adam_step(tp, opt, ids) -> None:
    out = tp(input_ids=ids).logits
    torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]),
                                      ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


def state_case(rank: int, group, root: str) -> dict[str, Any]:
    from .train_workers import train_model

    tp = fxtp.transform(train_model("llama"), 2, group=group)
    fxtp.for_training(tp)
    opt = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    adam_step(tp, opt, ids_for(128, 5))
    snap = os.path.join(root, "snapshot")
    fxtp.save_state(tp, snap, optimizer=opt)
    with fxtp.init_empty():
        from fxtp.testing.models import tiny_model

        empty = tiny_model("llama")
    resumed = fxtp.transform(empty, 2, group=group)
    fxtp.for_training(resumed)
    early = _error(lambda: fxtp.load_state(resumed, snap, optimizer=torch.optim.AdamW(
        resumed.parameters())))
    fxtp.load_state(resumed, snap)                       # the weights, from meta
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    fxtp.load_state(resumed, snap, optimizer=opt2)       # then the optimizer
    for i in range(2):
        adam_step(tp, opt, ids_for(128, 6 + i))
        adam_step(resumed, opt2, ids_for(128, 6 + i))
    same = all(torch.equal(a, b) for a, b in zip(tp.parameters(), resumed.parameters()))
    other = fxtp.transform(train_model("gpt2"), 2, group=group)
    return {"same_after_two_steps": same, "listing": sorted(os.listdir(snap)),
            "meta_optimizer": early, "other_model": _error(lambda: fxtp.load_state(other, snap))}


# ---------------------------------------------------------------------------------------------
# errors (ranks 2 and 3): nothing half-written is left at the path, every rank raises

def _error(fn: Callable[[], Any]) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:      # noqa: BLE001 - the test reads the class and the message
        return type(e).__name__, str(e)
    return "", ""


def error_cases(rank: int, group, root: str) -> dict[str, Any]:
    from fxtp.saving import writer
    from fxtp.testing.models import tiny_model

    from .train_workers import train_model

    local = rank - 2
    os.makedirs(root, exist_ok=True)
    model = train_model("llama")
    tp = fxtp.transform(model, 2, group=group)
    out: dict[str, Any] = {}
    busy = os.path.join(root, "busy")
    if local == 0:
        os.makedirs(busy)
        open(os.path.join(busy, "tokenizer.json"), "w").write("{}")
    dist.barrier(group)
    out["not_empty"] = _error(lambda: fxtp.save(tp, busy))
    out["not_empty_kept"] = sorted(os.listdir(busy))
    # a disk that fills on one rank: every rank raises, nothing at the path, no leftovers
    full = os.path.join(root, "full")
    original = writer.TensorFile.write

    def no_space(self, name, offset, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    if local == 1:
        writer.TensorFile.write = no_space
    try:
        out["disk_full"] = _error(lambda: fxtp.save(tp, full))
        # overwrite=True that fails keeps the old directory as it was
        out["disk_full_overwrite"] = _error(lambda: fxtp.save(tp, busy, overwrite=True))
    finally:
        writer.TensorFile.write = original
    dist.barrier(group)
    out["full_exists"] = os.path.exists(full)
    out["busy_after_failure"] = sorted(os.listdir(busy))
    out["overwrite"] = _error(lambda: fxtp.save(tp, busy, overwrite=True))
    out["busy_after_overwrite"] = sorted(os.listdir(busy))
    # many small files: an index, every file read back by transformers
    small = os.path.join(root, "small")
    out["small_files"] = fxtp.save(tp, small, max_shard_size="40KB").files
    dist.barrier(group)
    out["small_error"] = _reload_error(small, model) if local == 0 else 0.0
    out["bad_shard_size"] = _error(lambda: fxtp.save(tp, os.path.join(root, "x"),
                                                     max_shard_size="lots"))
    out["merged_plain"] = _error(lambda: fxtp.save(tp, os.path.join(root, "x"), merged=True))
    # ranks asking for different checkpoints
    out["different"] = _error(lambda: fxtp.save(tp, os.path.join(root, "y"),
                                                max_shard_size="40KB" if local else "50GB"))
    with fxtp.init_empty():
        empty = tiny_model("llama")
    meta_tp = fxtp.transform(empty, 2, group=group)
    out["unloaded"] = _error(lambda: fxtp.save(meta_tp, os.path.join(root, "z")))
    dist.barrier(group)
    out["leftovers"] = sorted(f for f in os.listdir(root) if "fxtp-" in f)
    out["made"] = sorted(f for f in ("x", "y", "z", "full") if os.path.exists(os.path.join(root, f)))
    return out


def _reload_error(d: str, model) -> float:
    from transformers import AutoModelForCausalLM

    return max_diff(AutoModelForCausalLM.from_pretrained(d).state_dict(), model.state_dict())


# ---------------------------------------------------------------------------------------------

def _run(out: dict, key: str, fn: Callable[[], Any]) -> None:
    try:
        out[key] = fn()
    except Exception:
        out[key] = {"exception": traceback.format_exc()}


def run_all(rank: int, ws: int, root: str) -> dict[str, Any]:
    assert ws == 4
    torch.manual_seed(0)
    pair = dist.new_group([0, 1])
    other = dist.new_group([2, 3])
    out: dict[str, Any] = {}
    if rank < 2:
        for name in MODELS:
            _run(out, f"w2/{name}", lambda: train_and_save(rank, name, pair, root))
        _run(out, "peft", lambda: peft_case(rank, pair, root))
        _run(out, "state", lambda: state_case(rank, pair, root))
    else:
        _run(out, "errors", lambda: error_cases(rank, other, os.path.join(root, "errors")))
    dist.barrier()
    for name in MODELS:
        _run(out, f"w4/{name}", lambda: reload(rank, 4, None, name, os.path.join(root, f"{name}_w2"),
                                               save_to=os.path.join(root, f"{name}_w4")))
    with fxtp.init_empty():
        from fxtp.testing.models import tiny_model

        empty = tiny_model("llama")
    _run(out, "state_at_4", lambda: {"error": _error(lambda: fxtp.load_state(
        fxtp.transform(empty, 4), os.path.join(root, "snapshot")))})
    dist.barrier()
    if rank < 2:
        for name in MODELS:
            _run(out, f"back2/{name}", lambda: reload(rank, 2, pair, name,
                                                      os.path.join(root, f"{name}_w4")))
    dist.barrier()
    return out
