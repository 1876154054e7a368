"""Device and dtype on a CPU-only machine (world size 1, in process): fxtp makes every tensor on
the model's device and in its dtype, never on a default device. Without a GPU a tensor made on
the wrong device would go unnoticed (everything is the CPU), so the tests make such mistakes
visible: a model built on the meta device must leave nothing but meta in the graph, and a
default device of meta (`with torch.device("meta")`) gives any tensor fxtp makes without naming
its device no data. The world-2 versions (a wholly-meta model, transform and forward under a
default device of meta, bf16 loads with a cast, bf16 generation) run in the load spawn
(tests/test_load.py)."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.graph.devices import graph_devices
from fxtp.graph.tensors import tensor_attrs
from fxtp.testing.models import tiny_model

from .modules import structure

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
def plan(llama):
    """One capture for the tests below: transform(llama, 1, plan=plan) only rewrites."""
    return fxtp.plan(llama, 1)


def test_the_users_model_is_left_untouched_and_shares_no_storage(llama, plan):
    tp = fxtp.transform(llama, 1, plan=plan)
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
    """Neither the plan kept in tp.meta nor tp.generate's skeleton of the model (what it builds
    its decode step from) holds the full weights; tp.generate decodes model.generate's tokens
    after the model is gone, with a step whose parameters are tp's own."""
    model = tiny_model("llama")
    ref = logits(model)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref_tokens = model.generate(IDS[:, :4], **kw)
    tp = fxtp.transform(model, 1)
    weights = [weakref.ref(p) for p in model.parameters()]
    del model
    gc.collect()
    assert all(w() is None for w in weights)            # freed with the model
    # what fxtp keeps beside the graph (the plan with its captured graph) holds shapes only
    kept = tensors_in(tp.meta["fxtp"])
    assert kept and all(t.device.type == "meta" for t in kept)
    # the skeleton: parameters and the buffers tp holds (inv_freq) are meta, config kept
    skeleton = tp.generate.skeleton
    assert {t.device.type for t in [*skeleton.parameters(), *skeleton.buffers()]} == {"meta"}
    assert skeleton.config.vocab_size == 128 and skeleton.generation_config is not None
    assert torch.equal(logits(tp), ref)
    assert torch.equal(tp.generate(IDS[:, :4], **kw), ref_tokens)
    mine = dict(tp.named_parameters())
    assert all(p is mine[n] for n, p in tp.generate.generator.tp.named_parameters())


def test_meta_built_model_is_loaded_onto_a_device_with_the_models_dtype(tmp_path):
    """init_empty: the graph names no device but meta and holds nothing real but the buffers
    the model computed (inv_freq); a load refused for its dtype or device changes nothing; a
    load onto the CPU points every device in the graph there."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(model.config)
    tp = fxtp.transform(empty, 1)
    assert graph_devices(tp) == {torch.device("meta")}
    real = {n for n, t in tensor_attrs(tp).items() if t.device.type != "meta"}
    assert real == {n for n, _ in empty.named_buffers()}
    with pytest.raises(fxtp.DtypeError, match="built and captured in torch.float32"):
        fxtp.load(tp, str(tmp_path), dtype=torch.bfloat16)
    with pytest.raises(fxtp.DtypeError, match="floating"):
        fxtp.load(tp, str(tmp_path), dtype=torch.int8)
    with pytest.raises(fxtp.CheckpointError, match="meta"):
        fxtp.load(tp, str(tmp_path), device="meta")
    assert all(p.device.type == "meta" for p in tp.parameters())
    with pytest.raises(fxtp.MetaTensorError):
        logits(tp)
    fxtp.load(tp, str(tmp_path), device="cpu", dtype=torch.float32)
    assert graph_devices(tp) == {torch.device("cpu")}
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"cpu"}
    assert torch.allclose(logits(tp), logits(model), atol=1e-5)


def test_nothing_is_made_on_the_default_device(llama, plan):
    """Under a default device of meta, a tensor fxtp makes without naming its device (an index,
    a mask, a copy) has no data: the rewrite and the forward would fail. (The capture's inputs
    are checked the same way at world 2 in the load spawn.)"""
    ref = logits(llama)
    with torch.device("meta"):
        tp = fxtp.transform(llama, 1, plan=plan)
        out = logits(tp)
    assert out.device.type == "cpu" and torch.equal(out, ref)


def test_bf16_model_is_captured_and_computes_in_bf16():
    model = tiny_model("llama").to(torch.bfloat16)
    tp = fxtp.transform(model, 1)
    assert {p.dtype for p in tp.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(tp), logits(model))


def test_to_moves_devices_baked_into_the_graph_and_refuses_another_dtype(llama, plan):
    tp = fxtp.transform(llama, 1, plan=plan)
    ref = logits(tp)
    assert graph_devices(tp) == {torch.device("cpu")}
    for cast in (lambda: tp.to(torch.bfloat16), tp.half, tp.bfloat16,
                 lambda: tp.to("cpu", torch.float16)):
        with pytest.raises(fxtp.DtypeError, match="captured in torch.float32"):
            cast()
    assert {p.dtype for p in tp.parameters()} == {torch.float32}    # nothing changed
    assert tp.to(torch.float32) is tp and tp.float() is tp          # the same dtype is fine
    assert torch.equal(logits(tp.cpu()), ref)
    tp.to("meta")
    assert graph_devices(tp) == {torch.device("meta")}
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"meta"}


def test_to_moves_constants_lifted_from_the_forward():
    """An index list in the forward (`qkv[:, :, [-2]]`, as Falcon-7B picked its k head before
    transformers 5.25) is a constant tensor of the graph. torch.export's unlift holds such
    constants as plain attributes (neither parameter nor buffer), which `nn.Module.to` would
    leave behind; the graph's copy may register them as buffers. Held as plain attributes here,
    as the capture holds them, they move with the graph all the same."""
    model, inputs = structure("fused_multi_query")
    tp = fxtp.transform(model, 1, example_inputs=inputs)
    lifted = [n for n, t in tensor_attrs(tp).items() if n.startswith("lifted_tensor")]
    assert lifted
    for name in lifted:
        value = tensor_attrs(tp)[name]
        tp._buffers.pop(name, None)
        setattr(tp, name, value)
    held = {id(t) for t in [*tp.parameters(), *tp.buffers()]}
    assert all(id(tensor_attrs(tp)[n]) not in held for n in lifted)
    tp.to("meta")
    assert {t.device.type for t in tensor_attrs(tp).values()} == {"meta"}
