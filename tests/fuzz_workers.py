"""The world-2 half of the API fuzzing (tests/test_fuzz_ranks.py): one spawn of 2 gloo ranks
runs every section; hypothesis is derandomized, so both ranks draw the same cases in the same
order and reach the same collectives (a good call after the bad ones, a load's agreement
step). Nothing is asserted here: each section returns how many cases it tried, the problems
it saw (an accepted bad input, an error that is not an FxtpError of the expected class, a
message that does not name the input, a change left by a refused call) and a few checks."""
from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import fxtp

from .fuzz_cases import (
    Snapshot,
    attempt,
    bad_calls,
    bad_world_sizes,
    fuzz_settings,
    json_edits,
    names,
    small_llama,
    small_lora,
    wrong_shape,
)

TOL = 1e-4


class Section:
    """Counts the cases of one section and collects the problems of their outcomes."""

    def __init__(self) -> None:
        self.tried = 0
        self.problems: list[str] = []
        self.errors: Counter = Counter()
        self.checks: dict[str, Any] = {}

    def refused(self, outcome, *expected) -> None:
        self.tried += 1
        self.errors[outcome.error or "accepted"] += 1
        self.problems += outcome.problems(expected or (fxtp.FxtpError,))

    def result(self) -> dict[str, Any]:
        return {"tried": self.tried, "problems": self.problems, "errors": dict(self.errors),
                "checks": self.checks}


def _max_error(a, b) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------

def _transform_section(ws: int, llama, plan, lora, lora_plan) -> dict[str, Any]:
    """Wrong world sizes, plans of another world size / model / config / dtype / device, and
    things that are not plans; then a plan of one instance applied to another (its weights)."""

    from .modules import PlainMLP

    sec = Section()
    torch.manual_seed(0)
    mlp = PlainMLP().eval()
    x = (torch.randn(2, 3, 16),)
    mlp_plan = fxtp.plan(mlp, ws, example_inputs=x)
    others = {"plan_ws1": (mlp, mlp_plan.replan(1)), "plan_ws4": (mlp, mlp_plan.replan(4)),
              "lora_plan": (llama, lora_plan), "mlp_plan": (llama, mlp_plan),
              "other_config": (small_llama(intermediate_size=96), plan),
              "more_layers": (small_llama(num_hidden_layers=2), plan),
              "tied": (small_llama(tie_word_embeddings=True), plan),
              "bf16": (small_llama().to(torch.bfloat16), plan),
              "lora_model": (lora, plan),
              "dict": (llama, plan.to_dict()), "json": (llama, plan.to_json()),
              "list": (llama, [plan])}
    with fxtp.init_empty():
        others["meta_model"] = (small_llama(), plan)
    words = {"plan_ws1": ("world_size=1",), "plan_ws4": ("world_size=4",),
             "dict": ("Plan", "dict"), "json": ("Plan", "str"), "list": ("Plan", "list")}

    @fuzz_settings(30)
    @given(st.one_of(bad_world_sizes(valid=ws).map(lambda w: ("ws", w)),
                     st.sampled_from(sorted(others)).map(lambda k: ("plan", k))))
    def prop(case):
        kind, value = case
        if kind == "ws":
            before = Snapshot(model=llama, plan=plan)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            cls = fxtp.WorldSizeMismatchError if is_int and value >= 1 else fxtp.ProcessGroupError
            sec.refused(attempt(f"transform(ws={value!r})",
                                lambda: fxtp.transform(llama, value, plan=plan),
                                ("world_size",), before), cls)
            return
        model, p = others[value]
        before = Snapshot(model=model, plan=p if isinstance(p, fxtp.Plan) else None)
        sec.refused(attempt(f"transform(plan={value})", lambda: fxtp.transform(model, ws, plan=p),
                            words.get(value, ("plan",)), before), fxtp.PlanOverrideError)

    prop()
    # a plan captured from one instance, applied to another of the same config: the other's
    # weights (they were the first instance's before)
    other = small_llama(seed=5)
    tp = fxtp.transform(other, ws, plan=plan)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sec.checks["other_instance_error"] = _max_error(tp(input_ids=ids).logits,
                                                        other(input_ids=ids).logits)
        sec.checks["first_instance_gap"] = _max_error(tp(input_ids=ids).logits,
                                                      llama(input_ids=ids).logits)
    return sec.result()


def _calls_section(llama, tp) -> dict[str, Any]:
    sec = Section()

    @fuzz_settings(30)
    @given(bad_calls())
    def prop(call):
        kind, args, kwargs, words = call
        before = Snapshot(tp, llama)
        with torch.no_grad():
            sec.refused(attempt(kind, lambda: tp(*args, **kwargs), words, before),
                        fxtp.InputError)

    prop()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sec.checks["after_error"] = _max_error(tp(input_ids=ids).logits,
                                               llama(input_ids=ids).logits)
    return sec.result()


# ---------------------------------------------------------------------------------------------
# checkpoints

def _write_case(root: str, base: dict, kind: str, draw: Any) -> tuple[str, tuple]:
    """Writes one broken copy of the llama checkpoint under `root`; returns (dir, words)."""
    import json
    import struct

    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    f = os.path.join(root, "model.safetensors")
    sd = dict(base["sd"])
    keys = sorted(sd)
    if kind == "truncate":
        data = base["bytes"]
        at = draw(st.integers(0, len(data) - 1))
        open(f, "wb").write(data[:at])
        return root, ("truncated",)
    if kind in ("drop", "rename", "reshape", "retype"):
        name = draw(st.sampled_from(keys))
        if kind == "drop":
            del sd[name]
        elif kind == "rename":
            new = draw(st.sampled_from([name + "_", name.replace("model.", "model.x.", 1),
                                        name.upper(), "base_model." + name]))
            sd[new] = sd.pop(name)
        elif kind == "reshape":
            sd[name] = wrong_shape(sd[name], draw(st.integers(0, 3)))
        else:
            dt = draw(st.sampled_from([torch.int32, torch.int64, torch.int8, torch.uint8,
                                       torch.bool, torch.int16]))
            sd[name] = sd[name].to(dt)
        save_file(sd, f)
        return root, (name,)
    if kind == "header":
        data = base["bytes"]
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        name = draw(st.sampled_from(keys))
        how = draw(st.sampled_from(["offsets", "dtype_size", "not_dict", "record", "shape"]))
        if how == "offsets":
            a, b = header[name]["data_offsets"]
            header[name]["data_offsets"] = [a, b - draw(st.integers(1, 8)) * 4]
        elif how == "dtype_size":
            header[name]["dtype"] = draw(st.sampled_from(["F64", "F16", "I8"]))
        elif how == "shape":
            header[name]["shape"] = header[name]["shape"] + [2]
        elif how == "record":
            header[name] = draw(st.sampled_from([[1, 2], "x", {"dtype": "F32"}, None]))
        else:
            header = draw(st.sampled_from([[], [name], 3, "x"]))
        text = json.dumps(header).encode()
        open(f, "wb").write(struct.pack("<Q", len(text)) + text + data[8 + n:])
        return root, (("safetensors",) if how in ("not_dict", "record") else (name,))
    if kind == "index":
        os.remove(f) if os.path.exists(f) else None
        half = keys[: len(keys) // 2]
        save_file({k: sd[k] for k in half}, os.path.join(root, "part-1.safetensors"))
        save_file({k: sd[k] for k in keys if k not in half}, os.path.join(root, "part-2.safetensors"))
        index = {"weight_map": {k: ("part-1.safetensors" if k in half else "part-2.safetensors")
                                for k in keys}}
        how = draw(st.sampled_from(["missing_file", "not_a_map", "not_json", "no_map"]))
        if how == "missing_file":
            os.remove(os.path.join(root, "part-2.safetensors"))
        elif how == "not_a_map":
            index["weight_map"] = draw(st.sampled_from([["part-1.safetensors"], "x", 3]))
        elif how == "no_map":
            index = {"metadata": {}}
        path = os.path.join(root, "model.safetensors.index.json")
        text = json.dumps(index) if how != "not_json" else "{weight_map:"
        open(path, "w").write(text)
        return root, ("index",)
    raise KeyError(kind)


def _load_section(rank: int, llama, tp, dirs: dict[str, str]) -> dict[str, Any]:
    """Broken checkpoints into a loaded graph: each refused before anything is swapped in (on
    both ranks), the graph's tensors bitwise as they were; then a good load still works."""
    from safetensors.torch import load_file

    sec = Section()
    src = os.path.join(dirs["llama_one"], "model.safetensors")
    base = {"sd": load_file(src), "bytes": open(src, "rb").read()}
    counter = [0]

    @fuzz_settings(40)
    @given(st.data())
    def prop(data):
        kind = data.draw(st.sampled_from(["truncate", "drop", "rename", "reshape", "retype",
                                          "header", "index", "other"]))
        counter[0] += 1
        if kind == "other":
            which = data.draw(st.sampled_from(["gpt2", "llama_wide"]))
            path, words = dirs[which], (("another architecture",) if which == "gpt2"
                                        else ("mlp",))
        else:
            root = os.path.join(dirs["root"], f"rank{rank}", f"case{counter[0]}")
            path, words = _write_case(root, base, kind, data.draw)
        before = Snapshot(tp, llama)
        sec.refused(attempt(f"load {kind} ({path})", lambda: fxtp.load(tp, path), words, before),
                    fxtp.CheckpointError)

    prop()
    rep = fxtp.load(tp, dirs["llama_one"])
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sec.checks["good_load_error"] = _max_error(tp(input_ids=ids).logits,
                                                   llama(input_ids=ids).logits)
    sec.checks["good_load_bytes"] = rep.bytes_read
    return sec.result()


# ---------------------------------------------------------------------------------------------
# LoRA switches as a random sequence of operations

OPS = ("fold", "unfold", "for_training", "for_generation", "train", "eval", "load", "to_cpu",
       "forward")


def _lora_section(ws: int, dirs: dict[str, str], llama_tp, model, plan) -> dict[str, Any]:
    """Random sequences of fold / unfold / for_training / for_generation / train / load / move
    on a LoRA graph against a model of the state it must be in: an operation the state does
    not allow is refused with LoraStateError and changes nothing; outputs stay the model's."""
    from fxtp.modes import is_folded

    sec = Section()
    tp = fxtp.transform(model, ws, plan=plan)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    worst = [0.0]
    wrong_state: list[str] = []

    @fuzz_settings(12)
    @given(st.lists(st.sampled_from(OPS), min_size=2, max_size=7))
    def prop(ops):
        for op in ops:
            folded = is_folded(tp)
            refuse = folded and op in ("fold", "train", "load", "to_cpu") or \
                (not folded and op == "unfold")
            if not refuse and op == "load":
                continue         # a good load: covered by tests/test_load.py
            call = {"fold": lambda: fxtp.fold_lora(tp), "unfold": lambda: fxtp.unfold_lora(tp),
                    "for_training": lambda: fxtp.for_training(tp),
                    "for_generation": lambda: fxtp.for_generation(tp),
                    "train": lambda: tp.train(), "eval": lambda: tp.eval(),
                    "load": lambda: fxtp.load(tp, dirs["llama_one"]),   # refused first
                    "to_cpu": lambda: tp.to("cpu"), "forward": lambda: None}[op]
            if op == "forward":
                with torch.no_grad():
                    worst[0] = max(worst[0], _max_error(tp(input_ids=ids).logits, ref))
                continue
            if refuse:
                before = Snapshot(tp, model)
                sec.refused(attempt(f"{op} (folded={folded}) in {ops}", call, ("fold",), before),
                            fxtp.LoraStateError)
            else:
                call()
                want = {"fold": True, "unfold": False, "for_training": False,
                        "for_generation": True}.get(op, folded)
                if is_folded(tp) != want:
                    wrong_state.append(f"{op} in {ops}: folded={is_folded(tp)}")

    prop()
    fxtp.for_generation(tp)
    with torch.no_grad():
        worst[0] = max(worst[0], _max_error(tp(input_ids=ids).logits, ref))
    # folding a graph without LoRA
    before = Snapshot(llama_tp)
    sec.refused(attempt("fold_lora(no LoRA)", lambda: fxtp.fold_lora(llama_tp), ("LoRA",),
                        before), fxtp.NoLoraError)
    sec.checks.update(max_error=worst[0], wrong_state=wrong_state)
    return sec.result()


# ---------------------------------------------------------------------------------------------
# generation

def _generator_section(ws: int, llama) -> dict[str, Any]:
    sec = Section()
    before_model = Snapshot(model=llama)
    bad_args = st.sampled_from([
        ("max_len", "16"), ("max_len", 0), ("max_batch", 1.5), ("max_batch", -1),
        ("cuda_graph", "yes"), ("world_size", 3), ("world_size", "2"), ("world_size", 0)])

    @fuzz_settings(8)
    @given(bad_args)
    def bad_generator(arg):
        name, value = arg
        kwargs = {"max_len": 16, "max_batch": 2}
        w = ws
        if name == "world_size":
            w = value
        else:
            kwargs[name] = value
        cls = fxtp.ProcessGroupError if name == "world_size" else fxtp.GenerationError
        sec.refused(attempt(f"generator({name}={value!r})",
                            lambda: fxtp.generator(llama, w, **kwargs),
                            ("world_size",) if name == "world_size" else (name,), before_model),
                    cls)

    bad_generator()
    gen = fxtp.generator(llama, ws, max_len=16, max_batch=2)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 128, (2, 5), generator=g)

    # generation options and model inputs Hugging Face's generate takes: not unknown
    known = {*llama.generation_config.to_dict(), "use_cache", "attention_mask", "input_ids",
             "generation_config", "logits_processor", "stopping_criteria"}

    @st.composite
    def bad_generate(draw):
        kind = draw(st.sampled_from(["ids_dtype", "ids_type", "ids_rank", "batch", "empty",
                                     "mask_shape", "mask_type", "max_new", "too_long",
                                     "beams", "unknown", "temperature"]))
        kw: dict[str, Any] = {"max_new_tokens": 2}
        x: Any = ids
        words: tuple = ("input_ids",)
        cls = fxtp.GenerationError
        if kind == "ids_dtype":
            x = ids.to(draw(st.sampled_from([torch.float32, torch.bool, torch.float16])))
        elif kind == "ids_type":
            x = draw(st.sampled_from([ids.tolist(), None, 3, "hello"]))
        elif kind == "ids_rank":
            x = draw(st.sampled_from([ids[0], ids[None], ids[0, 0]]))
        elif kind == "batch":
            x = torch.randint(1, 128, (draw(st.integers(3, 5)), 4), generator=g)
            words = ("max_batch",)
        elif kind == "empty":
            x = ids[:, :0]
            words = ("empty",)
        elif kind == "mask_shape":
            kw["attention_mask"] = torch.ones(draw(st.sampled_from([(2, 4), (1, 5), (2, 6)])),
                                              dtype=torch.long)
            words = ("attention_mask",)
        elif kind == "mask_type":
            kw["attention_mask"] = draw(st.sampled_from([[[1] * 5] * 2, "ones", 1]))
            words = ("attention_mask",)
        elif kind == "max_new":
            kw["max_new_tokens"] = draw(st.sampled_from([0, -1, "3"]))
            words = ("max_new_tokens", "'<='", "str")
        elif kind == "too_long":
            kw["max_new_tokens"] = draw(st.integers(13, 100))
            words, cls = ("max_len",), fxtp.CacheOverflowError
        elif kind == "beams":
            kw[draw(st.sampled_from(["num_beams", "num_return_sequences"]))] = draw(
                st.integers(2, 4))
            words = ("num_beams", "num_return_sequences")
        elif kind == "unknown":
            extra = draw(st.dictionaries(names.filter(lambda n: n not in known),
                                         st.integers(1, 3), min_size=1, max_size=2))
            kw.update(extra)
            words = tuple(extra)
        else:
            kw.update(do_sample=True, temperature=draw(st.sampled_from([0.0, -1.0, -0.5])))
            words = ("temperature",)
        return kind, x, kw, words, cls

    @fuzz_settings(30)
    @given(bad_generate())
    def prop(case):
        kind, x, kw, words, cls = case
        before = Snapshot(gen, llama)
        sec.refused(attempt(f"generate {kind} {kw}", lambda: gen.generate(x, **kw), words,
                            before), cls)

    prop()
    out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)
    ref = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                         do_sample=False)
    sec.checks["tokens_equal_after_errors"] = bool(torch.equal(out, ref))
    return sec.result()


# ---------------------------------------------------------------------------------------------
# saved plans edited by hand, re-derived at world 2

def _saved_plan_section(ws: int) -> dict[str, Any]:
    import json

    from .modules import PlainMLP

    sec = Section()
    torch.manual_seed(0)
    mlp = PlainMLP().eval()
    x = (torch.randn(2, 3, 16),)
    saved = fxtp.plan(mlp, ws, example_inputs=x)
    text = saved.to_json()
    ref = mlp(*x)
    accepted = [0]
    worst = [0.0]

    @st.composite
    def decision_edits(draw):
        d = json.loads(text)
        e = d["entries"][draw(st.integers(0, len(d["entries"]) - 1))]
        what = draw(st.sampled_from(["placement", "shard", "all_reduces", "world_size",
                                     "vocab_parallel", "drop_entry"]))
        if what == "placement":
            e["placement"] = draw(st.sampled_from(["row", "column", "replicate", "vocab"])
                                  .filter(lambda p: p != e["placement"]))
        elif what == "shard":
            e["shard"] = draw(st.sampled_from(["Shard(0): 3 parts", "Replicate()",
                                               "Shard(1): 2 parts"]).filter(
                lambda s: s != e["shard"]))
        elif what == "all_reduces":
            d["all_reduces_per_layer"] = {"(outside the layers)": draw(st.integers(2, 4))}
        elif what == "world_size":
            d["world_size"] = draw(st.sampled_from([1, 3, 4]))
        elif what == "vocab_parallel":
            d["vocab_parallel"] = True
            d["entries"].append(dict(e, module="embed", parameter="embed.weight",
                                     placement="vocab"))
        else:
            d["entries"].remove(e)
        return f"decision {what}", json.dumps(d)

    @fuzz_settings(16)
    @given(st.one_of(json_edits(text), decision_edits()))
    def prop(edit):
        what, edited = edit
        before = Snapshot(model=mlp, plan=saved)
        result = {}

        def go():
            result["tp"] = fxtp.transform(mlp, ws, example_inputs=x,
                                          plan=fxtp.Plan.from_json(edited))
        out = attempt(what, go, ("plan",), before)
        if out.error is None and not what.startswith("decision"):
            accepted[0] += 1             # an edit of a field that decides nothing
            sec.tried += 1
            with torch.no_grad():
                worst[0] = max(worst[0], _max_error(result["tp"](*x), ref))
            return
        sec.refused(out, fxtp.PlanOverrideError)

    prop()
    sec.checks.update(accepted=accepted[0], accepted_max_error=worst[0])
    return sec.result()


# ---------------------------------------------------------------------------------------------

def run_all(rank: int, ws: int, dirs: dict[str, str]) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    llama = small_llama()              # two captures, shared by the sections
    plan = fxtp.plan(llama, ws)
    tp = fxtp.transform(llama, ws, plan=plan)
    lora = small_lora()
    lora_plan = fxtp.plan(lora, ws)
    out["setup_seconds"] = time.perf_counter() - t0
    out["setup_cpu"] = time.process_time()
    sections = [("transform", lambda: _transform_section(ws, llama, plan, lora, lora_plan)),
                ("calls", lambda: _calls_section(llama, tp)),
                ("load", lambda: _load_section(rank, llama, tp, dirs)),
                ("lora", lambda: _lora_section(ws, dirs, tp, lora, lora_plan)),
                ("generator", lambda: _generator_section(ws, llama)),
                ("saved_plans", lambda: _saved_plan_section(ws))]
    for key, fn in sections:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out[key] = fn()
        except Exception:
            out[key] = {"exception": traceback.format_exc()}
        out[key]["seconds"] = time.perf_counter() - t0
        out[key]["cpu"] = time.process_time() - c0
    return out


def write_checkpoints(root: str) -> dict[str, str]:
    """In the test process: the llama checkpoint as one file, a GPT-2 and a wider llama (other
    architecture, other config). Returns name -> directory."""
    from fxtp.testing.models import tiny_model

    dirs = {"root": root}
    for name, model in (("llama_one", small_llama()), ("gpt2", tiny_model("gpt2")),
                        ("llama_wide", small_llama(intermediate_size=96))):
        dirs[name] = os.path.join(root, name)
        model.save_pretrained(dirs[name], safe_serialization=True)
    return dirs
