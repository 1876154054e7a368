"""tp.generate without ranks or a decode step (in process, world 1): which graphs refuse it and
why, the sizes a request builds, and how the compile option switches between calls. The model
-level cases (tokens equal to model.generate, shared tensors, LoRA, meta + load, training) run
in tests/test_generate.py; the weightless skeleton in tests/test_device_dtype.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxtp
from fxtp.generation.generator import Generator
from fxtp.generation.replay import Replay
from fxtp.generation.tp_generate import TPGenerate, _round_batch, _round_len, attach
from fxtp.testing.models import tiny_model

from .modules import PlainMLP


def test_models_that_cannot_generate_get_a_generate_that_says_why():
    tp = fxtp.transform(PlainMLP(), 1, example_inputs=(torch.randn(2, 16),))
    with pytest.raises(fxtp.GenerationError, match="not a Hugging Face model"):
        tp.generate(torch.ones(1, 3, dtype=torch.long))
    assert tp.generate.skeleton is None and "unavailable" in repr(tp.generate)
    # what fxtp.transform(bert, ws) attaches (the model is refused before its graph is read)
    graph = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    attach(graph, tiny_model("bert"))
    with pytest.raises(fxtp.GenerationError, match="BertModel has no generation head"):
        graph.generate(torch.ones(1, 3, dtype=torch.long))


def test_request_sizes_are_rounded_up():
    assert [_round_len(n) for n in (1, 20, 64, 65, 200, 1025)] == [64, 64, 64, 128, 256, 2048]
    assert [_round_batch(b) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_compile_option_switches_per_call_without_compiling_again(monkeypatch):
    compiled = []

    def fake_compile(mod, **kw):
        compiled.append(kw)
        return SimpleNamespace(of=mod, options=kw)

    monkeypatch.setattr(torch, "compile", fake_compile)
    gen = SimpleNamespace(tp=nn.Linear(1, 1), _replay=Replay("emulate", 2, 8))
    gen._step = gen.tp
    gen.compile = lambda **kw: Generator.compile(gen, **kw)
    tg = TPGenerate(nn.Linear(1, 1), None, None)
    tg._set_compile(gen, True)
    first = gen._step
    assert len(compiled) == 1 and first.of is gen.tp
    tg._set_compile(gen, False)
    assert gen._step is gen.tp
    tg._set_compile(gen, True)                       # kept: not compiled again
    assert gen._step is first and len(compiled) == 1
    tg._set_compile(gen, {"mode": "reduce-overhead"})
    assert len(compiled) == 2 and compiled[1]["mode"] == "default"   # the generator's CUDA graphs
    tg._set_compile(gen, {"mode": "reduce-overhead"})
    assert len(compiled) == 2


def test_the_decode_step_takes_the_device_branch_of_tp_s_device(monkeypatch):
    """The step is captured from the weightless skeleton as fake tensors on tp's device, not
    as meta tensors: model code that branches on the device takes the side it takes when the
    step runs (on meta it took the other side, and generated other tokens)."""
    from transformers.models.llama import modeling_llama

    own = modeling_llama.LlamaRMSNorm.forward

    def forward(self, hidden_states):
        out = own(self, hidden_states)
        return out if hidden_states.device.type == "cpu" else out * 2

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    model = tiny_model("llama").eval()
    tp = fxtp.transform(model, 1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = model.generate(ids, max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones_like(ids))
    assert torch.equal(tp.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert {t.device.type for t in tp.generate.skeleton.parameters()} == {"meta"}


def test_a_model_with_opaque_parts_gets_a_generate_that_says_why(monkeypatch):
    """The decode step is captured from the weightless copy, which cannot run an opaque part:
    tp.generate names the parts instead of failing inside torch.export."""
    from transformers.models.llama import modeling_llama

    own = modeling_llama.LlamaMLP.forward

    def forward(self, x):
        if x.sum() > 0:                 # data-dependent Python: the MLP is an opaque part
            return own(self, x)
        return own(self, x) * 1.0

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    model = tiny_model("llama").eval()
    tp = fxtp.transform(model, 1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(tp(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(fxtp.GenerationError, match=r"LlamaForCausalLM \(llama\) has parts torch.export "
                                                   r"cannot capture \(model.layers.0.mlp, "
                                                   r"model.layers.1.mlp: called as opaque"):
        tp.generate(ids, max_new_tokens=2)
    assert "unavailable" in repr(tp.generate)
