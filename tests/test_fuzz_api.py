"""Hypothesis fuzzing of the public API with bad inputs (issue 15, item 7), in this process at
world size 1: every drawn bad call raises an FxtpError subclass whose message names the input,
and changes nothing (every tensor of tp and of the model bitwise, the plan's decisions, the LoRA
fold state). The world-2 half runs in gloo ranks: tests/test_fuzz_ranks.py.

The number of cases each property tried is counted in CASES and printed by the last test
(`pytest -s` or `-rP` shows it)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxtp
from fxtp.planning.overrides import check_overrides

from .fuzz_cases import (
    Snapshot,
    attempt,
    bad_calls,
    bad_world_sizes,
    fuzz_settings,
    junk,
    names,
    overrides_for,
    small_llama,
)
from .modules import PlainMLP

CASES: dict[str, int] = {}


def tried(key: str) -> None:
    CASES[key] = CASES.get(key, 0) + 1


def assert_refused(outcome, *expected) -> None:
    problems = outcome.problems(expected or (fxtp.FxtpError,))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def llama():
    return small_llama()


@pytest.fixture(scope="module")
def plan(llama):
    return fxtp.plan(llama, 1)       # the one capture of this file


@pytest.fixture(scope="module")
def tp(llama, plan):
    return fxtp.transform(llama, 1, plan=plan)


@pytest.fixture(scope="module")
def modules(llama):
    return sorted(n for n, _ in llama.named_modules() if n)


def test_calls_the_graph_was_not_captured_for(llama, tp):
    @fuzz_settings(40)
    @given(bad_calls())
    def prop(call):
        kind, args, kwargs, words = call
        tried("tp(...) bad inputs")
        before = Snapshot(tp, llama)
        with torch.no_grad():
            assert_refused(attempt(kind, lambda: tp(*args, **kwargs), words, before),
                           fxtp.InputError)

    prop()
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():        # still the model's answer; a None mask reads as all ones
        torch.testing.assert_close(tp(input_ids=ids, attention_mask=None).logits,
                                   llama(input_ids=ids).logits)


def test_world_sizes(llama, plan):
    @fuzz_settings(40)
    @given(bad_world_sizes(valid=1), st.sampled_from(["plan", "transform", "replan",
                                                      "generator"]))
    def prop(ws, where):
        is_int = isinstance(ws, int) and not isinstance(ws, bool)
        if where in ("plan", "replan") and is_int and ws >= 1 or where == "replan" and ws is None:
            where = "transform"           # a valid size would plan: transform needs a group
        tried("world sizes")
        before = Snapshot(model=llama, plan=plan)
        call = {"plan": lambda: fxtp.plan(llama, ws), "replan": lambda: plan.replan(ws),
                "transform": lambda: fxtp.transform(llama, ws, plan=plan),
                "generator": lambda: fxtp.generator(llama, ws, max_len=8)}[where]
        expected = ((fxtp.PlanOverrideError,) if where in ("plan", "replan")
                    else (fxtp.ProcessGroupError,))
        words = ("world_size",) if not (is_int and ws > 1) else ("process group",)
        assert_refused(attempt(f"{where}({ws!r})", call, words, before), *expected)

    prop()


def test_overrides_naming_unknown_modules_or_bad_values(llama, plan, modules):
    @fuzz_settings(40)
    @given(overrides_for(modules))
    def prop(drawn):
        decisions, words = drawn
        tried("plan.override")
        before = Snapshot(model=llama, plan=plan)
        assert_refused(attempt(f"override({decisions!r})", lambda: plan.override(decisions),
                               words, before), fxtp.PlanOverrideError)
        try:
            check_overrides(decisions)
        except fxtp.PlanOverrideError:  # fxtp.plan(overrides=) refuses these before capturing
            assert_refused(attempt(f"plan(overrides={decisions!r})",
                                   lambda: fxtp.plan(llama, 1, overrides=decisions), words,
                                   before), fxtp.PlanOverrideError)

    prop()


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = PlainMLP().eval()
    return model, (torch.randn(2, 3, 16),)


def test_hand_edited_plans(mlp):
    """A saved plan cut, retyped or edited: refused with PlanOverrideError, or (an edit of a
    field the plan does not decide with) accepted with the model's own answer."""
    from .fuzz_cases import json_edits

    model, x = mlp
    saved = fxtp.plan(model, 1, example_inputs=x)
    ref = model(*x)
    stats = {"refused": 0, "accepted": 0}

    @fuzz_settings(30)
    @given(json_edits(saved.to_json()))
    def prop(edit):
        what, text = edit
        tried("Plan.from_json + transform")
        before = Snapshot(model=model, plan=saved)
        result = {}

        def load_and_transform():
            result["tp"] = fxtp.transform(model, 1, example_inputs=x,
                                          plan=fxtp.Plan.from_json(text))
        out = attempt(what, load_and_transform, (), before)
        if out.error is None:
            stats["accepted"] += 1
            torch.testing.assert_close(result["tp"](*x), ref)
        else:
            stats["refused"] += 1
            assert_refused(out, fxtp.PlanOverrideError)
            assert "plan" in out.message.lower(), out.message

    prop()
    assert stats["refused"] > stats["accepted"], stats


def test_inspection_of_other_objects_and_unknown_layers(llama, tp, plan):
    objects = {"model": llama, "none": None, "plan": plan, "dict": {}, "int": 3}

    @fuzz_settings(25)
    @given(st.sampled_from(["explain", "diff"]),
           st.one_of(st.sampled_from(sorted(objects)), st.just("tp")),
           st.one_of(st.none(), names, st.integers(-2, 9),
                     st.builds(lambda i: f"model.layers.{i}", st.integers(2, 99))))
    def prop(fn, obj, layer):
        target = tp if obj == "tp" else objects[obj]
        call = (lambda: getattr(fxtp, fn)(target, layer))
        if obj == "tp" and (layer is None or fn == "explain" and layer is None):
            return               # the valid calls: covered elsewhere
        tried("explain/diff")
        before = Snapshot(tp, llama)
        words = (type(target).__name__,) if obj != "tp" else (str(layer),)
        expected = fxtp.NotTransformedError if obj != "tp" else fxtp.FxtpError
        assert_refused(attempt(f"{fn}({obj}, {layer!r})", call, words, before), expected)

    prop()


def test_lora_switches_on_other_objects(llama, tp, plan):
    """fold/unfold/for_training/for_generation take fxtp.transform's graph: anything else is
    NotTransformedError; a graph without LoRA: NoLoraError / LoraStateError."""
    objects = {"model": llama, "none": None, "plan": plan, "dict": {}, "str": "tp", "tp": tp}
    expect = {"fold_lora": fxtp.NoLoraError, "unfold_lora": fxtp.LoraStateError}

    @fuzz_settings(20)
    @given(st.sampled_from(["fold_lora", "unfold_lora", "for_training", "for_generation"]),
           st.sampled_from(sorted(objects)))
    def prop(fn, obj):
        if obj == "tp" and fn not in expect:
            return               # valid
        tried("fold/unfold/for_* targets")
        target = objects[obj]
        before = Snapshot(tp, llama)
        words = ("fold",) if obj == "tp" else (type(target).__name__,)
        cls = expect[fn] if obj == "tp" else fxtp.NotTransformedError
        assert_refused(attempt(f"{fn}({obj})", lambda: getattr(fxtp, fn)(target), words,
                               before), cls)

    prop()


@pytest.fixture(scope="module")
def checkpoint(llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_ckpt")
    llama.save_pretrained(d, safe_serialization=True)
    empty = tmp_path_factory.mktemp("empty")
    junkdir = tmp_path_factory.mktemp("junk")
    (junkdir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2]}   ")
    return str(d), str(empty), str(junkdir)


def test_load_arguments(llama, tp, checkpoint):
    """One bad argument of fxtp.load into a loaded graph: refused before anything is read."""
    good, empty, junkdir = checkpoint
    cases = st.one_of(
        st.tuples(st.just("path"), st.one_of(junk.filter(lambda v: not isinstance(v, str)),
                                              st.sampled_from([empty, junkdir, good + "/nope",
                                                               os.path.join(good, "config.json")]))),
        st.tuples(st.just("adapter"), st.sampled_from([empty, junkdir, good + "/nope"])),
        st.tuples(st.just("device"), st.sampled_from(["gpu", "meta", "cuda:x", 3.5, "cpu:-2"])),
        st.tuples(st.just("dtype"), st.sampled_from([torch.int32, torch.bfloat16, torch.float16,
                                                     "float32", torch.bool, 1])),
        st.tuples(st.just("reader"), st.one_of(names, st.none())))

    @fuzz_settings(30)
    @given(cases)
    def prop(case):
        arg, value = case
        tried("fxtp.load arguments")
        kwargs = {"path": good}
        kwargs[arg] = value
        before = Snapshot(tp, llama)
        cls = fxtp.DtypeError if arg == "dtype" else fxtp.CheckpointError
        words = {"path": ("path", "safetensors", str(value)), "adapter": (str(value),),
                 "device": ("device",), "dtype": ("dtype",), "reader": ("reader",)}[arg]
        path = kwargs.pop("path")
        assert_refused(attempt(f"load({arg}={value!r})", lambda: fxtp.load(tp, path, **kwargs),
                               words, before), cls)

    prop()
    rep = fxtp.load(tp, good)      # the graph still loads the good checkpoint
    assert rep.bytes_read == rep.full_bytes


def test_a_graph_moved_to_meta_refuses_calls(llama, plan):
    """tp.to("meta") drops the values: a call says to load them (it returned meta logits)."""
    tp = fxtp.transform(llama, 1, plan=plan).to("meta")
    with pytest.raises(fxtp.MetaTensorError, match=r"fxtp\.load"):
        tp(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_zz_cases_tried():
    total = sum(CASES.values())
    print("\nfuzz cases tried in process (world size 1):")
    for k, n in sorted(CASES.items()):
        print(f"  {k}: {n}")
    print(f"  total: {total}")
    assert total >= 150, CASES
