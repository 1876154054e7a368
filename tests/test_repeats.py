"""Planning a deep model from a probe capture of a few of its repeated layers (fxtp.planning.repeats):
the same plan as capturing every layer, found from the module tree and checked on the graph."""
from __future__ import annotations

import pytest
import torch

import fxtp
from fxtp.planning.repeats import Repeat, find_repeats

from .modules import tiny_net


def _llama(layers: int, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def llama6():
    return _llama(6)


@pytest.fixture(scope="module")
def plans(llama6):
    """The probe plan and the plan of every layer, at world 4."""
    return fxtp.plan(llama6, 4), fxtp.plan(llama6, 4, probe=False)


def test_probe_plan_equals_the_plan_of_every_layer(llama6, plans):
    assert find_repeats(llama6) == [Repeat("model.layers", 6, 2)]
    probe, whole = plans
    assert probe.probe and not whole.probe
    assert probe == whole and probe.mismatches(whole) == []
    assert probe.local_param_bytes == whole.local_param_bytes
    assert [e.why for e in probe.entries] == [e.why for e in whole.entries]
    assert probe.all_reduces == {f"model.layers.{i}": 2 for i in range(6)}
    # only two layers were captured
    assert len({e.module.split(".")[2] for e in probe.entries
                if e.module.startswith("model.layers.") and
                any(n.target == e.parameter for n in probe.captured.gm.graph.nodes
                    if n.op == "get_attr")}) == 2


def test_probe_plan_overrides_and_replans(plans):
    probe4, whole4 = plans
    probe, whole = probe4.replan(2), whole4.replan(2)      # no capture: the probe's is solved
    assert probe.probe and probe.captured is probe4.captured
    assert probe.mismatches(whole) == []
    head = probe.override({"lm_head": "replicate"})      # outside the layers: still a probe
    assert head.probe and head.mismatches(whole.override({"lm_head": "replicate"})) == []
    # a decision for one repeated layer makes the layers differ: planned from every layer
    late = probe.override({"model.layers.5.mlp": "replicate"})
    assert not late.probe
    assert late.all_reduces["model.layers.5"] == 1 and late.all_reduces["model.layers.4"] == 2
    assert late.mismatches(whole.override({"model.layers.5.mlp": "replicate"})) == []


def test_transform_with_a_probe_plan_captures_every_layer(llama6):
    tp = fxtp.transform(llama6, 1, plan=fxtp.plan(llama6, 1))
    ids = torch.arange(14).view(2, 7) % 128
    with torch.no_grad():
        assert torch.allclose(tp(input_ids=ids).logits, llama6(input_ids=ids).logits, atol=1e-5)
    assert not tp.meta["fxtp"].plan.probe


def test_a_first_block_of_its_own_keeps_three_entries():
    """T5's first block owns the relative position bias: blocks 1.. repeat."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from fxtp.testing.families import FAMILIES

    kw = {k: v for k, v in FAMILIES["t5"].items() if k != "model_type"}
    kw.update(num_layers=4, num_decoder_layers=4, vocab_size=128)
    torch.manual_seed(0)
    t5 = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **kw)).eval()
    assert find_repeats(t5) == [Repeat("encoder.block", 4, 3), Repeat("decoder.block", 4, 3)]
    plan = fxtp.plan(t5, 2)
    assert plan.probe
    assert plan.all_reduces == {**{f"encoder.block.{i}": 2 for i in range(4)},
                                **{f"decoder.block.{i}": 3 for i in range(4)}}
    assert [e.placement for e in plan.entries if e.module.startswith("decoder.block.3.")] == \
        [e.placement for e in plan.entries if e.module.startswith("decoder.block.1.")]


def test_layers_that_differ_are_not_a_repeat():
    net = tiny_net(layers=4)
    x = (torch.randn(2, 5, 32),)
    assert find_repeats(net) == [Repeat("blocks", 4, 2)]
    net.blocks[2].attn.heads, net.blocks[2].attn.hd = 2, 16      # another head count
    assert find_repeats(net) == []
    plan = fxtp.plan(net, 2, example_inputs=x)
    assert not plan.probe and plan.all_reduces == {f"blocks.{i}": 2 for i in range(4)}


def test_a_70b_architecture_plans_on_the_meta_device():
    """Llama-3-70B's shapes, no weights: 80 layers, 2 all-reduces each, bytes per rank."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672,
                               num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8, vocab_size=128256,
                               max_position_embeddings=8192)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    plan = fxtp.plan(model, 8)
    assert plan.probe == (Repeat("model.layers", 80, 2),)
    assert plan.all_reduces == {f"model.layers.{i}": 2 for i in range(80)}
    q = {e.parameter: e for e in plan.entries}["model.layers.79.self_attn.q_proj.weight"]
    assert q.placement == "column" and q.local_numels == (8192 * 8192 // 8,) * 8
    assert plan.full_param_bytes == sum(p.numel() * 4 for p in model.parameters())
    # every layer's linears at 1/8; the rest (embeddings, lm_head, norms) whole
    layer = sum(e.full_bytes for e in plan.entries if e.module.startswith("model.layers."))
    whole = plan.full_param_bytes - layer
    assert plan.local_param_bytes[0] == pytest.approx(layer / 8 + whole, rel=1e-3)


def test_probe_plan_with_partial_statistics_equals_the_whole_plan():
    """OLMo-2's q/k norms over all heads in 6 layers: the probe's statistics and their costs
    (with and without) expanded to every layer equal a capture of the whole model."""
    from fxtp.testing.families import FAMILIES, family_model

    FAMILIES["olmo2_deep"] = {**FAMILIES["olmo2"], "num_hidden_layers": 6}
    try:
        model = family_model("olmo2_deep")
    finally:
        del FAMILIES["olmo2_deep"]
    probed, whole = fxtp.plan(model, 2), fxtp.plan(model, 2, probe=False)
    assert probed.probe and not whole.probe
    assert probed == whole
    assert len(probed.statistics) == 12 and probed.statistics_costs["chosen"] == "with"
