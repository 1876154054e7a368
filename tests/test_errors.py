"""Bad input gets a named fxtp error that says what to do; never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import fxtp
from fxtp.testing.models import tiny_model
from fxtp.testing.ranks import free_port

from fxtp.solve.placements import ChunkSplit, DimShard
from fxtp.solve.splits import ranks_that_fit, why_not_whole_heads

from .modules import DataDependent, PlainMLP, TwoHeadSizes


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plans(llama):
    """The model's plans at world 1 and 2, captured once for the tests that do not test the
    capture (an override is solved again from the plan's capture)."""
    return {1: fxtp.plan(llama, 1), 2: fxtp.plan(llama, 2)}


def test_every_error_is_an_fxtp_error():
    for cls in (fxtp.CaptureError, fxtp.InputError, fxtp.NotDivisibleError,
                fxtp.PlanOverrideError, fxtp.ProcessGroupError, fxtp.WorldSizeMismatchError):
        assert issubclass(cls, fxtp.FxtpError)


def test_no_process_group(llama):
    assert not dist.is_initialized()
    with pytest.raises(fxtp.ProcessGroupError, match="init_process_group"):
        fxtp.transform(llama, 2)


def test_world_size_below_one(llama):
    with pytest.raises(fxtp.FxtpError, match=">= 1"):
        fxtp.plan(llama, 0)


def test_a_bad_world_size_is_one_error_class_wherever_it_is_given(llama):
    """fxtp.plan raised PlanOverrideError and fxtp.transform ProcessGroupError for the same
    mistake: WorldSizeError is both, so either `except` still catches it."""
    assert issubclass(fxtp.WorldSizeError, fxtp.PlanOverrideError)
    assert issubclass(fxtp.WorldSizeError, fxtp.ProcessGroupError)
    for call in (lambda: fxtp.plan(llama, 0), lambda: fxtp.transform(llama, 0),
                 lambda: fxtp.transform(llama, 2.0), lambda: fxtp.plan(llama, "2")):
        with pytest.raises(fxtp.WorldSizeError, match="world_size must be"):
            call()


def test_world_size_mismatch(llama, plans):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        with pytest.raises(fxtp.WorldSizeMismatchError, match="world_size=2 but the process group has 1"):
            fxtp.transform(llama, 2)
        # the matching size works inside the group
        tp = fxtp.transform(llama, 1, plan=plans[1])
        assert tp.meta["fxtp"].group_name == dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def test_capture_failure_names_the_code():
    with pytest.raises(fxtp.CaptureError, match=r"DataDependent.*if x\.sum\(\) > 0"):
        fxtp.plan(DataDependent(), 2, example_inputs=(torch.randn(2, 4),))


def test_non_hf_model_needs_example_inputs():
    with pytest.raises(fxtp.CaptureError, match="example_inputs"):
        fxtp.plan(PlainMLP(), 2)


def test_override_of_unknown_module(llama, plans):
    plan = plans[2]
    with pytest.raises(fxtp.PlanOverrideError, match=r"model\.layers\.9\.mlp.*not in the model"):
        plan.override({"model.layers.9.mlp": "replicate"})
    with pytest.raises(fxtp.PlanOverrideError, match="Did you mean"):
        plan.override({"model.layers.0.mpl": "replicate"})


def test_override_with_unsupported_choice(llama, plans):
    with pytest.raises(fxtp.PlanOverrideError, match="supported: replicate, shard"):
        plans[2].override({"model.layers.0.mlp": "column"})


def test_override_that_would_be_wrong_is_refused():
    from .modules import ReducesFeatures

    plan = fxtp.plan(ReducesFeatures(), 2, example_inputs=(torch.randn(2, 3, 16),))
    # sharding fc would split the dim that sum(-1) reduces over
    with pytest.raises(fxtp.PlanOverrideError, match=r"'fc'.*reduces over a sharded dim"):
        plan.override({"fc": "shard"})


def test_shard_override_of_a_shardable_module_is_accepted(llama, plans):
    plan = plans[2].override({"model.layers.0.self_attn": "shard"})
    assert plan.placement_of("model.layers.0.self_attn.o_proj") == "row"
    with pytest.raises(fxtp.PlanOverrideError, match="no linear layer"):
        plans[2].override({"model.norm": "shard"})
    with pytest.raises(fxtp.PlanOverrideError, match="lm_head.*cannot be sharded safely"):
        plans[2].override({"lm_head": "shard"})


def test_plan_for_other_world_size_is_refused(llama, plans):
    plan = plans[2]
    with pytest.raises(fxtp.PlanOverrideError, match="world_size=2, not 1"):
        fxtp.transform(llama, 1, plan=plan)


def test_heads_not_divisible_give_uneven_shards_in_the_plan():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    plan = fxtp.plan(model, 3)
    assert not plan.not_divisible
    q = next(e for e in plan.entries if e.module == "model.layers.0.self_attn.q_proj")
    assert q.placement == "column" and "uneven: rank sizes [32, 16, 16]" in q.shard
    mlp = next(e for e in plan.entries if e.module == "model.layers.0.mlp.down_proj")
    assert mlp.placement == "row" and "[43, 43, 42]" in mlp.shard
    assert plan.all_reduces == {"model.layers.0": 2, "model.layers.1": 2}


def test_indivisible_structure_reported_by_plan():
    plan = fxtp.plan(TwoHeadSizes().eval(), 2, example_inputs=(torch.randn(2, 5, 24),))
    assert plan.not_divisible, "heads of 8 and of 12 in one projection cannot both be whole"
    assert all(e.placement == "replicate" for e in plan.entries)
    why = plan.replicated["proj"]
    # the reason says what meets: heads of 12 over features an earlier view cut in heads of 8
    assert "views 24 features as 2 heads of 12" in why and "units of 8" in why
    assert "blocks of 24 features, 1 of them, fewer than the 2 ranks" in why
    assert "no world_size above 1 splits it into whole heads" in why


def test_not_divisible_reasons_name_the_groups_and_a_world_size_that_works():
    """The reason a view gives when no split into whole heads fits: its fused groups with their
    head counts, the group at fault, and the world sizes that would split it."""
    one = DimShard(splits=(ChunkSplit(64, 4), ChunkSplit(24, 4), ChunkSplit(16, 4)))
    assert why_not_whole_heads(one, 16, 6) == (
        "views 104 features as 6 heads of 16, in groups of 4, 1.5, 1 heads: the group of "
        "features 64-88 is not whole heads; no world_size above 1 splits it into whole heads")
    lone = DimShard(4, 1, (48,))
    assert why_not_whole_heads(lone, 16, 3) == (
        "views 48 features as 3 heads of 16: they are 3 head(s), fewer than the 4 ranks; a "
        "world_size from 2 to 3 splits it into whole heads")
    # single heads beside the others are held whole: only the 4 q heads limit the world size
    mqa = DimShard(splits=(ChunkSplit(64, 8), ChunkSplit(16, 8), ChunkSplit(16, 8)))
    assert why_not_whole_heads(mqa, 16, 6).endswith("a world_size from 2 to 4 splits it into "
                                                     "whole heads")
    # a column source's features cut in whole units (the reason a doomed split gives)
    assert ranks_that_fit(2, "units") == "world_size 2 splits it into whole units"
    assert ranks_that_fit(1, "units") == "no world_size above 1 splits it into whole units"


def test_unknown_input_names_the_accepted_ones(llama, plans):
    tp = fxtp.transform(llama, 1, plan=plans[1])
    ids = torch.randint(0, 128, (1, 4))
    with pytest.raises(fxtp.InputError, match="input_ids"):
        tp(input_ids=ids, pixel_values=ids)
    # omitted inputs the capture fixed are filled in like the model would
    out = tp(input_ids=ids)
    with torch.no_grad():
        ref = llama(input_ids=ids)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)


def test_training_a_model_with_dropout_is_a_named_error():
    tp = fxtp.transform(tiny_model("gpt2"), 1)       # GPT-2's default config has dropout 0.1
    assert not tp.training                            # transform returns it in eval mode
    with pytest.raises(fxtp.DropoutError, match=r"transformer\.drop.*disable_dropout=True"):
        tp.train()
    assert not tp.training
    assert fxtp.for_training(tp, disable_dropout=True) is tp and tp.training
    assert tp.eval() is tp and not tp.training


def test_training_at_world_size_one_gives_the_model_gradients(llama, plans):
    tp = fxtp.transform(llama, 1, plan=plans[1])
    assert tp.train() is tp and tp.training
    ids = torch.arange(10).view(2, 5)
    for m in (llama, tp):
        m.zero_grad()
        m(input_ids=ids).logits.square().mean().backward()
    full = dict(llama.named_parameters())
    for name, p in tp.named_parameters():
        assert torch.allclose(p.grad, full[name].grad, atol=1e-6), name


def test_fold_lora_without_adapters_names_the_model(llama, plans):
    tp = fxtp.transform(llama, 1, plan=plans[1])
    with pytest.raises(fxtp.NoLoraError, match="no LoRA branch found .*LlamaForCausalLM"):
        fxtp.fold_lora(tp)
    with pytest.raises(fxtp.LoraStateError, match="not folded"):
        fxtp.unfold_lora(tp)


def test_an_fxtp_error_in_a_rank_is_raised_again_as_itself():
    from fxtp.testing.ranks import run_ranks

    from .rank_workers import raise_deliberately

    with pytest.raises(fxtp.NotDivisibleError, match=r"^rank 0: proj: 3 heads on 1 ranks"):
        run_ranks(raise_deliberately, 1, timeout=120)


def test_ranks_see_the_callers_environment_and_directory_of_now(tmp_path, monkeypatch):
    """Ranks fork from a forkserver started earlier; each still gets the caller's current
    environment and working directory, as a spawned process would."""
    from fxtp.testing.ranks import run_ranks

    from .rank_workers import environment_and_directory

    run_ranks(environment_and_directory, 1, timeout=120)     # the forkserver is running now
    monkeypatch.setenv("FXTP_TEST_SETTING", "set after the forkserver started")
    monkeypatch.chdir(tmp_path)
    for setting, cwd in run_ranks(environment_and_directory, 2, timeout=120):
        assert setting == "set after the forkserver started"
        assert cwd == str(tmp_path)


def test_verify_of_a_plain_module_without_a_strategy_is_refused_before_any_rank_starts():
    with pytest.raises(fxtp.InputError, match="strategy_factory=.*tensor_inputs"):
        fxtp.verify(torch.nn.Linear(4, 4), 2, timeout=5)


def test_a_submodule_that_fixes_the_sequence_length_is_an_opaque_call():
    """Mamba's slow path loops over the positions in Python, so torch.export would keep the
    example's sequence length: each mixer is called whole instead, and the plan names the
    line."""
    from fxtp.testing.families import family_model

    plan = fxtp.plan(family_model("mamba"), 2)
    assert list(plan.opaque) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    why = plan.opaque["backbone.layers.0.mixer"]
    assert "fixed the batch or sequence size" in why
    assert "modeling_mamba.py" in why and "for index in range(seq_len)" in why


def test_an_opaque_part_of_a_weightless_model_is_a_named_capture_error():
    """An opaque part's shapes come from an eager run of the model, which a model without
    values (built on meta; fxtp's weightless copy, faked on a device, for a size graph)
    cannot do: a CaptureError that says so, never a part that runs on fake state."""
    from .modules import structure

    model, inputs = structure("looped_experts")
    with pytest.raises(fxtp.CaptureError, match=r"moe of AttentionThenLoopedExperts.*eager "
                                                r"run of the model with its weights"):
        fxtp.plan(model.to("meta"), 2, example_inputs=(inputs[0].to("meta"),))


def test_a_size_fixed_by_the_model_itself_is_refused_naming_the_line():
    """The loop is in the model's own forward: nothing smaller to call whole, so the capture
    fails at transform time, naming the line, instead of a graph failing on the next length."""
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    class LoopConfig(PretrainedConfig):
        model_type = "fxtp_loop_test"

    class Looping(PreTrainedModel):
        config_class = LoopConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            steps = [h[:, i] for i in range(input_ids.shape[1])]
            return self.head(torch.stack(steps, 1).cumsum(1))

    with pytest.raises(fxtp.CaptureError) as info:
        fxtp.plan(Looping(LoopConfig(vocab_size=16)), 2)
    text = str(info.value)
    assert "fixed the sequence length to 8 (input_ids dim 1)" in text
    assert "for i in range(input_ids.shape[1])" in text and "test_errors.py" in text


class _Windowed(torch.nn.Module):
    """Longer inputs keep their last 4 positions, much longer ones their last 2."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[1] > 4:
            x = x[:, -4:]
            if x.shape[1] > 8:             # never true: a condition that is always met
                x = x[:, -2:]
        if x.shape[0] > 3:                 # large batches skip the bias
            return x @ self.fc.weight.T
        return self.fc(x)


def test_a_size_condition_the_capture_recorded_gets_a_graph_of_its_own():
    """The model takes another path for short inputs: the capture records the condition (in
    the plan), and a call that breaks it runs a graph captured for its sizes, on tp's own
    weights (trained ones too), kept for later calls of that kind."""
    model = _Windowed().eval()
    tp = fxtp.transform(model, 1, example_inputs=(torch.randn(2, 6, 8),))
    plan = tp.meta["fxtp"].plan      # listed at transform time, as torch words it
    assert "x.size()[1] > 4" in plan.conditions and "x.size()[2] == 8" not in plan.conditions
    text = " ".join(str(plan).split())
    assert "a graph of its own" in text and "x.size()[1] > 4" in text
    assert fxtp.Plan.from_json(plan.to_json()).conditions == plan.conditions
    x = torch.randn(3, 9, 8)
    assert torch.allclose(tp(x), model(x)) and not tp.size_graphs.graphs
    short = torch.randn(2, 3, 8)
    assert torch.allclose(tp(short), model(short))
    graph = tp.size_graphs.graphs[0][0]
    assert graph.fc.weight is tp.fc.weight and tp.size_graphs.built == ["[2, 3, 8]"]
    with torch.no_grad():            # tp's weights change: the other graph computes with them
        tp.fc.weight.mul_(2)
        model.fc.weight.mul_(2)
    shorter = torch.randn(1, 2, 8)
    assert torch.allclose(tp(shorter), model(shorter))
    assert torch.allclose(tp(short), model(short)) and len(tp.size_graphs.graphs) == 1
    assert "1 of at most 4" in repr(tp.size_graphs)


def test_size_graphs_are_bounded_and_refused_while_lora_is_folded(monkeypatch):
    import fxtp.size_graphs as size_graphs

    model = _Windowed().eval()
    tp = fxtp.transform(model, 1, example_inputs=(torch.randn(2, 6, 8),))
    monkeypatch.setattr(size_graphs, "is_folded", lambda tp: True)
    with pytest.raises(fxtp.InputError, match="condition the capture recorded.*unfold_lora"):
        tp(torch.randn(2, 3, 8))
    assert not tp.size_graphs.graphs                          # the failed call built nothing
    monkeypatch.undo()
    monkeypatch.setattr(size_graphs, "MAX_GRAPHS", 1)
    short = torch.randn(2, 3, 8)
    assert torch.allclose(tp(short), model(short))            # the one graph kept
    big = torch.randn(5, 6, 8)                                # a large batch: another path
    with pytest.warns(UserWarning, match=r"1 graphs for other input sizes are kept.*the least "
                                         r"recently used one \(built for \[2, 3, 8\]\) is "
                                         r"dropped for \[5, 6, 8\]"):
        assert torch.allclose(tp(big), model(big))
    assert tp.size_graphs.built == ["[5, 6, 8]"]


def test_a_size_graph_for_a_batch_of_one_is_for_that_batch_only():
    """torch.export fixes a size of 1. The graph for a short batch of 1 keeps it fixed, and
    its guards refuse other batches: a graph captured at batch 2 would serve a batch of 1 too,
    but not the path the model's code takes for 1 only (a silent wrong answer)."""
    class BatchOfOne(_Windowed):
        def forward(self, x):
            if x.shape[0] == 1 and x.shape[1] <= 4:
                return self.fc(x) * 2
            return super().forward(x)

    model = BatchOfOne().eval()
    tp = fxtp.transform(model, 1, example_inputs=(torch.randn(2, 6, 8),))
    for b in (1, 2, 1, 3):
        x = torch.randn(b, 3, 8)
        assert torch.allclose(tp(x), model(x)), b
    assert tp.size_graphs.built == ["[1, 3, 8]", "[2, 3, 8]"]


def test_a_size_graph_takes_the_device_branch_of_tp_s_device():
    """The skeleton is captured as fake tensors on tp's device, not as meta tensors: model code
    that branches on the device takes the side it takes at run time (DeepSeek-V4 counts with an
    int32 histc off the CPU, which the CPU lacks)."""
    class OffCpuPath(_Windowed):
        def forward(self, x):
            if x.shape[1] <= 4 and x.device.type != "cpu":
                return self.fc(x) * 3
            return super().forward(x)

    model = OffCpuPath().eval()
    tp = fxtp.transform(model, 1, example_inputs=(torch.randn(2, 6, 8),))
    x = torch.randn(2, 3, 8)
    assert torch.allclose(tp(x), model(x)) and len(tp.size_graphs.graphs) == 1
    skel = tp.meta["fxtp"].skeleton                 # left as it was
    assert {t.device.type for t in skel.parameters()} == {"meta"}
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in skel.parameters())
