"""Never a silent wrong answer, on 2 real gloo ranks (one spawn for every case): ranks holding
different weights or reading different checkpoints raise WeightMismatchError, ranks called with
different inputs raise InputMismatchError (check_inputs=True), out-of-vocabulary ids raise with
vocab-parallel tables, PEFT models of any task type and example inputs that are views capture,
and a rank that leaves makes fxtp's own agreement steps raise RankLostError, never hang."""
from __future__ import annotations

import pytest

from . import world2_workers
from .check_workers import LOST_TIMEOUT_S
from .spawned import per_rank, spawn_fixture

WS = 2
TOL = 1e-4
results = spawn_fixture(world2_workers.run_all, WS, world2_workers.write_checkpoints,
                        part="checks")      # one spawn with the fuzzing
case = per_rank


def test_same_weights_pass_the_check_reading_each_tensor_once(results):
    for r in case(results, "weights"):
        assert r["checked"] >= r["tensors"] > 0     # the capture's buffers (rotary) too
        assert r["read_late"] == 0        # every checksum was taken by the rewrite's own read
        assert r["max_error"] <= TOL


def test_other_seed_raises_weight_mismatch_on_every_rank(results):
    for r in case(results, "weights"):
        kind, message = r["other_seed"]
        assert kind == "WeightMismatchError"
        assert "model.layers.0.self_attn.q_proj.weight" in message or "... and" in message
        assert "rank 0 | rank 1" in message and "torch.manual_seed" in message
        assert "check_weights=False" in message
        assert r["other_seed_untouched"]
        assert r["unchecked"] == ("", "")


def test_one_changed_element_names_that_tensor_only(results):
    per_rank = case(results, "weights")
    assert len(per_rank[0]["one_tensor"]) >= 3
    for r in per_rank:
        for name, (kind, message) in r["one_tensor"]:
            assert kind == "WeightMismatchError", (name, kind, message)
            assert "1 of " in message and f"differ: {name} (rank 0 | rank 1)" in message


def test_meta_model_is_checked_at_load(results):
    for r in case(results, "load"):
        assert r["deferred"] > 0       # the meta tensors: left to the load
        kind, message = r["other_ckpt"]
        assert kind == "WeightMismatchError", message
        assert "fxtp.load" in message and "model.embed_tokens.weight" in message
        assert "Nothing was loaded" in message
        assert r["still_unloaded"] > 0          # the failed load changed nothing
        assert r["max_error"] <= TOL


def test_check_inputs_raises_on_every_rank_and_keeps_them_in_step(results):
    per_rank = case(results, "inputs")
    assert [s["how"] for s in per_rank[0]["seen"]].count("values") >= 2
    for rank, r in enumerate(per_rank):
        for s in r["seen"]:
            kind, message = s["error"]
            assert s["after"] <= TOL         # the next call is right: the ranks are in step
            if s["how"] == "none":
                assert kind == "", message
            elif s["how"] == "unknown" and rank == 1:
                assert kind == "InputError"         # its own error; rank 0 is told of it
            elif s["how"] == "unknown":
                assert kind == "InputMismatchError" and "rank 1 could not take" in message
            else:
                assert kind == "InputMismatchError", (s["how"], message)
                assert "input_ids" in message and "rank 0 | rank 1" in message


def test_out_of_vocab_ids_raise_with_vocab_parallel_tables(results):
    per_rank = case(results, "vocab")
    assert len(per_rank[0]["seen"]) >= 4
    for r in per_rank:
        for s in r["seen"]:
            assert s["model"] == "IndexError"
            kind, message = s["error"]
            assert kind == "RuntimeError" and "fxtp: token ids outside [0, 128)" in message, s
            assert "model.embed_tokens" in message
            assert s["good"] <= TOL


@pytest.mark.parametrize("task", ["None", "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS"])
def test_peft_models_of_every_task_type(results, task):
    for r in case(results, "peft"):
        c = r[task]
        assert c["max_error"] <= TOL and c["folded"] <= TOL
        assert c["branches"] == 2          # q_proj and v_proj of the layer, found from the graph
    if task == "None":
        assert c["type"] == "PeftModel"


def test_example_inputs_that_are_views(results):
    for r in case(results, "view_inputs"):
        assert r["max_error"] <= TOL


@pytest.mark.parametrize("step", ["transform", "check_inputs", "generate", "load", "save"])
def test_lost_rank_raises_within_the_timeout_naming_it(results, step):
    r = case(results, "lost_rank")[0]
    kind, message, seconds = r[step]
    assert kind == "RankLostError", message
    assert "rank 1 did not reach" in message, message
    assert seconds < LOST_TIMEOUT_S + 2


def test_a_rank_lost_halfway_through_save_leaves_no_checkpoint(results):
    """Rank 1 stops dead in the middle of the exchange: rank 0 raises naming it within the
    timeout, and nothing is left at either path, not even the temporary directory."""
    r = case(results, "lost_rank")[0]
    kind, message, seconds = r["save_halfway"]
    assert kind == "RankLostError", message
    assert "rank(s) 1" in message and "nothing was saved" in message, message
    assert seconds < LOST_TIMEOUT_S + 2
    assert r["saved"] == []
