"""The plan: decisions found from graph structure, readable, serialisable, overridable."""
from __future__ import annotations

import json

import pytest
import torch

import fxtp
from fxtp.models import tiny_model

from .modules import PlainMLP, ReducesFeatures, tiny_net


@pytest.fixture(scope="module")
def llama_plan():
    return fxtp.plan(tiny_model("llama"), 2)


def test_plan_prints_a_table(llama_plan):
    text = str(llama_plan)
    for word in ("module", "placement", "why", "collectives", "model.layers.0.self_attn.q_proj",
                 "column", "row", "all_reduce", "all-reduces per layer (forward): 2"):
        assert word in text, word
    assert "replicated: lm_head" in text


def test_plan_json_round_trip(llama_plan):
    data = json.loads(llama_plan.to_json())
    assert data["world_size"] == 2
    assert data["all_reduces_per_layer"] == {"model.layers.0": 2, "model.layers.1": 2}
    assert {e["module"]: e["placement"] for e in data["entries"]}["model.layers.1.mlp.down_proj"] == "row"
    assert data["param_fraction_layers"] == pytest.approx(0.5)


def test_world_size_one_plan_has_no_collectives():
    plan = fxtp.plan(tiny_model("gpt2"), 1)
    assert plan.total_all_reduces == 0
    assert plan.param_fraction() == 1.0


def test_plain_mlp_is_column_then_row():
    plan = fxtp.plan(PlainMLP(), 2, example_inputs=(torch.randn(3, 16),))
    assert plan.placement_of("fc1") == "column"
    assert plan.placement_of("fc2") == "row"
    assert plan.total_all_reduces == 1


def test_reduction_over_features_stays_replicated_with_reason():
    plan = fxtp.plan(ReducesFeatures(), 2, example_inputs=(torch.randn(2, 3, 16),))
    assert plan.placement_of("fc") == "replicate"
    assert "reduces over a sharded dim" in plan.replicated["fc"]
    assert plan.total_all_reduces == 0


def test_model_output_needs_full_tensor():
    plan = fxtp.plan(tiny_net(), 2, example_inputs=(torch.randn(2, 5, 32),))
    assert plan.placement_of("head") == "replicate"
    assert "model output" in plan.replicated["head"]
    assert plan.placement_of("blocks.1.attn.k") == "column"
    assert plan.all_reduces == {"blocks.0": 2, "blocks.1": 2}


def test_tied_weight_stays_replicated():
    plan = fxtp.plan(tiny_model("gpt2"), 2)
    assert plan.placement_of("lm_head") == "replicate"
    assert "tied" in plan.replicated["lm_head"]


def test_gqa_kv_heads_fewer_than_ranks_are_replicated_per_rank_group():
    plan = fxtp.plan(tiny_model("llama"), 4)
    entry = {e.module: e for e in plan.entries}["model.layers.0.self_attn.k_proj"]
    assert entry.placement == "column"
    assert "2 parts, each held by 2 ranks" in entry.shard
    assert entry.local_numel * 2 == entry.full_numel


def test_override_is_recorded(llama_plan):
    new = llama_plan.override({"model.layers.1.self_attn": "replicate"})
    assert new.overrides == {"model.layers.1.self_attn": "replicate"}
    assert new.all_reduces == {"model.layers.0": 2, "model.layers.1": 1}
    assert "user override" in new.replicated["model.layers.1.self_attn.o_proj"]
    assert llama_plan.all_reduces == {"model.layers.0": 2, "model.layers.1": 2}


def test_vocab_parallel_plan_option():
    plan = fxtp.plan(tiny_model("bert"), 4, vocab_parallel=True)
    placements = {e.parameter: e.placement for e in plan.entries}
    assert placements["embeddings.word_embeddings.weight"] == "vocab"
    assert placements["embeddings.position_embeddings.weight"] == "vocab"
    # 2 token types cannot be split over 4 ranks: replicated, with the reason
    assert "embeddings.token_type_embeddings.weight" not in placements
    assert "cannot be split" in plan.replicated["embeddings.token_type_embeddings"]
    # the pooler's output leaves the model: column-parallel, gathered
    pooler = {e.module: e for e in plan.entries}["pooler.dense"]
    assert pooler.placement == "column" and "all_gather" in pooler.collectives
    assert plan.to_dict()["vocab_parallel"] is True
    # word and position lookups are partial sums; the replicated token-type lookup between
    # them makes the first one reduce early: 2 all-reduces before the layers at this size
    assert plan.all_reduces["(outside the layers)"] == 2
    assert fxtp.plan(tiny_model("bert"), 2, vocab_parallel=True).all_reduces[
        "(outside the layers)"] == 1
    # overrides keep the option
    assert plan.override({"encoder.layer.0.intermediate": "replicate"}).vocab_parallel


def test_vocab_parallel_table_override():
    plan = fxtp.plan(tiny_model("llama"), 2, vocab_parallel=True)
    assert {e.parameter: e.placement for e in plan.entries}["model.embed_tokens.weight"] == "vocab"
    kept = plan.override({"model.embed_tokens": "replicate"})
    assert "model.embed_tokens.weight" not in {e.parameter for e in kept.entries if e.placement == "vocab"}
    assert "(outside the layers)" not in kept.all_reduces
