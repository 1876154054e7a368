"""fxtp.save: a Llama, a GPT-2 (Conv1D, fused qkv, tied head) and an uneven-shard Llama trained
one step at world 2 and saved reload in transformers equal to the model trained whole, and at
world 4 and back at 2 (init_empty + transform + load) equal to transformers' reload; a PEFT
adapter and its merged base; the errors. One spawn of 4 gloo ranks serves every multi-rank case
(tests/save_workers.py); the rest runs here at world 1."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import fxtp
from fxtp.saving.assemble import Piece, pieces
from fxtp.saving.layout import Entry
from fxtp.saving.writer import TensorFile

from .save_workers import MODELS, TOL, run_all
from .spawned import per_rank, spawn_fixture


def _root(tmp: str) -> str:
    return tmp


results = spawn_fixture(run_all, 4, _root)
case = per_rank


def _pair(results, key):
    return case(results[:2], key)


# ---------------------------------------------------------------------------------------------
# trained at world 2, saved, reloaded

@pytest.mark.parametrize("name", MODELS)
def test_trained_and_saved_at_world_2_reloads_in_transformers_equal(results, name):
    r0, r1 = _pair(results, f"w2/{name}")
    assert r0["moved"] > 1e-3                        # the step changed the weights
    assert r0["reload_error"] <= TOL and r0["file_error"] <= TOL
    # the tensors and names save_pretrained writes: tied weights once, nothing else
    assert r0["names"] == r0["ref_names"] and r0["layouts"] == r0["ref_layouts"]
    assert r0["config_same"] and r0["generation_same"]
    # one file per rank, each written by its rank, and the index from_pretrained reads
    assert r0["files"] == r1["files"] == ["model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors",
                                          "model.safetensors.index.json"]
    assert r0["written"] == ["model-00001-of-00002.safetensors"]
    assert r1["written"] == ["model-00002-of-00002.safetensors"]
    assert sorted(r0["index"]["weight_map"]) == r0["ref_names"]
    assert r0["index"]["metadata"]["total_size"] == r0["bytes_written"] + r1["bytes_written"]
    assert r0["leftovers"] == []


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_writes_about_its_share(results, name):
    """Tensors are spread over the ranks by bytes: each writes about half the model."""
    r0, r1 = _pair(results, f"w2/{name}")
    total = r0["bytes_written"] + r1["bytes_written"]
    assert 0.35 * total <= r0["bytes_written"] <= 0.65 * total
    # beyond its shard a rank holds the slices of one tensor it writes and a block of rows
    for r in (r0, r1):
        assert 0 < r["largest"] and r["staged"] <= 1.5 * r["largest"], r


@pytest.mark.parametrize("name", MODELS)
def test_saved_at_2_loads_at_4_and_saved_at_4_loads_at_2(results, name):
    for stage in ("w4", "back2"):
        ranks = case(results if stage == "w4" else results[:2], f"{stage}/{name}")
        for rank, r in enumerate(ranks):
            assert r["examples"] >= 3 and r["sliced"] > 0
            assert r["max_error"] <= 1e-4, f"{stage} rank {rank}: {r['max_error']}"
    # 4 ranks' slices (kv heads replicated in pairs, uneven splits) reassemble the same bits
    assert case(results, f"w4/{name}")[0]["resaved_same"] is True


# ---------------------------------------------------------------------------------------------
# PEFT

def test_peft_adapter_saved_and_reloaded(results):
    r0, r1 = _pair(results, "peft")
    assert r0["kind"] == r1["kind"] == "adapter"
    assert r0["files"] == ["adapter_model.safetensors"]
    # what PeftModel.save_pretrained writes (less its README model card)
    assert r0["listing"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(r0["ref_listing"]) - set(r0["listing"]) == {"README.md"}
    assert r0["names_same"] and r0["config_diff"] == {}
    assert r0["adapter_error"] <= TOL
    # PeftModel.from_pretrained(base, dir) computes what the trained PEFT model does
    assert r0["reload_error"] <= 1e-4


def test_peft_merged_base_and_folded_saves(results):
    r0 = _pair(results, "peft")[0]
    assert r0["merged_kind"] == "merged" and r0["merged_names"]
    assert r0["merged_error"] <= TOL
    # folded (fxtp.fold_lora): the same adapter bit for bit, and the merged weights as merged
    assert r0["folded_adapter_same"] and r0["folded_merged_error"] <= TOL


# ---------------------------------------------------------------------------------------------
# training snapshots

def test_a_training_snapshot_resumes_bit_for_bit_at_the_same_world_size(results):
    for r in _pair(results, "state"):
        assert r["same_after_two_steps"] is True
        # each rank's shards and optimizer state (DCP), and fxtp's record of the layout
        assert r["listing"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "fxtp_state.json"]
        kind, message = r["meta_optimizer"]
        assert kind == "CheckpointError" and "meta" in message and "first" in message
        kind, message = r["other_model"]
        assert kind == "CheckpointError" and "another model" in message


def test_a_snapshot_refuses_another_world_size(results):
    for r in case(results, "state_at_4"):
        kind, message = r["error"]
        assert kind == "CheckpointError" and "world size 2" in message and "fxtp.save" in message


# ---------------------------------------------------------------------------------------------
# errors, on ranks 2 and 3

def _errors(results):
    return per_rank(results[2:], "errors")


def test_a_non_empty_directory_is_refused_and_kept(results):
    for r in _errors(results):
        kind, message = r["not_empty"]
        assert kind == "SaveError" and "tokenizer.json" in message and "overwrite=True" in message
        assert r["not_empty_kept"] == ["tokenizer.json"]


def test_a_full_disk_on_one_rank_leaves_nothing_behind(results):
    for r in _errors(results):
        for key in ("disk_full", "disk_full_overwrite"):
            kind, message = r[key]
            assert kind == "SaveError" and "No space left" in message, message
        assert r["full_exists"] is False
        assert r["busy_after_failure"] == ["tokenizer.json"]      # overwrite failed: kept
        assert r["leftovers"] == [] and r["made"] == []


def test_overwrite_replaces_the_directory_as_a_whole(results):
    for r in _errors(results):
        assert r["overwrite"] == ("", "")
        assert "tokenizer.json" not in r["busy_after_overwrite"]
        assert "config.json" in r["busy_after_overwrite"]


def test_max_shard_size_splits_files_that_transformers_reads(results):
    for r in _errors(results):
        assert len(r["small_files"]) > 4 and r["small_files"][-1] == "model.safetensors.index.json"
        assert r["small_error"] == 0.0
        assert r["bad_shard_size"][0] == "SaveError" and "'lots'" in r["bad_shard_size"][1]


def test_refusals_name_what_to_do(results):
    for r in _errors(results):
        assert r["merged_plain"][0] == "SaveError" and "PEFT" in r["merged_plain"][1]
        assert r["different"][0] == "SaveError" and "same arguments" in r["different"][1]
        assert r["unloaded"][0] == "MetaTensorError" and "fxtp.load" in r["unloaded"][1]


# ---------------------------------------------------------------------------------------------
# world 1, in this process

class HandLora(nn.Module):
    """A LoRA branch written by hand (no PEFT): base(x) + 0.5 * b(a(x)); a tied head."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(16, 16)
        self.a = nn.Linear(16, 4, bias=False)
        self.b = nn.Linear(4, 16, bias=False)
        self.head = nn.Linear(16, 16, bias=False)
        self.tail = nn.Linear(16, 16, bias=False)
        self.tail.weight = self.head.weight
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        y = self.base(x) + 0.5 * self.b(self.a(x))
        return self.tail(self.head(y)) * self.scale


def test_a_plain_module_saves_its_state_dict_for_load_model(tmp_path):
    from safetensors.torch import load_model

    torch.manual_seed(0)
    model = HandLora()
    with torch.no_grad():
        model.b.weight.normal_()
    tp = fxtp.transform(model, 1, example_inputs=(torch.randn(2, 16),))
    report = fxtp.save(tp, tmp_path / "plain")
    assert report.kind == "state_dict" and os.listdir(tmp_path / "plain") == ["model.safetensors"]
    # the state_dict's tensors: the persistent buffer, not the other; the tied weight once,
    # under the first of its names (what safetensors.torch.save_model keeps)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "plain" / "model.safetensors")) == [
        "a.weight", "b.weight", "base.bias", "base.weight", "head.weight", "scale"]
    other = HandLora()
    missing, unexpected = load_model(other, str(tmp_path / "plain" / "model.safetensors"))
    assert not unexpected
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    # folded LoRA in the weights is refused, and saved again once unfolded
    fxtp.fold_lora(tp)
    with pytest.raises(fxtp.LoraStateError, match="unfold_lora"):
        fxtp.save(tp, tmp_path / "folded")
    assert not (tmp_path / "folded").exists()
    fxtp.unfold_lora(tp)
    fxtp.save(tp, tmp_path / "unfolded")


def test_world_1_bf16_checkpoint_equals_save_pretrained(tmp_path):
    from safetensors.torch import load_file

    from fxtp.testing.models import tiny_model

    model = tiny_model("gpt2").to(torch.bfloat16)
    tp = fxtp.transform(model, 1)
    report = fxtp.save(tp, tmp_path / "mine")
    model.save_pretrained(tmp_path / "ref")
    assert sorted(os.listdir(tmp_path / "mine")) == sorted(os.listdir(tmp_path / "ref"))
    assert report.files == ["model.safetensors"]
    a = load_file(tmp_path / "mine" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.bfloat16
                                          for k in b)
    cfg = json.load(open(tmp_path / "mine" / "config.json"))
    assert cfg == json.load(open(tmp_path / "ref" / "config.json")) and cfg["dtype"] == "bfloat16"


def test_bad_arguments_raise_before_anything_is_written(tmp_path):
    with pytest.raises(fxtp.NotTransformedError, match="fxtp.transform"):
        fxtp.save(nn.Linear(2, 2), tmp_path / "x")

    class FakeGenerator:
        def load_weights(self):
            pass

    with pytest.raises(fxtp.NotTransformedError, match="decode step"):
        fxtp.save(FakeGenerator(), tmp_path / "x")
    tp = fxtp.transform(HandLora(), 1, example_inputs=(torch.randn(2, 16),))
    (tmp_path / "file").write_text("x")
    with pytest.raises(fxtp.SaveError, match="is a file"):
        fxtp.save(tp, tmp_path / "file")
    with pytest.raises(fxtp.SaveError, match="str or os.PathLike"):
        fxtp.save(tp, 3)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_pieces_take_each_index_once_and_refuse_gaps():
    # kv heads replicated in pairs over 4 ranks: ranks 0, 1 hold 0..3, ranks 2, 3 hold 4..7
    held = [((0, 4),), ((0, 4),), ((4, 4),), ((4, 4),)]
    assert pieces("w", 0, 8, held) == [Piece(0, 0, 0, 4), Piece(2, 0, 4, 4)]
    # fused qkv chunks, uneven: rank 0 holds 2 of 3 columns of each chunk
    held = [((0, 2), (3, 2), (6, 2)), ((2, 1), (5, 1), (8, 1))]
    got = pieces("w", 1, 9, held)
    assert [(p.rank, p.local, p.start, p.length) for p in got] == [
        (0, 0, 0, 2), (1, 0, 2, 1), (0, 2, 3, 2), (1, 1, 5, 1), (0, 4, 6, 2), (1, 2, 8, 1)]
    with pytest.raises(fxtp.SaveError, match="no rank holds indices 4"):
        pieces("w", 0, 8, [((0, 4),), None])


def test_tensor_file_is_read_back_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a.weight": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4, dtype=torch.float64).to(torch.bfloat16),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
               "mask": torch.tensor([True, False, True])}
    entries = [Entry(k, k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    f = TensorFile(str(tmp_path / "t.safetensors"), entries)
    for k, v in tensors.items():      # in pieces, out of order: offsets are in the header
        flat = v.reshape(-1)
        half = flat.numel() // 2
        f.write(k, half * v.element_size(), flat[half:])
        f.write(k, 0, flat[:half])
    f.close()
    back = load_file(tmp_path / "t.safetensors")
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert os.path.getsize(tmp_path / "t.safetensors") == f.size
