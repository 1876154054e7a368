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


def test_every_structure_is_listed():
    assert set(STRUCTURES) == {"fused_thirds", "interleaved_heads", "grouped_query",
                               "parallel_block", "cross_attention"}
