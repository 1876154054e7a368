"""Architecture breadth: many transformer families sharded from graph structure alone.

One spawn per world size runs every family; each is compared with the untouched model on
hypothesis-drawn inputs and its graph is measured. fxtp has no code for any of these families.
"""
from __future__ import annotations

import pytest

from fxtp.families import FAMILIES
from fxtp.verify import run_ranks

from .rank_workers import run_families

TOL = 1e-4
NAMES = tuple(FAMILIES)
# all-reduces per layer: 2 for a dense layer, 1 for a parallel attention+MLP block, 3 for a
# decoder layer with cross-attention
PARALLEL_BLOCKS = {"phi", "gpt_neox", "falcon"}
NOT_SHARDED_YET = {"bloom", "falcon_mqa"}   # equivalent (replicated attention), reported
_cache: dict[int, list] = {}


def family(ws: int, name: str) -> list[dict]:
    if ws not in _cache:
        _cache[ws] = run_ranks(run_families, ws, NAMES, timeout=900)
    per_rank = [r[name] for r in _cache[ws]]
    for r in per_rank:
        assert "exception" not in r, r.get("exception")
    return per_rank


@pytest.mark.parametrize("ws", (2, 4))
@pytest.mark.parametrize("name", NAMES)
def test_family_equivalent(ws, name):
    for rank, r in enumerate(family(ws, name)):
        worst = max(r["max_error"].values())
        assert r["examples"] == 5
        assert worst <= TOL, f"rank {rank}: {worst} on {r['worst_input']}"


@pytest.mark.parametrize("ws", (2, 4))
@pytest.mark.parametrize("name", NAMES)
def test_family_all_reduces_and_local_parameters(ws, name):
    r = family(ws, name)[0]
    layers = r["all_reduces_per_layer"]
    assert layers == r["plan_all_reduces"]
    if name in NOT_SHARDED_YET:
        # the MLP is sharded, the fused attention stays replicated with the reason in the plan
        attn = [m for m in r["replicated"] if m.endswith("query_key_value")]
        assert attn and all("sharded" in r["replicated"][m] for m in attn), r["replicated"]
        assert set(layers.values()) == {1}
        return
    if name == "t5":
        expected = {f"{side}.block.{i}": n for side, n in (("encoder", 2), ("decoder", 3))
                    for i in range(2)}
    else:
        per_layer = 1 if name in PARALLEL_BLOCKS else 2
        expected = {layer: per_layer for layer in layers}
        assert len(layers) == 2, layers
    assert layers == expected
    # every linear in the layers is sharded, except routers and single-output gates
    assert 1 / ws <= r["linear_fraction"] <= 1 / ws + 0.2
    assert r["param_names_kept"], r["missing_params"]


@pytest.mark.parametrize("ws", (2, 4))
@pytest.mark.parametrize("name", ("mixtral", "qwen2_moe"))
def test_moe_experts_sharded_router_replicated(ws, name):
    r = family(ws, name)[0]
    p = r["param_placements"]
    assert p["model.layers.0.mlp.experts.gate_up_proj"] == "column"   # fused, split in two
    assert p["model.layers.0.mlp.experts.down_proj"] == "row"
    assert r["placements"]["model.layers.0.mlp.gate"] == "replicate"
    assert "softmax" in r["replicated"]["model.layers.0.mlp.gate"]
    shapes = r["local_shapes"]
    gate_up = shapes["model.layers.0.mlp.experts.gate_up_proj"]
    down = shapes["model.layers.0.mlp.experts.down_proj"]
    inter = FAMILIES[name].get("moe_intermediate_size", FAMILIES[name]["intermediate_size"])
    assert gate_up == (4, 2 * inter // ws, 64)
    assert down == (4, 64, inter // ws)


@pytest.mark.parametrize("ws", (2, 4))
def test_tied_embeddings_stay_tied_and_replicated(ws):
    r = family(ws, "llama_tied")[0]
    assert r["placements"]["lm_head"] == "replicate"
    assert "tied" in r["replicated"]["lm_head"]
    assert r["local_shapes"]["model.embed_tokens.weight"] == (128, 64)


@pytest.mark.parametrize("ws", (2, 4))
def test_biases_on_every_linear(ws):
    r = family(ws, "llama_bias")[0]
    shapes = r["local_shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (64 // ws,)
    assert shapes["model.layers.0.self_attn.o_proj.bias"] == (64,)
    assert shapes["model.layers.0.mlp.down_proj.bias"] == (64,)


@pytest.mark.parametrize("ws", (2, 4))
def test_t5_self_and_cross_attention_sharded(ws):
    p = family(ws, "t5")[0]["placements"]
    for attn in ("layer.0.SelfAttention", "layer.1.EncDecAttention"):
        for lin in "qkv":
            assert p[f"decoder.block.0.{attn}.{lin}"] == "column"
        assert p[f"decoder.block.0.{attn}.o"] == "row"
