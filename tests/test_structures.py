"""Each structure fxtp must find, on a small hand-built module (no Hugging Face, no names):
plan-level assertions here, equivalence in real gloo ranks in test_multirank.py."""
from __future__ import annotations

import pytest

import fxtp

from .modules import STRUCTURES, structure


def plan_of(name: str, ws: int = 2) -> fxtp.Plan:
    model, inputs = structure(name)
    return fxtp.plan(model, ws, example_inputs=inputs)


def test_fused_qkv_thirds_and_gate_up_chunk():
    plan = plan_of("fused_thirds")
    entries = {e.module: e for e in plan.entries}
    assert entries["qkv"].placement == "column" and "3 fused chunks" in entries["qkv"].shard
    assert entries["gate_up"].placement == "column" and "2 fused chunks" in entries["gate_up"].shard
    assert entries["o"].placement == entries["down"].placement == "row"
    assert plan.total_all_reduces == 2


def test_interleaved_heads_with_per_head_bias():
    plan = plan_of("interleaved_heads", 4)
    entries = {e.module: e for e in plan.entries}
    # heads are the outer dim of the fused output: a plain contiguous split gives whole heads
    assert entries["qkv"].placement == "column" and "fused" not in entries["qkv"].shard
    assert entries["o"].placement == "row"
    # the per-head bias parameter is sliced to this rank's heads, not all-gathered
    narrows = plan.solution.actions.narrows
    assert any(have is None and want.parts == 4 for _, _, _, have, want in narrows)


@pytest.mark.parametrize("ws, kv_parts", [(2, 2), (4, 2)])
def test_grouped_query_kv_heads(ws, kv_parts):
    plan = plan_of("grouped_query", ws)
    k = {e.module: e for e in plan.entries}["k"]
    assert k.placement == "column" and k.shard.startswith(f"Shard(0): {kv_parts} parts")
    assert plan.total_all_reduces == 1


def test_parallel_block_shares_one_all_reduce():
    plan = plan_of("parallel_block")
    assert plan.placement_of("attn.o") == plan.placement_of("fc2") == "row"
    assert plan.total_all_reduces == 1


def test_cross_attention_kv_from_second_input():
    plan = plan_of("cross_attention")
    for lin in ("q", "k", "v"):
        assert plan.placement_of(lin) == "column"
    assert plan.placement_of("o") == "row"


@pytest.mark.parametrize("ws", (2, 4))
def test_heads_merged_into_the_batch_dim(ws):
    plan = plan_of("heads_in_batch", ws)
    assert plan.placement_of("qkv") == "column" and plan.placement_of("o") == "row"
    assert plan.total_all_reduces == 1
    act = plan.solution.actions
    # the per-head bias [b * heads, 1, s] is narrowed inside the merged dim, b * heads rescaled
    assert any(want.outer for _, _, _, _, want in act.narrows)
    assert act.sym_sizes


@pytest.mark.parametrize("ws", (2, 4))
def test_fused_multi_query_keeps_the_kv_heads_whole(ws):
    plan = plan_of("fused_multi_query", ws)
    qkv = {e.module: e for e in plan.entries}["qkv"]
    assert qkv.placement == "column"
    assert f"chunks 32: {ws} parts, 8: whole, 8: whole" in qkv.shard
    assert plan.placement_of("o") == "row" and plan.total_all_reduces == 1


@pytest.mark.parametrize("ws", (2, 4))
def test_multi_query_heads_split_from_one_view_keep_kv_whole(ws):
    """transformers 5.25's Falcon-7B: [b, s, heads + 2, d] split [heads, 1, 1] along the
    heads: the q heads are cut over the ranks, the one k and one v head held whole."""
    plan = plan_of("head_split_multi_query", ws)
    qkv = {e.module: e for e in plan.entries}["qkv"]
    assert qkv.placement == "column"
    assert f"chunks 32: {ws} parts, 8: whole, 8: whole" in qkv.shard
    assert plan.placement_of("o") == "row" and plan.total_all_reduces == 1
    assert not plan.replicated


@pytest.mark.parametrize("ws, offsets", [(2, 24), (5, (10, 10, 10, 9, 9))])
def test_tensor_split_of_a_fused_output_cuts_each_rank_at_its_own_offset(ws, offsets):
    """gate | up cut with tensor_split([48]): each rank cuts where its gate shard ends (48
    features on 5 ranks: 10, 10, 10, 9, 9)."""
    plan = plan_of("tensor_split_gate_up", ws)
    gate_up = {e.module: e for e in plan.entries}["gate_up"]
    assert gate_up.placement == "column" and "2 fused chunks [48, 48]" in gate_up.shard
    assert plan.placement_of("down") == "row" and plan.total_all_reduces == 1
    cut = [a for a in plan.solution.actions.int_args if a.node.startswith("tensor_split")]
    assert [(a.path, a.value) for a in cut] == [((1, 0), offsets)]


def test_uneven_heads_name_each_rank_size():
    model, inputs = structure("fused_thirds")
    plan = fxtp.plan(model, 3, example_inputs=inputs)   # 4 heads of 8 on 3 ranks: 2 + 1 + 1
    qkv = {e.module: e for e in plan.entries}["qkv"]
    assert qkv.placement == "column" and "uneven: rank sizes [48, 24, 24]" in qkv.shard


def _attention_sharded(plan: fxtp.Plan, qkv=("q", "k", "v")) -> None:
    for lin in qkv:
        assert plan.placement_of(lin) == "column", (lin, plan.replicated)
    assert plan.placement_of("o") == "row"
    assert plan.param_fraction(layers_only=False) == 1 / plan.world_size
    assert not plan.replicated


@pytest.mark.parametrize("ws", (2, 4))
def test_norms_over_the_sharded_width_are_partial_statistics(ws):
    """q/k norms over all heads and a sub-norm before o: three [b, s, 1] statistics
    all-reduced, the attention sharded; interleaved rotary (stack + flatten) on part of each
    head keeps the heads sharded."""
    plan = plan_of("normed_rotary", ws)
    _attention_sharded(plan)
    assert plan.statistics == ["mean", "mean_1", "mean_2"]
    assert plan.total_all_reduces == 4
    costs = plan.statistics_costs
    assert costs["chosen"] == "with"
    # with: o's output (32 floats) and 3 statistics (1 float each) per token
    assert costs["with"] == [(32 + 3) * 4, plan.local_param_bytes[0]]
    # without: everything replicated, nothing all-reduced, every weight whole
    assert costs["without"] == [0, plan.full_param_bytes]
    text = str(plan)
    assert "partial statistics: 3 norm(s)" in text and "chosen: with" in text
    again = fxtp.Plan.from_json(plan.to_json())
    assert again.statistics == plan.statistics and again.statistics_costs == costs


@pytest.mark.parametrize("ws", (2, 4))
def test_layer_norms_and_rms_norms_over_sharded_features_all_reduce_a_statistic(ws):
    """torch's LayerNorm, RMSNorm and L2 norm over split features (q/k norms and v's L2 norm
    over all heads, a norm before o, a sub-LayerNorm before down): attention and MLP sharded,
    every parameter cut to 1/N (the norms' weights and biases with their features), one fp32
    statistic all-reduced per norm: [sum, sum of squares] for a LayerNorm, the sum of squares
    for an RMSNorm or an L2 norm."""
    plan = plan_of("torch_norms", ws)
    _attention_sharded(plan)
    assert plan.placement_of("up") == "column" and plan.placement_of("down") == "row"
    assert plan.statistics == ["q_norm", "k_norm", "linalg_vector_norm", "sub", "mid"]
    assert plan.total_all_reduces == 2 + 5
    assert plan.local_param_bytes == (plan.full_param_bytes // ws,) * ws
    costs = plan.statistics_costs
    # o's and down's outputs (32 floats each); 2 + 2 + 1 + 1 + 2 fp32 statistics per token
    assert costs["with"] == [(32 + 32) * 4 + (2 + 2 + 1 + 1 + 2) * 4, plan.local_param_bytes[0]]
    assert costs["without"] == [0, plan.full_param_bytes] and costs["chosen"] == "with"
    assert "partial statistics: 5 norm(s)" in str(plan)


@pytest.mark.parametrize("ws", (2, 4))
def test_rows_of_heads_put_back_keep_the_heads_sharded(ws):
    """`[b, s, h, d] -> [b * s * h, d]` (rows holding the heads as a block) and back to
    `[b, s, h * d]` for o: q, k, v and the gate column-parallel, o row-parallel, one
    all-reduce; the per-row norm's weight (one head's width) is whole on every rank."""
    plan = plan_of("gated_head_rows", ws)
    for lin in ("q", "k", "v", "z"):
        assert plan.placement_of(lin) == "column", (lin, plan.replicated)
    assert plan.placement_of("o") == "row" and not plan.replicated
    assert plan.total_all_reduces == 1 and not plan.statistics


@pytest.mark.parametrize("ws", (2, 4))
def test_latent_attention_keeps_the_shared_rope_key_whole(ws):
    """MLA: q and kv_b column-parallel by heads, o row-parallel, one all-reduce; kv_a (the
    latent and the one rope key every head shares) whole on every rank, as Megatron and vLLM
    keep it. The key filled in place (`new_empty`, then `copy_` into its slices) is made
    with this rank's heads; kv_a's rope piece is never split, since `copy_` cannot write a
    split value into the replicated key (see test_multirank for the numbers)."""
    plan = plan_of("latent_attention", ws)
    for lin in ("q", "kv_b"):
        assert plan.placement_of(lin) == "column", (lin, plan.replicated)
    assert plan.placement_of("o") == "row" and plan.placement_of("kv_a") == "replicate"
    assert "writes a sharded value in place" in plan.replicated["kv_a"]
    assert plan.total_all_reduces == 1 and not plan.statistics
    key = plan.solution.actions.placements["new_empty"]
    assert [(d, s.parts, s.size) for d, s in key.dims] == [(1, ws, 4)]   # the 4 heads


def test_a_branch_on_the_sequence_length_is_a_condition_of_a_sharded_graph():
    """Attention sharded as usual; the capture (a 5-long input) holds for lengths past the
    window, and the plan says so (shorter inputs: test_multirank's structures case)."""
    plan = plan_of("windowed_attention")
    for lin in ("q", "k", "v", "up"):
        assert plan.placement_of(lin) == "column", (lin, plan.replicated)
    assert plan.placement_of("o") == plan.placement_of("down") == "row"
    # a cumsum along the features on this path: kept whole (the short graph keeps them so too)
    assert set(plan.replicated) == {"extra", "extra_out"}
    assert "x.size()[1] > 3" in plan.conditions


def test_partial_statistics_off_keeps_the_region_whole():
    from fxtp.capture.linear import find_linears
    from fxtp.solve.solver import solve

    plan = plan_of("normed_rotary")
    gm = plan.captured.gm
    sol = solve(gm, 2, find_linears(gm), partial_statistics=False)
    assert not sol.actions.columns and not sol.actions.statistics
    assert any("reduces over a sharded dim" in r.text for r in sol.replicated.values())


def test_statistics_that_save_no_weights_are_not_chosen():
    """A sum over features whose linear stays whole anyway (it reaches the output): no
    statistic, no collective."""
    import torch
    from torch import nn

    class Scored(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            h = self.fc(x)
            return h, h.sum(-1)

    plan = fxtp.plan(Scored(), 2, example_inputs=(torch.randn(2, 3, 16),))
    assert plan.placement_of("fc") == "replicate" and not plan.statistics
    assert plan.total_all_reduces == 0


@pytest.mark.parametrize("ws", (2, 4))
def test_complex_rotary_and_broadcast_helpers(ws):
    _attention_sharded(plan_of("complex_rotary", ws))


@pytest.mark.parametrize("ws", (2, 4))
def test_selections_along_the_keys_keep_heads_sharded(ws):
    plan = plan_of("sink_topk", ws)
    _attention_sharded(plan)
    # the per-head sink logits are narrowed to this rank's heads
    assert plan.total_all_reduces == 1


@pytest.mark.parametrize("ws", (2, 4))
def test_fused_qkv_unbound_splits_each_chunk(ws):
    plan = plan_of("fused_qkv_unbind", ws)
    _attention_sharded(plan, qkv=("qkv",))
    qkv = {e.module: e for e in plan.entries}["qkv"]
    assert f"{ws} parts, 3 fused chunks" in qkv.shard


@pytest.mark.parametrize("ws", (2, 4))
def test_gate_and_up_interleaved_read_with_strided_slices(ws):
    plan = plan_of("interleaved_gate_up", ws)
    assert plan.placement_of("gate_up") == "column" and plan.placement_of("down") == "row"
    assert plan.total_all_reduces == 1


@pytest.mark.parametrize("layer_norm", (False, True))
def test_a_stray_source_does_not_shard_the_residual_stream(layer_norm):
    import torch

    from .modules import StraySource

    plan = fxtp.plan(StraySource(layer_norm=layer_norm), 2,
                     example_inputs=(torch.randn(2, 3, 32),))
    assert plan.placement_of("proj") == "replicate" and not plan.statistics
    assert "mixes a replicated activation" in plan.replicated["proj"]


@pytest.mark.parametrize("ws", (2, 4))
def test_an_uncapturable_submodule_is_an_opaque_call(ws):
    """The experts' data-dependent loop stops torch.export: the rest is captured, the experts
    are one opaque op, listed with the line that stopped the capture; the attention is
    sharded all the same."""
    plan = plan_of("looped_experts", ws)
    for lin in ("attn.q", "attn.k", "attn.v"):
        assert plan.placement_of(lin) == "column"
    assert plan.placement_of("attn.o") == "row"
    assert list(plan.opaque) == ["moe"]
    assert "choice.unique().tolist()" in plan.opaque["moe"]
    assert not any(e.module.startswith("moe") for e in plan.entries)   # not seen as linears
    assert "opaque (not captured, called whole on every rank): moe:" in str(plan)
    assert fxtp.Plan.from_json(plan.to_json()).opaque == plan.opaque


@pytest.mark.parametrize("ws", (2, 4))
def test_a_state_space_mixer_shards_its_inner_width(ws):
    """Mamba-2's mixer, as Megatron and vLLM shard it: in_proj column-parallel (gate, x and
    dt split by heads; B and C, one group of states, whole on every rank), the depthwise
    conv's channels and weight cut with its input, the scan's einsums, tril and repeat per
    head, the gated norm over the whole width a partial statistic, out_proj row-parallel."""
    plan = plan_of("ssm_one_group", ws)
    entries = {e.module: e for e in plan.entries}
    assert entries["mixer.in_proj"].placement == "column"
    assert entries["mixer.out_proj"].placement == "row"
    shard = entries["mixer.in_proj"].shard
    assert f"64: {ws} parts" in shard and "4: whole" in shard and f"8: {ws} parts" in shard
    assert plan.statistics == ["mixer"] and plan.total_all_reduces == 2
    assert not plan.replicated
    # the conv's weight and bias hold this rank's channels: x's, and B's and C's whole
    conv = {(w.user, w.path) for w in plan.solution.actions.narrows}
    assert {("conv1d", (1,)), ("conv1d", (2,))} <= conv


@pytest.mark.parametrize("ws", (2, 4))
def test_state_groups_are_shared_out_with_their_heads(ws):
    """With as many groups of B and C as there are ranks (or more), each rank holds its
    heads' groups, and the norm runs per group: no statistic."""
    plan = plan_of("ssm_groups", ws)
    shard = {e.module: e for e in plan.entries}["mixer.in_proj"].shard
    assert shard == f"Shard(0): {ws} parts, 5 fused chunks [64, 64, 16, 16, 8]"
    assert plan.placement_of("mixer.out_proj") == "row"
    assert not plan.statistics and plan.total_all_reduces == 1
    assert plan.param_fraction(layers_only=False) < 1 / ws + 0.05


def test_every_structure_is_listed():
    assert set(STRUCTURES) == {"fused_thirds", "interleaved_heads", "grouped_query",
                               "parallel_block", "cross_attention", "heads_in_batch",
                               "fused_multi_query", "normed_rotary", "complex_rotary",
                               "sink_topk", "fused_qkv_unbind", "interleaved_gate_up",
                               "looped_experts", "ssm_one_group", "ssm_groups", "torch_norms",
                               "gated_head_rows", "latent_attention",
                               "windowed_attention", "head_split_multi_query",
                               "tensor_split_gate_up"}
