"""Code that runs inside each spawned gloo rank (importable, so `spawn` can pickle it).

One spawn per world size runs every case and returns plain data; the tests assert on it. No
assertion is raised inside a rank (that could leave the other ranks waiting in a collective).
"""
from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

import fxtp
from fxtp.planning.plan import OUTSIDE_LAYERS, layer_of
from fxtp.runtime.collectives import all_gather_dim0, all_reduce_sum
from fxtp.testing.checks import check_equivalence, check_gradients
from fxtp.testing.strategies import hf_inputs, tensor_inputs

HF_CASES = ("llama", "gpt2", "bert", "llama_mqa")
FAMILY_EXAMPLES = 5   # per family and world size
EXAMPLES = 8
SECONDS = "_seconds"    # results key: each case's wall time on this rank


def world_sizes(names: tuple, at_4: tuple) -> list[tuple[int, str]]:
    """(world size, name) pairs for parametrizing: world 2 for every name, world 4 for those
    in `at_4` (the cases whose layout at 4 differs from 2's; 4 ranks share 2 cores here)."""
    return [(ws, n) for n in names for ws in (2, 4) if ws == 2 or n in at_4]


def _all_reduce_nodes(tp) -> list:
    return [n for n in tp.graph.nodes if n.op == "call_function" and n.target is all_reduce_sum]


def _graph_facts(model, tp) -> dict[str, Any]:
    """All-reduce placement and parameter sizes, measured on the rewritten module."""
    ars = _all_reduce_nodes(tp)
    per_layer: dict[str, int] = {}
    producers = []
    for n in ars:
        from fxtp.capture.linear import module_path

        src = n.args[0]
        layer = layer_of(module_path(src)) or OUTSIDE_LAYERS
        per_layer[layer] = per_layer.get(layer, 0) + 1
        # walk back through the ops a partial sum may flow through to the producing linear
        linears = tp.meta["fxtp"].plan.solution.linears
        while src.op == "call_function" and src.name not in linears and src.all_input_nodes:
            src = src.all_input_nodes[0]
        producers.append(linears[src.name].weight if src.name in linears else str(src))
    full = dict(model.named_parameters(remove_duplicate=False))
    local = dict(tp.named_parameters(remove_duplicate=False))
    layer_full = sum(p.numel() for k, p in full.items() if layer_of(k))
    layer_local = sum(local[k].numel() for k in full if layer_of(k) and k in local)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    held = sum(p.numel() * p.element_size() for p in tp.parameters())   # a tied tensor once
    return {
        "param_bytes": (held, tp.meta["fxtp"].plan.local_param_bytes[rank]),
        "all_reduces": len(ars),
        "all_reduces_per_layer": per_layer,
        "all_reduce_producers": producers,
        "param_names_kept": sorted(full) == sorted(local),
        "missing_params": sorted(set(full) - set(local)),
        "layer_param_fraction": layer_local / layer_full if layer_full else 1.0,
        "local_shapes": {k: tuple(v.shape) for k, v in local.items()},
    }


def _fingerprint(tp, inputs) -> list[float]:
    with torch.no_grad():
        out = tp(**inputs) if isinstance(inputs, dict) else tp(*inputs)
    from fxtp.testing.checks import flatten_tensors

    return [float(t.double().sum()) for _, t in flatten_tensors(out)]


_PLANNED: dict[tuple, tuple] = {}


def planned(name: str, ws: int) -> tuple[Any, "fxtp.Plan"]:
    """A tiny HF model and its plan, captured once per rank process: the cases that transform
    the same model share the capture (the slow step; transform copies the captured graph, and
    `replan`/`override` derive other plans from it)."""
    from fxtp.testing.models import tiny_model

    if name not in _PLANNED:
        model = tiny_model("llama", num_key_value_heads=1) if name == "llama_mqa" else tiny_model(name)
        _PLANNED[name] = (model, fxtp.plan(model, ws))
    model, plan = _PLANNED[name]
    return model, plan if plan.world_size == ws else plan.replan(ws)


def _run_case(name: str, rank: int, ws: int) -> dict[str, Any]:
    from .modules import tiny_net

    if name in HF_CASES:
        model, plan = planned(name, ws)
        tp = fxtp.transform(model, ws, plan=plan)
        strategy = hf_inputs(model.config.vocab_size)
        probe = {"input_ids": torch.arange(12).view(2, 6) % model.config.vocab_size}
    elif name == "tinynet":
        model = tiny_net()
        tp = fxtp.transform(model, ws, example_inputs=(torch.randn(2, 5, 32),))
        strategy = tensor_inputs([(2, 5, 32)], dynamic_dims=(0, 1))
        probe = (torch.linspace(-1, 1, 2 * 3 * 32).view(2, 3, 32),)
    else:
        raise KeyError(name)
    report = check_equivalence(model, tp, strategy, max_examples=EXAMPLES)
    probe_out_type = None
    if isinstance(probe, dict):
        with torch.no_grad():
            probe_out_type = (type(model(**probe)).__name__, type(tp(**probe)).__name__)
    plan = tp.meta["fxtp"].plan
    return {
        "examples": report.examples,
        "max_error": report.max_error,
        "worst_input": report.worst_input,
        "fingerprint": _fingerprint(tp, probe),
        "output_types": probe_out_type,
        "placements": {e.module: e.placement for e in plan.entries},
        "plan_all_reduces": dict(plan.all_reduces),
        "explain_all_reduces": fxtp.explain(tp).all_reduces,
        "explain_text": str(fxtp.explain(tp)),
        "diff_adds_all_reduce": "+%all_reduce_sum" in fxtp.diff(tp),
        "dot": _drawing(tp, name),
        **_graph_facts(model, tp),
    }


def _drawing(tp, name: str) -> str:
    """fxtp.draw's .dot text of GPT-2's second layer on this rank (needs no Graphviz)."""
    import os
    import tempfile

    if name != "gpt2":
        return ""
    with tempfile.TemporaryDirectory() as d:
        path = fxtp.draw(tp, os.path.join(d, "tp.dot"), "transformer.h.1")
        with open(path) as f:
            return f.read()


def _uneven_case(ws: int) -> dict[str, Any]:
    """3 heads on 2 or 4 ranks: uneven shards (2+1 heads; on 4 ranks the 3 heads are kept
    whole and o_proj narrows them), equal outputs; an override still keeps attention
    replicated."""
    from .modules import tiny_net

    model = tiny_net(dim=24, heads=3, hidden=48)
    x = (torch.randn(2, 5, 24),)
    strategy = tensor_inputs([(2, 5, 24)], dynamic_dims=(0, 1))
    plan = fxtp.plan(model, ws, example_inputs=x)
    tp = fxtp.transform(model, ws, plan=plan, example_inputs=x)
    rep = check_equivalence(model, tp, strategy, max_examples=4)
    out: dict[str, Any] = {
        "max_error": rep.worst, "all_reduces": len(_all_reduce_nodes(tp)),
        "shards": {e.module: e.shard for e in plan.entries},
        "placements": {e.module: e.placement for e in plan.entries},
        "q_local_rows": tuple(tp.get_parameter("blocks.0.attn.q.weight").shape),
    }
    plan = plan.override({"blocks.0.attn": "replicate", "blocks.1.attn": "replicate"})
    tp = fxtp.transform(model, ws, plan=plan, example_inputs=x)
    rep = check_equivalence(model, tp, strategy, max_examples=4)
    out["override_max_error"] = rep.worst
    out["override_all_reduces"] = len(_all_reduce_nodes(tp))
    out["override_placements"] = {e.module: e.placement for e in plan.entries}
    return out


def _not_divisible_case(ws: int) -> dict[str, Any]:
    """A projection read as heads of two sizes: a named error, then an override works."""
    from .modules import TwoHeadSizes

    torch.manual_seed(0)
    model = TwoHeadSizes().eval()
    x = (torch.randn(2, 5, 24),)
    out: dict[str, Any] = {}
    try:
        fxtp.transform(model, ws, example_inputs=x)
        out["error"] = None
    except fxtp.FxtpError as e:
        out["error"] = (type(e).__name__, str(e))
    plan = fxtp.plan(model, ws, example_inputs=x).override({"proj": "replicate"})
    tp = fxtp.transform(model, ws, plan=plan, example_inputs=x)
    rep = check_equivalence(model, tp, tensor_inputs([(2, 5, 24)], dynamic_dims=(0, 1)),
                            max_examples=4)
    out["override_max_error"] = rep.worst
    out["override_placements"] = {e.module: e.placement for e in plan.entries}
    return out


def _override_case(ws: int) -> dict[str, Any]:
    """A user keeps one MLP replicated: one all-reduce fewer in that layer, same outputs."""
    model, plan = planned("llama", ws)
    plan = plan.override({"model.layers.0.mlp": "replicate"})
    tp = fxtp.transform(model, ws, plan=plan)
    rep = check_equivalence(model, tp, hf_inputs(model.config.vocab_size), max_examples=4)
    return {"max_error": rep.worst, **_graph_facts(model, tp),
            "placements": {e.module: e.placement for e in plan.entries}}


def _vocab_case(name: str, ws: int) -> dict[str, Any]:
    """vocab_parallel=True: embedding rows split (masked lookup), lm_head column-parallel with
    its logits all-gathered; tied tables stay tied."""
    from fxtp.testing.families import family_model

    if name == "llama_tied":
        model = family_model("llama_tied")
        tp = fxtp.transform(model, ws, vocab_parallel=True)
    else:
        model, plan = planned(name, ws)
        tp = fxtp.transform(model, ws, plan=plan.replan(vocab_parallel=True))
    rep = check_equivalence(model, tp, hf_inputs(model.config.vocab_size), max_examples=5)
    plan = tp.meta["fxtp"].plan
    gathers = [n for n in tp.graph.nodes if n.op == "call_function" and n.target is all_gather_dim0]
    return {"max_error": rep.worst, "all_gathers": len(gathers),
            "plan_all_reduces": dict(plan.all_reduces),
            "param_placements": {e.parameter: e.placement for e in plan.entries},
            "param_count": len(list(tp.parameters())), "model_param_count": len(list(model.parameters())),
            **_graph_facts(model, tp)}


def _structures_case(ws: int) -> dict[str, Any]:
    """Every hand-built structure of tests/modules.py, compared on drawn shapes and values."""
    from .modules import STRUCTURES, structure

    out = {}
    for name, (_, shapes) in STRUCTURES.items():
        model, inputs = structure(name)
        tp = fxtp.transform(model, ws, example_inputs=inputs)
        rep = check_equivalence(model, tp, tensor_inputs(shapes, dynamic_dims=(0, 1)),
                                max_examples=4)
        out[name] = {"max_error": rep.worst, "all_reduces": len(_all_reduce_nodes(tp))}
        if name in ("looped_experts", "ssm_one_group", "torch_norms", "head_split_multi_query"):
            # the opaque experts train (their backward runs again), and so does the mixer
            # (the conv's cut weight, the einsums, the statistic's all-reduce in backward)
            grads = check_gradients(model, tp, tensor_inputs(shapes, dynamic_dims=(0, 1)),
                                    max_examples=3, loss_fn=lambda y, _: y.pow(2).mean())
            out[name].update(grad_error=grads.max_error, grads_compared=grads.compared,
                             grads_missing=grads.missing)
        if name == "torch_norms":
            out[name].update(_bf16_errors(name, ws))
        if name == "windowed_attention":
            out[name].update(_short_inputs(model, tp))
    return out


def _short_inputs(model, tp) -> dict[str, Any]:
    """Inputs shorter than the window break the capture's size condition: they run a graph
    built for them (`tp.size_graphs`) on tp's own shards, forward and backward."""
    from hypothesis import strategies as st

    short = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        error = float((model(short) - tp(short)).abs().max())
    graph = tp.size_graphs.graphs[-1][0]          # the most recently used: this call's
    grads = check_gradients(model, tp, st.just((short,)), max_examples=1,
                            loss_fn=lambda y, _: y.pow(2).mean())
    return {"short_error": error, "short_grad_error": grads.max_error,
            "short_grads_compared": grads.compared, "size_graphs": len(tp.size_graphs.graphs),
            "short_all_reduces": len(_all_reduce_nodes(graph)),
            "shards_shared": all(p is graph.get_parameter(n) for n, p in tp.named_parameters())}


def _bf16_errors(name: str, ws: int) -> dict[str, float]:
    """The bf16 model's error from the fp32 one, untouched and transformed: the statistics
    and affines run in fp32 as in torch's norms, so the transform adds no error of its own."""
    from .modules import structure

    full, inputs = structure(name)
    model = structure(name)[0].to(torch.bfloat16)
    tp = fxtp.transform(model, ws, example_inputs=(inputs[0].bfloat16(),))
    x = torch.randn(3, 7, inputs[0].shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full(x)
        x = x.bfloat16()
        return {"bf16_error": float((tp(x).float() - ref).abs().max()),
                "bf16_untouched_error": float((model(x).float() - ref).abs().max())}


def _compile_case(name: str, ws: int) -> dict[str, Any]:
    """torch.compile(fullgraph=True) on the TP graph: one graph for every batch/sequence size
    (a counting backend records each compilation), same outputs as the eager TP graph."""
    from .compile_workers import compile_counts, forward_calls, hf_ids

    model, plan = planned(name, ws)
    return compile_counts(fxtp.transform(model, ws, plan=plan), forward_calls(hf_ids(model)))


def run_all(rank: int, world_size: int) -> dict[str, Any]:
    """Every multi-rank case at this world size; exceptions are returned as text per case."""
    cases = {name: (lambda n=name: _run_case(n, rank, world_size)) for name in HF_CASES + ("tinynet",)}
    if world_size > 1:
        cases["not_divisible"] = lambda: _not_divisible_case(world_size)
        cases["uneven"] = lambda: _uneven_case(world_size)
        cases["override"] = lambda: _override_case(world_size)
        cases["vocab_llama_tied"] = lambda: _vocab_case("llama_tied", world_size)
        cases["vocab_gpt2"] = lambda: _vocab_case("gpt2", world_size)
        cases["structures"] = lambda: _structures_case(world_size)
        cases["compile_llama"] = lambda: _compile_case("llama", world_size)
        if world_size == 2:     # at world 4 Llama's (kv heads held by pairs of ranks) only
            cases["compile_gpt2"] = lambda: _compile_case("gpt2", world_size)
        from .sequence_workers import cases as sequence_cases
        from .train_workers import cases as training_cases

        cases.update(training_cases(world_size))
        cases.update(sequence_cases(world_size))
    return _run_timed(cases)


def _run_timed(cases: dict) -> dict[str, Any]:
    """Runs each case, its exception returned as text; `SECONDS` holds each case's wall time
    (to see where the suite's time goes: `tests/case_times.py`)."""
    import time

    results: dict[str, Any] = {SECONDS: {}}
    for name, fn in cases.items():
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"exception": traceback.format_exc()}
        results[SECONDS][name] = time.perf_counter() - start
    return results


def _family_case(name: str, ws: int, compile_check: bool, turn: int = 0) -> dict[str, Any]:
    from fxtp.testing.families import family_model
    from fxtp.testing.strategies import hf_inputs_for

    from .compile_workers import compile_counts, forward_calls, hf_ids

    model = family_model(name)
    tp = fxtp.transform(model, ws)
    report = check_equivalence(model, tp, hf_inputs_for(model, max_seq=16), max_examples=FAMILY_EXAMPLES)
    plan = tp.meta["fxtp"].plan
    compiled = {}
    if compile_check:
        calls = forward_calls(hf_ids(model))
        uneven = len(set(plan.local_param_bytes)) > 1      # the ranks' graphs differ
        compiled = compile_counts(tp, calls, compile=uneven or dist.get_rank() == turn)
    return {
        **compiled,
        **_other_size(model, tp),
        "examples": report.examples,
        "max_error": report.max_error,
        "worst_input": report.worst_input,
        "placements": {e.module: e.placement for e in plan.entries},
        "param_placements": {e.parameter: e.placement for e in plan.entries},
        "replicated": dict(plan.replicated),
        "opaque": dict(plan.opaque),
        "plan_all_reduces": dict(plan.all_reduces),
        "linear_fraction": plan.param_fraction(),
        "local_param_bytes": list(plan.local_param_bytes),
        "shards": {e.module: e.shard for e in plan.entries},
        "outer_narrows": sum(1 for n in tp.graph.nodes if n.target == torch.ops.aten.unflatten.int),
        **_graph_facts(model, tp),
    }


def _other_size(model, tp) -> dict[str, Any]:
    """A family whose capture holds for some lengths only (Bamba's scan: lengths that do not
    fill its chunks of 32) is called at 32 tokens, past the drawn lengths: a call that breaks
    a condition runs a graph of its own (`tp.size_graphs`)."""
    from .compile_workers import hf_ids

    if getattr(tp, "size_graphs", None) is None:
        return {}
    inputs = hf_ids(model)(2, 32)
    with torch.no_grad():
        error = (model(**inputs).logits - tp(**inputs).logits).abs().max()
    return {"other_size_error": float(error), "size_graphs": len(tp.size_graphs.graphs),
            "conditions": list(tp.meta["fxtp"].plan.conditions)}


def run_families(rank: int, world_size: int, names: tuple, compile_check: bool = False
                 ) -> dict[str, Any]:
    """Every family case at this world size (one spawn); exceptions returned as text.
    `compile_check`: also run each TP graph under torch.compile(fullgraph=True)."""
    return _run_timed({name: (lambda n=name, i=i: _family_case(n, world_size, compile_check,
                                                              i % world_size))
                       for i, name in enumerate(names)})


def raise_deliberately(rank: int, world_size: int) -> None:
    """A rank that raises an fxtp error, as transform does for a model it cannot shard."""
    raise fxtp.NotDivisibleError(f"proj: 3 heads on {world_size} ranks (test)")


def environment_and_directory(rank: int, world_size: int) -> tuple:
    import os

    return os.environ.get("FXTP_TEST_SETTING"), os.getcwd()
