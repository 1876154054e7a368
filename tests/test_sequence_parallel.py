"""Sequence parallelism (issue 19): the replicated region between the layers holds each rank's
tokens, with a reduce-scatter and an all-gather in place of each layer's all-reduce.

The plan tests run here; the multi-rank cases run in the gloo spawn of tests/test_multirank.py
(tests/sequence_workers.py)."""
from __future__ import annotations

import json

import pytest
import torch

import fxtp
from fxtp.testing.models import tiny_model

from .modules import MixesTokensAfterRow, ParallelBlocks, PlainMLP, WidensBeforeMixing
from .rank_workers import world_sizes
from .test_multirank import case

TOL = 1e-4
PER_LAYER = {"all_gather": 2, "reduce_scatter": 2}


@pytest.fixture(scope="module")
def llama_plans():
    """The tiny Llama's plan at world 2, without and with sequence parallelism (one capture)."""
    plain = fxtp.plan(tiny_model("llama"), 2)
    return plain, plain.replan(sequence_parallel=True)


def test_each_layers_all_reduces_become_a_reduce_scatter_and_an_all_gather(llama_plans):
    plain, sp = llama_plans
    assert plain.all_reduces == {"model.layers.0": 2, "model.layers.1": 2}
    assert sp.sequence_parallel and sp.all_reduces == {} and not sp.sequence_kept
    assert sp.sequence_collectives == {"model.layers.0": PER_LAYER, "model.layers.1": PER_LAYER,
                                       "(outside the layers)": {"all_gather": 1}}
    # the same decisions for the linears; their collectives say what changed
    assert [(e.module, e.placement) for e in sp.entries] == \
        [(e.module, e.placement) for e in plain.entries]
    collectives = {e.module: e.collectives for e in sp.entries}
    assert collectives["model.layers.0.self_attn.o_proj"].startswith("reduce_scatter(sum)")
    assert collectives["model.layers.1.mlp.gate_proj"].startswith("all_gather of the input")
    # per layer its two RMSNorms (6 ops each: pow, mean, add, rsqrt, mul, mul) and its two
    # residual adds; the final norm outside the layers
    assert sp.sequence_ops == {"model.layers.0": 14, "model.layers.1": 14,
                               "(outside the layers)": 6}
    text = str(sp)
    assert "sequence parallel: 34 ops hold 1/2 of the tokens per rank; per layer (forward): " \
           "2 all_gather, 2 reduce_scatter; outside the layers: 1 all_gather" in text
    assert "all-reduces: none" in text


def test_the_same_bytes_per_layer_one_all_gather_more_at_the_output(llama_plans):
    """An all-reduce sends twice what a reduce-scatter or an all-gather of the same value
    sends: per layer the bytes are the same; the final norm's output is gathered once for the
    replicated lm_head (64 fp32 features, half of them sent at world 2)."""
    plain, sp = llama_plans
    assert sp.sequence_bytes_per_token == {"reduce_scatter": 4 * 256, "all_gather": 5 * 256}
    assert plain.communicated_bytes_per_token == 1024
    assert sp.communicated_bytes_per_token - plain.communicated_bytes_per_token == 256 / 2


def test_sequence_parallel_plans_round_trip_and_differ_from_plain_ones(llama_plans):
    plain, sp = llama_plans
    data = json.loads(sp.to_json())
    assert data["sequence_parallel"] is True and data["all_reduces_per_layer"] == {}
    back = fxtp.Plan.from_json(sp.to_json())
    assert back.mismatches(sp) == [] and back.sequence_collectives == sp.sequence_collectives
    diffs = plain.mismatches(sp)
    assert any("sequence_parallel 2/False/False vs 2/False/True" in d for d in diffs), diffs
    again = sp.replan(sequence_parallel=False)
    assert again.mismatches(plain) == [] and not again.sequence_parallel
    assert sp.override({}).sequence_parallel         # an override keeps the choice


def test_gpt2_layers_have_the_same_layout():
    plan = fxtp.plan(tiny_model("gpt2"), 2, sequence_parallel=True)
    assert plan.all_reduces == {}
    assert plan.sequence_collectives == {"transformer.h.0": PER_LAYER, "transformer.h.1": PER_LAYER,
                                         "(outside the layers)": {"all_gather": 1}}


def test_a_probe_plan_writes_the_layout_of_every_layer():
    model = tiny_model("llama", num_hidden_layers=5)
    plan = fxtp.plan(model, 2, sequence_parallel=True)
    assert plan.probe, "planned from a probe of the repeated layers"
    whole = fxtp.plan(model, 2, sequence_parallel=True, probe=False)
    assert plan.sequence_collectives == whole.sequence_collectives
    assert len(plan.sequence_collectives) == 6
    assert plan.sequence_ops == whole.sequence_ops
    assert plan.sequence_bytes_per_token == whole.sequence_bytes_per_token


def test_a_plain_module_holds_its_tokens_after_its_row_parallel_linear():
    plan = fxtp.plan(PlainMLP(), 2, example_inputs=(torch.randn(2, 8, 16),),
                     sequence_parallel=True)
    assert plan.all_reduces == {} and not plan.sequence_kept
    assert plan.sequence_collectives == {"(outside the layers)": {"reduce_scatter": 1,
                                                                  "all_gather": 1}}


@pytest.mark.parametrize("module, why", [
    (MixesTokensAfterRow(), "a user needs the whole sequence: cumsum (cumsum.default) mixes tokens"),
    # a reduce-scatter (64 bytes a token) and an all-gather of the cat (128) for an
    # all-reduce of 64 bytes (128 in reduce-scatter units)
    (WidensBeforeMixing(), "holding the tokens of its users would send 192 bytes per token for "
                           "the all-reduce's 128"),
])
def test_an_all_reduce_is_kept_with_its_reason(module, why):
    plan = fxtp.plan(module, 2, example_inputs=(torch.randn(2, 8, 16),), sequence_parallel=True)
    assert plan.all_reduces == {"(outside the layers)": 1}
    assert plan.sequence_collectives == {}
    assert [m for m, _ in plan.sequence_kept] == ["fc2"]
    assert plan.sequence_kept[0][1].startswith(why), plan.sequence_kept
    assert f"sequence parallel kept the all-reduce of fc2: {why}" in str(plan)


def test_parallel_branches_hold_the_residual_stream_only():
    """Two norms read each block's residual stream (GPT-NeoX, Falcon): holding the norms'
    tokens too would gather twice per block for one reduce-scatter. The cheapest layout (a
    minimum cut) gathers the residual once, before both norms: the all-reduce's bytes."""
    model = ParallelBlocks()
    plain = fxtp.plan(model, 2, example_inputs=(torch.randn(2, 8, 16),))
    plan = plain.replan(sequence_parallel=True)
    assert plain.all_reduces == {"blocks.0": 1, "blocks.1": 1}
    assert plan.all_reduces == {} and not plan.sequence_kept
    assert plan.sequence_collectives == {"blocks.0": {"reduce_scatter": 1},
                                         "blocks.1": {"reduce_scatter": 1},
                                         "(outside the layers)": {"all_gather": 2}}
    assert plan.communicated_bytes_per_token == plain.communicated_bytes_per_token
    assert plan.sequence_ops == {"(outside the layers)": 2}     # the two residual adds


def test_an_input_without_a_sequence_keeps_the_all_reduce():
    plan = fxtp.plan(PlainMLP(), 2, example_inputs=(torch.randn(3, 16),), sequence_parallel=True)
    assert plan.all_reduces == {"(outside the layers)": 1}
    assert plan.sequence_kept == [("fc2", "no input has a dynamic sequence dim (dim 1): "
                                          "nothing to split")]


def test_world_size_one_has_nothing_to_split():
    plan = fxtp.plan(tiny_model("llama"), 1, sequence_parallel=True)
    assert plan.sequence_parallel and plan.sequence_collectives == {} and not plan.sequence_kept
    assert "sequence parallel: nothing to split at world size 1" in str(plan)


def test_a_plan_without_it_is_refused_with_the_flag():
    model = tiny_model("llama")
    plan = fxtp.plan(model, 1)
    with pytest.raises(fxtp.PlanOverrideError, match="replan\\(sequence_parallel=True\\)"):
        fxtp.transform(model, 1, plan=plan, sequence_parallel=True)


# -- multi-rank: tests/sequence_workers.py in the spawn of tests/test_multirank.py ------------

@pytest.mark.parametrize("ws, name", world_sizes(("sp_llama", "sp_gpt2"), ("sp_llama", "sp_gpt2")))
def test_outputs_and_gradients_equal_the_untouched_model(ws, name):
    for rank, r in enumerate(case(ws, name)):
        assert r["examples"] >= 6
        assert r["max_error"] <= TOL, f"rank {rank}: {r['max_error']}"
        # 1 token (ranks without any), 3 and 5 (not divisible by the ranks), 8
        assert max(r["length_errors"].values()) <= TOL, r["length_errors"]
        assert r["compared"] >= r["params"] and not r["missing"]
        assert r["grad_error"] <= TOL and r["loss_error"] <= TOL, r
        # under torch.utils.checkpoint (saved-tensor hooks of its own) as well
        assert r["checkpointed_grad_error"] <= TOL, r["checkpointed_grad_error"]


@pytest.mark.parametrize("ws, name", world_sizes(("sp_llama", "sp_gpt2"), ("sp_llama", "sp_gpt2")))
def test_the_graph_has_no_all_reduce_left(ws, name):
    r = case(ws, name)[0]
    assert r["plain_counts"] == {"all_reduce": 4, "reduce_scatter": 0, "all_gather": 0,
                                 "scatter": 0}
    # 2 layers x 2 reduce-scatters; an all-gather before each layer's 2 column-parallel
    # blocks and one for lm_head; the embeddings cut to the rank's tokens once
    assert r["counts"] == {"all_reduce": 0, "reduce_scatter": 4, "all_gather": 5, "scatter": 1}
    assert r["sequence_nodes"] == 10 and r["plan_all_reduces"] == {}
    # the norms' weights (2 per layer and the final one, weights and GPT-2's biases) have
    # their gradients summed over the ranks in one all-reduce
    assert r["summed_together"] == [5 if name == "sp_llama" else 10]


def test_explain_and_draw_show_the_sequence_collectives_and_region():
    r = case(2, "sp_llama")[0]
    assert r["explain_lines"] == {"all_reduce": 0, "reduce_scatter": 4, "all_gather": 5,
                                  "scatter": 1}
    assert r["explain_header"].endswith("0 all-reduce(s), 2 reduce-scatter(s), 2 all-gather(s)")
    assert r["dot_sequence_ops"] == 14       # layer 0's two norms and two residual adds


@pytest.mark.parametrize("ws, name", world_sizes(("sp_llama", "sp_gpt2"), ("sp_llama", "sp_gpt2")))
def test_the_replicated_region_saves_a_rank_s_tokens_only(ws, name):
    """Hidden-width activations saved for backward (24 tokens a sequence): the region's are
    the rank's tokens (the column-parallel inputs gathered again in backward, not saved), at
    most 1/N + 5% of the all-reduce layout's. Activations of the sharded regions that have
    the hidden width too (the tiny Llama's MLP at world 2) keep every token in both layouts
    and are set aside."""
    for r in case(ws, name):
        sp, plain = r["width_bytes"]
        full = r["tokens"]
        shared = sp.get(full, 0)                       # sharded activations, all tokens
        region_sp = sum(b for tokens, b in sp.items() if tokens != full)
        region_plain = plain[full] - shared
        assert region_plain > 0 and region_sp > 0
        assert region_sp <= (1 / ws + 0.05) * region_plain, (sp, plain)


@pytest.mark.parametrize("ws, name", world_sizes(("sp_llama", "sp_gpt2"), ("sp_llama", "sp_gpt2")))
def test_regather_false_saves_the_gathered_inputs_whole(ws, name):
    """fxtp.for_training(tp, regather=False): the column-parallel inputs are saved with
    every token (more than the default keeps), the gradients are the same."""
    for r in case(ws, name):
        regathered, whole = r["width_bytes"][0], r["saved_whole"]["width_bytes"]
        assert whole.get(r["tokens"], 0) > regathered.get(r["tokens"], 0), (whole, regathered)
        assert r["saved_whole"]["grad_error"] <= TOL and r["saved_whole"]["state_after"]


@pytest.mark.parametrize("ws, name", world_sizes(("sp_sgd_llama", "sp_sgd_gpt2"),
                                                 ("sp_sgd_llama", "sp_sgd_gpt2")))
def test_three_sgd_steps_track_the_untouched_model(ws, name):
    for r in case(ws, name):
        assert r["moved"] > 1.0
        assert len(r["param_errors"]) == 3 and max(r["param_errors"]) <= TOL, r["param_errors"]


def test_plain_modules_over_gloo():
    """PlainMLP holds its residual add as tokens, ParallelBlocks the cheapest part of its
    region; WindowedAttention's short inputs run a size graph (tests/modules_mixers.py)."""
    for r in case(2, "sp_module"):
        for name, got in r.items():
            assert got["max_error"] <= TOL and got["grad_error"] <= TOL, (name, got)
            assert got["compared"] == got["params"], (name, got)
        assert r["PlainMLP"]["counts"] == {"all_reduce": 0, "reduce_scatter": 1,
                                           "all_gather": 1, "scatter": 1}
        assert r["ParallelBlocks"]["counts"] == {"all_reduce": 0, "reduce_scatter": 2,
                                                 "all_gather": 2, "scatter": 1}
        # an input shorter than the window runs a graph of its own, sequence-parallel too
        window = r["WindowedAttention"]
        assert window["size_graph_sequence"]
        assert window["size_graph_counts"]["all_reduce"] == 0
        assert window["size_graph_counts"]["reduce_scatter"] == 2


def test_lora_adapters_train_and_fold():
    for r in case(2, "sp_lora_llama"):
        assert r["max_error"] <= TOL and r["grad_error"] <= TOL and not r["missing"], r
        assert r["compared"] > 0
        assert r["folded_adapters"] and r["folded_error"] <= TOL and r["unfolded_error"] <= TOL


def test_with_vocab_parallel_the_lookup_is_reduce_scattered():
    for r in case(2, "sp_vocab_llama"):
        assert r["max_error"] <= TOL and r["grad_error"] <= TOL and r["compared"] == 21, r
        assert r["counts"] == {"all_reduce": 0, "reduce_scatter": 5, "all_gather": 5,
                               "scatter": 0}
        # every all-gather feeds column-parallel linears now, lm_head included
        assert r["gather_backwards"] == ["sum"] * 5
        assert r["plan_collectives"]["(outside the layers)"] == {"reduce_scatter": 1,
                                                                 "all_gather": 1}


def test_it_compiles_with_its_backward():
    """torch.compile(fullgraph=True, dynamic=True, AOT autograd) at 7, 5 and 11 tokens: one
    compilation serves every length, results equal eager's."""
    for r in case(2, "sp_compile_llama"):
        assert r["compilations"][0] == r["compilations"][-1]
        assert r["compile_error"] <= TOL


def test_tp_generate_decodes_without_it():
    for r in case(2, "sp_generate_llama"):
        assert r["equal"]
