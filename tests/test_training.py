"""Training through the tensor-parallel graph (issue 5): gradients of every local parameter vs
the matching slice of the untouched model's, and optimizer steps tracking the unsharded run.

The cases run in the same gloo spawn as tests/test_multirank.py (tests/train_workers.py)."""
from __future__ import annotations

import pytest

from .rank_workers import world_sizes
from .test_multirank import case
from .train_workers import AT_4

GRAD_TOL = 1e-4


def sizes(*names: str) -> list[tuple[int, str]]:
    return world_sizes(names, AT_4)


LORA_SIZES = [(ws, n.removeprefix("lora_")) for ws, n in sizes("lora_llama", "lora_gpt2")]


@pytest.mark.parametrize("ws, name", sizes("train_grad_llama", "train_grad_gpt2",
                                           "train_grad_gpt2_vocab"))
def test_gradients_are_the_slices_of_the_full_gradients(ws, name):
    for rank, r in enumerate(case(ws, name)):
        assert r["training"]
        assert r["examples"] >= 4
        # every parameter is compared (none missing, none without a gradient)
        assert r["compared"] == r["params"] and not r["missing"], r
        assert r["max_error"] <= GRAD_TOL, f"rank {rank}: {r['max_error']} at {r['worst']}"
        assert r["loss_error"] <= GRAD_TOL
        # Megatron f is in the graph (not vacuous: without it the input gradients are partial)
        assert r["grad_syncs"] >= 2 * 2


@pytest.mark.parametrize("ws, name", sizes("train_grad_llama_uneven", "train_grad_falcon_mqa",
                                           "train_grad_bloom"))
def test_gradients_with_uneven_and_whole_chunks(ws, name):
    """Uneven heads (2+1 kv heads), k/v chunks held whole by every rank (their gradients summed
    over all ranks) and heads merged into the batch dim: still each parameter's own slice."""
    for rank, r in enumerate(case(ws, name)):
        assert r["compared"] == r["params"] and not r["missing"], r
        assert r["max_error"] <= GRAD_TOL, f"rank {rank}: {r['max_error']} at {r['worst']}"
        assert r["loss_error"] <= GRAD_TOL


def test_llama_kv_heads_shared_by_ranks_sum_their_gradients():
    """At world 4 each of the 2 kv heads is held by 2 ranks; their weight gradients are summed
    over those ranks (one sum_over_replicas per k/v weight) and match the full gradient."""
    two, four = case(2, "train_grad_llama")[0], case(4, "train_grad_llama")[0]
    assert four["grad_syncs"] == two["grad_syncs"] + 2 * 2     # k and v, 2 layers
    assert four["max_error"] <= GRAD_TOL


@pytest.mark.parametrize("name", ("train_sgd_llama", "train_adam_gpt2"))
def test_optimizer_steps_track_the_unsharded_run(name):
    for r in case(2, name):
        assert r["moved"] > 1.0                                 # the steps changed the weights
        assert max(r["param_errors"]) <= 1e-4, r["param_errors"]
        assert r["losses_tp"] == pytest.approx(r["losses_ref"], abs=1e-4)


def test_dropout_model_refuses_train_until_disabled():
    for r in case(2, "train_dropout"):
        kind, msg = r["error"]
        assert kind == "DropoutError"
        assert "transformer.drop" in msg and "disable_dropout=True" in msg
        assert r["training_after_error"] is False
        assert r["training_after_disable"] is True
        assert r["training_after_generation"] is False


@pytest.mark.parametrize("ws, name", LORA_SIZES)
def test_peft_lora_sharded_with_its_base(ws, name):
    """The LoRA branch is found from the graph: beside a column-parallel base, A whole and B
    split like the base; beside a row-parallel base, A split on its input and B whole applied
    to the partial sum, which shares the base's all-reduce (still 2 per layer)."""
    for rank, r in enumerate(case(ws, f"lora_{name}")):
        assert r["max_error"] <= GRAD_TOL
        assert r["grad_error"] <= GRAD_TOL, f"rank {rank}: {r['grad_error']} at {r['worst']}"
        # only the adapters are trainable (PEFT freezes the base), all of them compared
        assert r["trainable"] == r["compared"] > 0 and not r["missing"]
        assert set(r["all_reduces_per_layer"].values()) == {2}
        assert len(r["all_reduces_per_layer"]) == 2
        p = r["placements"]
        col, row = {"llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"),
                    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj")}[name]
        col, row = f"base_model.model.{col}", f"base_model.model.{row}"
        assert (p[f"{col}.base_layer"], p[f"{col}.lora_A.default"], p[f"{col}.lora_B.default"]) \
            == ("column", "replicate", "column")
        assert (p[f"{row}.base_layer"], p[f"{row}.lora_A.default"], p[f"{row}.lora_B.default"]) \
            == ("row", "row", "replicate")
        shapes = r["local_shapes"]
        a_shape = shapes[f"{col}.lora_A.default.weight"]
        assert a_shape == (8, 64)                                 # A whole
        assert shapes[f"{row}.lora_B.default.weight"] == (64, 8)  # B whole
        assert shapes[f"{row}.lora_A.default.weight"] == (8, {"llama": 128, "gpt2": 256}[name] // ws)


@pytest.mark.parametrize("ws, name", LORA_SIZES)
def test_fold_and_unfold_lora_on_the_sharded_graph(ws, name):
    for r in case(ws, f"lora_{name}"):
        assert r["folded_error"] <= GRAD_TOL and r["unfolded_error"] <= GRAD_TOL
        assert r["round_trip"] == 0.0                   # originals restored bit for bit
        ar_unfolded, ar_folded = r["all_reduces_unfolded_folded"]
        assert ar_unfolded == ar_folded == 4            # 2 per layer, unchanged by folding
        used_before, used_after = r["adapter_weights_used"]
        assert used_before > 0 and used_after == 0      # no LoRA op left in the folded graph
        # fold twice, train while folded, unfold when unfolded: named errors
        assert r["state_errors"] == ["LoraStateError"] * 3
        assert r["training_after"]
        # fold/unfold again: same folded outputs, weights restored, no code generated again
        assert r["second_round"] == (0.0, 0.0, True)


@pytest.mark.parametrize("name", ("llama", "gpt2"))
def test_training_graph_under_torch_compile(name):
    """torch.compile(fullgraph=True) with AOT autograd (the backward graph traced as well):
    one compilation serves every batch/sequence size, loss and gradients equal eager TP's."""
    for r in case(2, f"train_grad_{name}"):
        # two frames: the input-defaults hook and the graph; no graph break (fullgraph)
        assert r["compilations"] == [2, 2, 2]
        assert r["compile_error"] <= GRAD_TOL


@pytest.mark.parametrize("name", ("llama", "gpt2"))
def test_lora_unfolded_and_folded_graphs_under_torch_compile(name):
    for r in case(2, f"lora_{name}"):
        for state in ("compile_unfolded", "compile_folded"):
            assert r[state]["compilations"] == [2, 2, 2], state
            assert r[state]["compile_error"] <= GRAD_TOL, state
