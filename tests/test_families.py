"""Architecture breadth: many transformer families sharded from graph structure alone.

One spawn per world size runs every family; each is compared with the untouched model on
hypothesis-drawn inputs and its graph is measured. fxtp has no code for any of these families.
"""
from __future__ import annotations

import pytest

from fxtp.planning.plan import OUTSIDE_LAYERS
from fxtp.testing.families import FAMILIES
from fxtp.testing.ranks import run_ranks

from .rank_workers import FAMILY_EXAMPLES, run_families, world_sizes
from .spawned import early_result, start_early

TOL = 1e-4
NAMES = tuple(FAMILIES)
# all-reduces per layer: 2 for a dense layer, 1 for a parallel attention+MLP block, 3 for a
# decoder layer with cross-attention
PARALLEL_BLOCKS = {"phi", "gpt_neox", "falcon", "falcon_mqa", "gptj"}
# families whose layers torch.export cannot capture: their opaque parts
OPAQUE = {"mamba": ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]}
# all-reduces of partial statistics per layer (norms over the features a linear split)
STATISTICS = {"olmo2": 2}
# layers unlike the others: the all-reduces of each (Bamba's Mamba-2 layer: out_proj, the gated
# norm's statistic and the MLP's down_proj; then an attention layer)
LAYERS = {"bamba": {"model.layers.0": 3, "model.layers.1": 2},
          # the untied MLM head: the decoder's output and head.norm's statistic
          "modernbert": {"model.layers.0": 2, "model.layers.1": 2, OUTSIDE_LAYERS: 2}}
_cache: dict[int, list] = {}


# at world 4 only the families whose layout there differs from world 2's: kv heads fewer than
# the ranks (llama_bias with its k/v biases, phi3_gqa's fused chunks held by pairs of ranks,
# Falcon-40B's kv groups, Bamba's one group of B and C held whole beside its 8 SSM heads cut
# in 4, and its graph for other lengths) and heads that do not divide 4 (llama_uneven,
# gpt2_3heads). The others slice the same way at any world size (their world-2 run covers
# them; 4 ranks share this machine's 2 CPU cores, ~11 s a family); tests/test_multirank.py
# runs Llama, GPT-2 and BERT at world 4 as well
AT_4 = ("llama_bias", "phi3_gqa", "falcon", "llama_uneven", "gpt2_3heads", "gptj", "olmo2",
        "llama4_text", "modernbert", "gpt_oss", "mamba", "gpt_bigcode", "bamba")


def sizes(*names: str) -> list[tuple[int, str]]:
    return world_sizes(names, AT_4)


def worlds_of(name: str) -> list[int]:
    return [ws for ws, _ in sizes(name)]


# torch.compile(fullgraph=True) of every family's TP graph, at world 2
COMPILED_AT = 2
RUNS = sizes(*NAMES)


def spawn(ws: int) -> list[dict]:
    """Every family run at this world size, in one spawn of gloo ranks."""
    return run_ranks(run_families, ws, NAMES if ws == 2 else AT_4, ws == COMPILED_AT,
                     timeout=900)


def start_spawns(world_sizes: set[int]) -> None:
    """Starts the spawns of these world sizes in the background (conftest.py, at collection)."""
    for ws in sorted(world_sizes):
        start_early(("families", ws), lambda ws=ws: spawn(ws))


def family(ws: int, name: str) -> list[dict]:
    if ws not in _cache:
        _cache[ws] = early_result(("families", ws), lambda: spawn(ws))
    per_rank = [r[name] for r in _cache[ws]]
    for r in per_rank:
        assert "exception" not in r, r.get("exception")
    return per_rank


@pytest.mark.parametrize("ws, name", RUNS)
def test_family_equivalent(ws, name):
    for rank, r in enumerate(family(ws, name)):
        worst = max(r["max_error"].values())
        assert r["examples"] == FAMILY_EXAMPLES
        assert worst <= TOL, f"rank {rank}: {worst} on {r['worst_input']}"


@pytest.mark.parametrize("name", NAMES)
def test_family_under_torch_compile(name):
    """fullgraph=True (a graph break raises), a counting backend: the frames compiled for the
    first batch/sequence size serve the next two sizes, outputs equal eager TP's. Compiled on
    one rank, the ranks taking turns by family (the same graph on every rank, other shards),
    or on every rank when the shards are uneven (the ranks' graphs differ)."""
    ranks = family(COMPILED_AT, name)
    compiled = [r for r in ranks if "compilations" in r]
    uneven = len(set(ranks[0]["local_param_bytes"])) > 1
    assert len(compiled) == (len(ranks) if uneven else 1)
    for r in compiled:
        # two frames: the input-defaults hook and the graph
        assert r["compilations"] == [2, 2, 2]
        assert r["compile_error"] <= TOL


@pytest.mark.parametrize("ws, name", RUNS)
def test_family_all_reduces_and_local_parameters(ws, name):
    r = family(ws, name)[0]
    layers = r["all_reduces_per_layer"]
    assert layers == r["plan_all_reduces"]
    if name in OPAQUE:     # the layers' work is in opaque parts, replicated: nothing to reduce
        assert list(r["opaque"]) == OPAQUE[name] and not layers
        return
    if name == "t5":
        expected = {f"{side}.block.{i}": n for side, n in (("encoder", 2), ("decoder", 3))
                    for i in range(2)}
    elif name in LAYERS:
        expected = LAYERS[name]
    else:
        per_layer = (1 if name in PARALLEL_BLOCKS else 2) + STATISTICS.get(name, 0)
        expected = {layer: per_layer for layer in layers}
        assert len(layers) == 2, layers
    assert layers == expected
    # every linear in the layers is sharded, except routers and single-output gates
    assert 1 / ws <= r["linear_fraction"] <= 1 / ws + 0.2
    assert r["param_names_kept"], r["missing_params"]
    # the plan's bytes per rank are what each rank's graph holds
    for rank_facts in family(ws, name):
        held, planned = rank_facts["param_bytes"]
        assert held == planned


@pytest.mark.parametrize("ws, name", sizes("mixtral", "qwen2_moe", "gpt_oss"))
def test_moe_experts_sharded_router_replicated(ws, name):
    r = family(ws, name)[0]
    p = r["param_placements"]
    assert p["model.layers.0.mlp.experts.gate_up_proj"] == "column"   # fused, split in two
    assert p["model.layers.0.mlp.experts.down_proj"] == "row"
    router = "router" if name == "gpt_oss" else "gate"
    assert r["placements"][f"model.layers.0.mlp.{router}"] == "replicate"
    # the router's scores are normalised or selected over all experts
    assert ("topk" if name == "gpt_oss" else "softmax") in \
        r["replicated"][f"model.layers.0.mlp.{router}"]
    shapes = r["local_shapes"]
    gate_up = shapes["model.layers.0.mlp.experts.gate_up_proj"]
    down = shapes["model.layers.0.mlp.experts.down_proj"]
    inter = FAMILIES[name].get("moe_intermediate_size", FAMILIES[name]["intermediate_size"])
    if name == "gpt_oss":    # stored [experts, in, out], used without a transpose
        assert gate_up == (4, 64, 2 * inter // ws) and down == (4, inter // ws, 64)
    else:
        assert gate_up == (4, 2 * inter // ws, 64) and down == (4, 64, inter // ws)


@pytest.mark.parametrize("ws", worlds_of("bamba"))
def test_lengths_the_capture_did_not_hold_for_get_a_graph_of_their_own(ws):
    """Bamba's scan pads a length that does not fill its chunks (`if pad_size > 0`): captured
    at 8 tokens, its graph holds for such lengths only. 32 tokens run a second graph, built at
    that call, on the same shards. The other families record no such condition (equalities
    between inputs' sizes, T5's, are not a path the code took: no size graphs)."""
    for rank_facts in family(ws, "bamba"):
        assert rank_facts["other_size_error"] <= TOL and rank_facts["size_graphs"] == 1
        assert "(32 + -1 * (attention_mask.size()[1] % 32)) % 32 > 0" in rank_facts["conditions"]
    others = {name for ws, name in RUNS if "size_graphs" in family(ws, name)[0]}
    assert others == {"bamba"}


@pytest.mark.parametrize("ws", worlds_of("llama_tied"))
def test_tied_embeddings_stay_tied_and_replicated(ws):
    r = family(ws, "llama_tied")[0]
    assert r["placements"]["lm_head"] == "replicate"
    assert "tied" in r["replicated"]["lm_head"]
    assert r["local_shapes"]["model.embed_tokens.weight"] == (128, 64)


@pytest.mark.parametrize("ws", worlds_of("llama_bias"))
def test_biases_on_every_linear(ws):
    r = family(ws, "llama_bias")[0]
    shapes = r["local_shapes"]
    assert shapes["model.layers.0.self_attn.q_proj.bias"] == (64 // ws,)
    assert shapes["model.layers.0.self_attn.o_proj.bias"] == (64,)
    assert shapes["model.layers.0.mlp.down_proj.bias"] == (64,)


@pytest.mark.parametrize("ws", worlds_of("t5"))
def test_t5_self_and_cross_attention_sharded(ws):
    p = family(ws, "t5")[0]["placements"]
    for attn in ("layer.0.SelfAttention", "layer.1.EncDecAttention"):
        for lin in "qkv":
            assert p[f"decoder.block.0.{attn}.{lin}"] == "column"
        assert p[f"decoder.block.0.{attn}.o"] == "row"


@pytest.mark.parametrize("ws", worlds_of("bloom"))
def test_bloom_alibi_heads_merged_into_batch(ws):
    """BLOOM views [b, heads, s, d] as [b * heads, s, d] around baddbmm with the ALiBi bias:
    the heads stay sharded inside the merged dim and each rank adds its own heads' slopes."""
    r = family(ws, "bloom")[0]
    p = r["placements"]
    assert p["transformer.h.0.self_attention.query_key_value"] == "column"
    assert p["transformer.h.0.self_attention.dense"] == "row"
    assert r["local_shapes"]["transformer.h.0.self_attention.query_key_value.weight"] == (192 // ws, 64)
    assert r["outer_narrows"] == 2      # the ALiBi bias of each layer, sliced to this rank's heads


@pytest.mark.parametrize("ws", worlds_of("falcon_mqa"))
def test_falcon_multi_query_fused_qkv(ws):
    """Falcon-7B: q heads split over the ranks, the fused single k and v heads kept whole."""
    r = family(ws, "falcon_mqa")[0]
    assert r["placements"]["transformer.h.0.self_attention.query_key_value"] == "column"
    assert r["local_shapes"]["transformer.h.0.self_attention.query_key_value.weight"] == (64 // ws + 32, 64)
    assert "whole" in r["shards"]["transformer.h.0.self_attention.query_key_value"]


@pytest.mark.parametrize("ws", worlds_of("llama_uneven"))
def test_uneven_heads_and_features(ws):
    """6 q heads / 3 kv heads of 16 and 102 MLP features: the first ranks hold one unit more."""
    ranks = family(ws, "llama_uneven")
    q = [r["local_shapes"]["model.layers.0.self_attn.q_proj.weight"][0] for r in ranks]
    k = [r["local_shapes"]["model.layers.0.self_attn.k_proj.weight"][0] for r in ranks]
    up = [r["local_shapes"]["model.layers.0.mlp.up_proj.weight"][0] for r in ranks]
    if ws == 2:   # kv heads 2 + 1, and each rank the q heads of its kv heads: 4 + 2
        assert q == [64, 32] and k == [32, 16] and up == [51, 51]
    else:   # 3 kv heads cannot go whole to 4 ranks: every rank keeps all of them
        assert q == [32, 32, 16, 16] and k == [48] * 4 and up == [26, 26, 25, 25]
    assert "uneven" in ranks[0]["shards"]["model.layers.0.mlp.up_proj"] or ws == 2


@pytest.mark.parametrize("ws", worlds_of("gpt2_3heads"))
def test_gpt2_fused_thirds_with_uneven_heads(ws):
    ranks = family(ws, "gpt2_3heads")
    rows = [r["local_shapes"]["transformer.h.0.attn.c_attn.weight"] for r in ranks]
    if ws == 2:   # Conv1D weight [in, out]: 2 heads of 16 from each of q, k, v on rank 0, 1 on rank 1
        assert rows == [(48, 96), (48, 48)]
    else:         # 3 heads on 4 ranks: kept whole, c_proj narrows them to 4 disjoint parts
        assert rows == [(48, 144)] * 4


@pytest.mark.parametrize("ws", worlds_of("phi3_gqa"))
def test_fused_qkv_with_fewer_kv_heads_than_ranks(ws):
    """Phi-3's fused qkv with 4 q heads and 2 kv heads: each chunk split on its own; on 4 ranks
    the k and v chunks are held by pairs of ranks (as vLLM does), the q chunk by each rank."""
    ranks = family(ws, "phi3_gqa")
    rows = [r["local_shapes"]["model.layers.0.self_attn.qkv_proj.weight"][0] for r in ranks]
    assert rows == [64 // ws + 2 * 32 // min(ws, 2)] * ws
    if ws == 4:
        assert "32: 2 parts x2" in ranks[0]["shards"]["model.layers.0.self_attn.qkv_proj"]
