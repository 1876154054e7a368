"""Tensor-parallel generation (fxtp.generator) on real gloo ranks: one spawn at world size 2
runs every case (tests/generate_workers.py); the assertions are here."""
from __future__ import annotations

import pytest

from fxtp.testing.ranks import run_ranks

from .generate_workers import GREEDY_CASES, MAX_BATCH, run_all, write_checkpoint

WS = 2
_cache: dict[int, list] = {}


def results(ws: int = WS) -> list[dict]:
    if ws not in _cache:
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            _cache[ws] = run_ranks(run_all, ws, write_checkpoint(root), timeout=600)
    return _cache[ws]


def case(name: str, ws: int = WS) -> list[dict]:
    per_rank = [r[name] for r in results(ws)]
    for r in per_rank:
        assert "exception" not in r, r["exception"]
    return per_rank


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_tokens_equal_hf_generate_on_every_rank(name):
    per_rank = case(f"greedy_{name}")
    for rank, r in enumerate(per_rank):
        assert len(r["examples"]) >= 2
        for ex in r["examples"]:
            assert ex["equal"], f"rank {rank} {ex['shape']} pads {ex['pads']}: {ex['out']} != {ex['ref']}"
        assert r["eos"]["equal"], r["eos"]
    assert all(r["examples"] == per_rank[0]["examples"] for r in per_rank)
    # the eos case really stopped early (rows padded after eos)
    assert per_rank[0]["eos"]["ref"][0][-1] == 0 or len(per_rank[0]["eos"]["ref"][0]) < 10


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_cache_sharded_by_kv_heads(name):
    per_rank = case(f"greedy_{name}")
    r = per_rank[0]
    assert len(r["cache_shapes"]) == 2 * 2          # k and v, 2 layers
    assert all(p["cache_shapes"] == r["cache_shapes"] for p in per_rank)
    for shape in r["cache_shapes"].values():
        assert shape[0] == MAX_BATCH and shape[2] == 24      # [max_batch, kv heads, max_len, head dim]
    if name == "falcon_mqa":                          # a single kv head: whole on every rank
        assert r["cache_bytes"] == r["full_cache_bytes"]
    else:
        assert r["cache_bytes"] * WS == r["full_cache_bytes"]
    assert r["all_reduces"] == {"falcon_mqa": 2}.get(name, 4)   # 2 per layer (1: parallel block)


def test_sampling_same_tokens_on_every_rank():
    per_rank = case("sampling")
    assert all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank)
    # same seed, same warpers: the same samples as Hugging Face's generate
    assert per_rank[0]["tokens"] == per_rank[0]["hf_tokens"]
    assert per_rank[0]["other_seed"] != per_rank[0]["tokens"]


def test_errors_are_reported_not_hung():
    for r in case("errors"):
        assert r["overflow"].startswith("CacheOverflowError") and "max_len=25" in r["overflow"]
        assert r["batch"].startswith("GenerationError") and "max_batch" in r["batch"]
        assert r["no_head"].startswith("GenerationError") and "generation head" in r["no_head"]
        assert r["beams"].startswith("GenerationError") and "num_beams" in r["beams"]
        assert r["mismatch"].startswith("PromptMismatchError") and "input_ids" in r["mismatch"]
        assert r["after"]


def test_compiled_step_no_recompile_between_decode_steps():
    for r in case("compile"):
        assert all(r["equal"]), r
        first, longer, new_len, third = r["frame_counts"]
        assert first <= 3                  # prefill + decode (+ once dynamic)
        assert longer == first             # more decode steps: nothing new
        assert third == new_len            # prompt lengths after the first new one: dynamic
        # the compiled step replayed from static buffers: a new batch size compiles once (then
        # dynamic), the same batch again and every further token compile nothing
        b2, b1, b1_again, b2_again = r["replay_frame_counts"]
        assert b1 - b2 <= 2 and b1_again == b1 and b2_again == b1_again, r["replay_frame_counts"]


def test_lora_folded_generation():
    for r in case("lora"):
        assert r["folded"]
        assert r["equal"], (r["out"], r["ref"])


def test_generator_takes_the_weights_of_a_trained_graph():
    """Hybrid engine: after an optimizer step on the training graph's adapter shards,
    gen.load_weights(tp) makes the generator decode what the stepped model decodes."""
    for r in case("lora"):
        assert r["hybrid_changed"]                       # the step changed the tokens
        assert r["hybrid_equal"], (r["hybrid_out"], r["hybrid_ref"])
        assert r["hybrid_folded_error"].startswith("LoraStateError")


def test_replayed_decode_steps_give_hf_tokens():
    """The CUDA-graph decode path (static buffers per batch bucket, capture after warm-up,
    replay) run on CPU as "emulate": Hugging Face's tokens, one capture per bucket, captured
    again after a weight moved; cuda_graph=True on a CPU step is refused."""
    for r in case("replay"):
        assert all(r["equal"]) and r["equal_after_move"] and r["sampling_equal"], r
        assert r["captures"] == [1, 2, 2, 2]          # buckets 1 and 2, each captured once
        assert r["buckets"] == [1, 2] and r["warmups"] == [2, 2]
        assert r["captures_after_move"] == 1          # graphs dropped, bucket 1 captured again
        assert r["device_under_meta_default"] == "cpu"
        assert r["graph_on_cpu"].startswith("GenerationError") and "CUDA" in r["graph_on_cpu"]
        assert r["bad_mode"].startswith("GenerationError") and "cuda_graph" in r["bad_mode"]


def test_small_batch_runs_only_its_cache_rows():
    for r in case("replay"):
        # prefill and each decode step of a batch of one: one input row, one cache row
        rows = r["eager_rows"]
        assert rows and all(ids[0] == 1 and cache[0] == 1 for ids, cache in rows)
        assert all(shape[0] == 2 for shape in r["cache_after"])    # the whole cache afterwards


def test_meta_built_generator_captures_on_meta():
    for r in case("meta"):
        assert r["param_devices"] == ["meta"] and r["cache_devices"] == ["meta"]
        assert r["baked_devices"] in ([], ["meta"])     # nothing of cpu/cuda baked in
        assert r["before_load"].startswith("MetaTensorError")


def test_meta_built_generator_loaded_decodes_hf_tokens():
    """fxtp.load(gen, ckpt) fills the step graph (the model's own parameter names) and
    zero-fills its meta KV cache."""
    for r in case("meta"):
        assert "load_error" not in r, r["load_error"]
        assert r["equal"], (r["out"], r["ref"])
        assert r["loaded_cache_devices"] == ["cpu"]


# ---------------------------------------------------------------------------------------------
# tp.generate (fxtp/generation/tp_generate.py): world 2 in the spawn above; world 1 there too, on a group
# of one rank each (rank 0: LoRA, rank 1: Llama); world 1 without a group in test_device_dtype

def tp_case(name: str, ws: int) -> list[dict]:
    if ws == WS:
        return case(name, ws)
    rank = {"tp_generate_lora": 0, "tp_generate": 1}[name]
    r = results(WS)[rank][f"{name}_1"]
    assert "exception" not in r, r["exception"]
    return [r]


def _shares(facts: dict) -> None:
    assert facts["same_objects"] and facts["same_ptrs"], facts   # tp's tensors, not copies
    assert facts["extra_bytes"] == 0, facts                      # no weight storage of its own
    assert facts["cache_devices"] == ["cpu"]


@pytest.mark.parametrize("ws", [1, WS])
def test_tp_generate_equals_hf_generate_and_sizes_its_step_from_the_request(ws):
    for r in tp_case("tp_generate", ws):
        assert all(r["equal"]), r
        assert r["before"] == (True, 0)               # nothing built at transform time
        # (max_len, max_batch, builds): 5 + 6 tokens of 2 prompts -> (64, 2); smaller calls,
        # the emulated CUDA-graph mode and back reuse it; 60 + 6 tokens of 3 prompts rebuild
        # (128, 4) (world 2 only); explicit sizes not larger than the step reuse it
        grown = [(128, 4, 2)] * 2 if ws > 1 else [(64, 2, 1)]
        assert r["sizes"] == [(64, 2, 1)] * 4 + grown, r["sizes"]
        assert r["emulate_captures"] == 1 and r["mode_after"] == "eager"
        assert r["overflow"].startswith("CacheOverflowError") and "max_len=16" in r["overflow"]
        batch = r["explicit_batch"]
        assert batch.startswith("GenerationError") and "max_batch=1" in batch
        assert r["bad_size"].startswith("GenerationError") and "max_len" in r["bad_size"]
        if ws > 1:       # different requests on the ranks: refused on every rank, no hang
            assert r["mismatch"].startswith("PromptMismatchError"), r["mismatch"]
            assert "prompt length (rank 0 | rank 1)" in r["mismatch"], r["mismatch"]


@pytest.mark.parametrize("ws", [1, WS])
def test_tp_generate_on_a_meta_build_follows_fxtp_load(ws):
    """The case's tp is built under fxtp.init_empty(): refused before fxtp.load, the loaded
    model's tokens after it; a second load (new tensors) is followed without a rebuild."""
    for r in tp_case("tp_generate", ws):
        assert r["before_load"].startswith("MetaTensorError") and "fxtp.load" in r["before_load"]
        assert r["replaced"] and r["equal"][1] and r["sizes"][1][2] == 1, r


@pytest.mark.parametrize("ws", [1, WS])
def test_tp_generate_step_shares_tps_tensors(ws):
    for r in tp_case("tp_generate", ws):
        for facts in ("facts", "facts_after_reload", "facts_after_rebuild"):
            _shares(r[facts])


@pytest.mark.parametrize("ws", [1, WS])
def test_tp_generate_decodes_what_tp_was_trained_to(ws):
    for r in tp_case("tp_generate", ws):
        assert r["trained_equal"] and r["trained_changed"] and r["still_training"], r


def test_tp_generate_refuses_a_step_sliced_otherwise():
    for r in case("tp_generate"):
        msg = r["sliced_differently"]
        assert msg.startswith("GenerationError") and "sliced differently" in msg, msg
        assert "fxtp.generator" in msg


@pytest.mark.parametrize("ws", [1, WS])
def test_tp_generate_lora_folds_for_the_call_and_restores_tp_bit_for_bit(ws):
    for r in tp_case("tp_generate_lora", ws):
        assert r["equal"], (r["out"], r["ref"])
        assert r["bitwise"] and r["forward_same"] and not r["folded_after"], r
        assert r["saved_copies"] == 0                 # the base shards' copies freed
        _shares(r["facts"])
        assert r["user_folded_equal"] and r["user_folded_kept"] and r["bitwise_after_user_fold"]
        assert r["trained_equal"] and r["trained_changed"] and r["builds"] == 1, r


def test_tp_generate_of_the_generators_step_graph_is_refused():
    for r in case("errors"):
        assert r["step_tp_generate"].startswith("GenerationError"), r["step_tp_generate"]
        assert "gen" in r["step_tp_generate"] and "decode step" in r["step_tp_generate"]
