"""The plan: decisions found from graph structure, readable, serialisable, overridable."""
from __future__ import annotations

import json

import pytest
import torch

import fxtp
from fxtp.testing.models import tiny_model

from .modules import PlainMLP, ReducesFeatures, tiny_net


@pytest.fixture(scope="module")
def llama_plan():
    return fxtp.plan(tiny_model("llama"), 2)


@pytest.fixture(scope="module")
def llama4():
    """A model and its plan at world 4, captured apart from llama_plan's."""
    model = tiny_model("llama")
    return model, fxtp.plan(model, 4)


@pytest.fixture(scope="module")
def llama_plan1():
    return fxtp.plan(tiny_model("llama"), 1)


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


def test_gqa_kv_heads_fewer_than_ranks_are_replicated_per_rank_group(llama4):
    plan = llama4[1]
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


def test_plan_bytes_per_rank_count_every_parameter_once(llama4):
    model, plan = llama4
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.full_param_bytes == full
    linears = {e.parameter: e for e in plan.entries}
    q = linears["model.layers.0.self_attn.q_proj.weight"]
    assert q.full_bytes == 64 * 64 * 4 and q.local_bytes(3) == q.full_bytes // 4
    # what rank r holds: the full model minus the part of each split parameter it does not hold
    for r in range(4):
        dropped = sum(e.full_bytes - e.local_bytes(r) for e in plan.entries)
        assert plan.local_param_bytes[r] == full - dropped
    assert 0.25 < plan.memory_fraction() < 1
    text = str(plan)
    assert "parameter bytes per rank" in text and "bytes/rank" in text


def test_uneven_plan_reports_each_ranks_bytes():
    from fxtp.testing.families import family_model

    plan = fxtp.plan(family_model("llama_uneven"), 4)     # 6 q heads: 2+2+1+1 per rank
    q = {e.parameter: e for e in plan.entries}["model.layers.0.self_attn.q_proj.weight"]
    assert q.local_numels[0] == 2 * q.local_numels[3]
    assert plan.local_param_bytes[0] > plan.local_param_bytes[3]
    assert "rank 3" in str(plan)


def test_plan_from_json_is_equal_and_transforms_the_model(llama_plan, llama_plan1):
    loaded = fxtp.Plan.from_json(llama_plan.to_json())
    assert loaded == llama_plan and loaded.captured is None
    assert loaded.mismatches(llama_plan) == []
    overridden = llama_plan.override({"model.layers.1.mlp": "replicate"})
    again = fxtp.Plan.from_json(overridden.to_json())
    assert again.overrides == {"model.layers.1.mlp": "replicate"} and again == overridden
    # world_size 1 needs no process group: a loaded plan is re-derived from the model
    tp = fxtp.transform(tiny_model("llama"), 1,
                        plan=fxtp.Plan.from_json(llama_plan1.to_json()))
    assert tp.meta["fxtp"].plan == llama_plan1


def test_loaded_plan_that_does_not_match_the_model_is_refused(llama_plan1):
    plan1 = llama_plan1
    data = json.loads(plan1.to_json())
    data["entries"][0]["placement"] = "replicate"               # a hand-edited decision
    with pytest.raises(fxtp.PlanOverrideError, match="does not match.*q_proj.weight.*overrides"):
        fxtp.transform(tiny_model("llama"), 1, plan=fxtp.Plan.from_dict(data))
    with pytest.raises(fxtp.PlanOverrideError, match="does not match"):
        fxtp.transform(tiny_model("gpt2"), 1, plan=fxtp.Plan.from_json(plan1.to_json()))


def test_a_file_that_is_not_a_plan_is_a_named_error():
    with pytest.raises(fxtp.PlanOverrideError, match="not valid JSON"):
        fxtp.Plan.from_json("{not json")
    with pytest.raises(fxtp.PlanOverrideError, match="not an fxtp plan"):
        fxtp.Plan.from_json('{"model": "x"}')


def test_replan_reuses_the_capture(llama_plan, llama4):
    at4 = llama_plan.replan(4)
    assert at4.world_size == 4 and at4.captured is llama_plan.captured
    assert at4.mismatches(llama4[1]) == []
    vocab = llama_plan.override({"model.layers.0.mlp": "replicate"}).replan(vocab_parallel=True)
    assert vocab.vocab_parallel and vocab.overrides == {"model.layers.0.mlp": "replicate"}
    assert {e.parameter: e.placement for e in vocab.entries}["lm_head.weight"] == "column"
    with pytest.raises(fxtp.PlanOverrideError, match="world_size must be >= 1"):
        llama_plan.replan(0)
