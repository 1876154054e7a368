"""Device and dtype on a CPU-only machine (world size 1, in process): fxtp makes every tensor on
the model's device and in its dtype, never on a default device. Without a GPU a tensor made on
the wrong device would go unnoticed (everything is the CPU), so these tests make such mistakes
visible in two ways: a model built on the meta device, whose graph must then hold nothing but
meta, and a default device of meta (`with torch.device("meta")`), under which any tensor fxtp
creates without naming a device has no data and fails."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.models import tiny_model
from fxtp.passes.devices import graph_devices
from fxtp.transform import tensor_attrs

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def tensors_in(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from `obj` through dataclass fields, dicts, lists and tuples
    (what fxtp keeps beside the graph: TPInfo, the plan, its solution)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.fx.GraphModule):
        return list(tensor_attrs(obj).values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        return []
    return [t for x in items for t in tensors_in(x, seen)]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tp(llama):
    return fxtp.transform(llama, 1)


def test_the_users_model_is_left_untouched_and_shares_no_storage(llama, tp):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    storages = {p.untyped_storage().data_ptr() for p in llama.parameters()}
    assert not any(t.untyped_storage().data_ptr() in storages for t in tp.parameters())
    # training the graph (an SGD step) moves its weights, not the model's
    tp.train()
    loss = tp(input_ids=IDS).logits.square().mean()
    loss.backward()
    with torch.no_grad():
        for p in tp.parameters():
            p -= 0.1 * p.grad
    tp.eval()
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(logits(tp), logits(llama))


def test_the_result_keeps_no_reference_to_the_full_weights():
    model = tiny_model("llama")
    ref = logits(model)
    tp = fxtp.transform(model, 1)
    weights = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert all(w() is None for w in weights)            # freed with the model
    # what fxtp keeps beside the graph (the plan with its captured graph) holds shapes only
    kept = tensors_in(tp.meta["fxtp"])
    assert kept and all(t.device.type == "meta" for t in kept)
    assert torch.equal(logits(tp), ref)


def test_meta_built_model_holds_nothing_but_meta_until_loaded(tmp_path):
    """A model built entirely on meta: the graph's device arguments, its tensors and fxtp's
    records hold no other device (a tensor fxtp made on the CPU would show up here)."""
    cfg = tiny_model("llama").config
    with torch.device("meta"):
        bare = AutoModelForCausalLM.from_config(cfg)
    tp = fxtp.transform(bare, 1)
    assert graph_devices(tp) == {torch.device("meta")}
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"meta"}
    assert {t.device.type for t in tensors_in(tp.meta["fxtp"])} == {"meta"}
    # init_empty: the same, except the buffers the model computed itself (inv_freq)
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(cfg)
    tp = fxtp.transform(empty, 1)
    assert graph_devices(tp) == {torch.device("meta")}
    real = {n for n, t in tensor_attrs(tp).items() if t.device.type != "meta"}
    assert real == {n for n, _ in empty.named_buffers()}
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    fxtp.load(tp, str(tmp_path), device="cpu")
    assert graph_devices(tp) == {torch.device("cpu")}
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"cpu"}
    assert torch.allclose(logits(tp), logits(model), atol=1e-5)


def test_nothing_is_made_on_the_default_device(llama):
    """Under a default device of meta, a tensor fxtp makes without naming its device (an index,
    a capture input, a mask) has no data: capture, planning, rewrite and the forward fail."""
    ref = logits(llama)
    with torch.device("meta"):
        tp = fxtp.transform(llama, 1)
        out = logits(tp)
    assert out.device.type == "cpu" and torch.equal(out, ref)


def test_bf16_model_end_to_end_in_process(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    tp = fxtp.transform(model, 1)
    assert {p.dtype for p in tp.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(tp), logits(model))
    # an fp32 checkpoint into a bf16 meta-built model: cast while reading
    fp32 = tiny_model("llama")
    fp32.save_pretrained(tmp_path)
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(fp32.config, dtype=torch.bfloat16)
    tp = fxtp.transform(empty, 1)
    report = fxtp.load(tp, str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in tp.parameters()} == {torch.bfloat16}
    assert report.bytes_loaded * 2 == report.bytes_read       # read fp32, hold bf16
    # == Hugging Face loading the same checkpoint in bf16 (rotary inv_freq stays fp32 there;
    # model.to(bf16) would cast it)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert torch.equal(logits(tp), logits(hf))


def test_to_moves_devices_baked_into_the_graph_and_refuses_another_dtype(llama):
    tp = fxtp.transform(llama, 1)
    ref = logits(tp)
    assert graph_devices(tp) == {torch.device("cpu")}
    for cast in (lambda: tp.to(torch.bfloat16), tp.half, tp.bfloat16,
                 lambda: tp.to("cpu", torch.float16)):
        with pytest.raises(fxtp.DtypeError, match="captured in torch.float32"):
            cast()
    assert {p.dtype for p in tp.parameters()} == {torch.float32}    # nothing changed
    assert tp.to(torch.float32) is tp and tp.float() is tp          # the same dtype is fine
    tp.to("meta")
    assert graph_devices(tp) == {torch.device("meta")}
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"meta"}
    tp2 = fxtp.transform(llama, 1).cpu()
    assert torch.equal(logits(tp2), ref)


def test_load_refuses_a_dtype_other_than_the_models_and_changes_nothing(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(model.config)
    tp = fxtp.transform(empty, 1)
    with pytest.raises(fxtp.DtypeError, match="built and captured in torch.float32"):
        fxtp.load(tp, str(tmp_path), dtype=torch.bfloat16)
    with pytest.raises(fxtp.DtypeError, match="floating"):
        fxtp.load(tp, str(tmp_path), dtype=torch.int8)
    with pytest.raises(fxtp.CheckpointError, match="meta"):
        fxtp.load(tp, str(tmp_path), device="meta")
    assert all(p.device.type == "meta" for p in tp.parameters())
    with pytest.raises(fxtp.MetaTensorError):
        logits(tp)
    fxtp.load(tp, str(tmp_path), dtype=torch.float32)
    assert torch.allclose(logits(tp), logits(model), atol=1e-5)
