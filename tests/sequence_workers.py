"""Sequence parallelism cases run inside the spawned gloo ranks of tests/test_multirank.py (the
same spawn): outputs, gradients and SGD steps against the untouched model, the collectives in
the graph, the activations saved for backward, torch.compile, and tp.generate."""
from __future__ import annotations

from typing import Any

import torch

import fxtp
from fxtp.runtime.collectives import all_reduce_sum, sum_grads_over_ranks
from fxtp.runtime.sequence import all_gather_seq, reduce_scatter_seq, scatter_seq
from fxtp.testing.checks import check_equivalence, check_gradients
from fxtp.testing.memory import saved_activation_bytes
from fxtp.testing.strategies import hf_inputs

from .train_workers import _transform, optimizer_case, train_model

NAMES = ("llama", "gpt2")


def _counts(tp) -> dict[str, int]:
    targets = [n.target for n in tp.graph.nodes if n.op == "call_function"]
    return {"all_reduce": targets.count(all_reduce_sum),
            "reduce_scatter": targets.count(reduce_scatter_seq),
            "all_gather": targets.count(all_gather_seq), "scatter": targets.count(scatter_seq)}


def _width_bytes(tp, ids: torch.Tensor, width: int) -> dict[int, int]:
    """Bytes of hidden-width activations one training forward saves (then its backward), by
    their token counts."""
    got = saved_activation_bytes(tp, lambda: tp(input_ids=ids).logits, width)
    got["output"].float().pow(2).mean().backward()
    tp.zero_grad(set_to_none=True)
    return got["width_by_tokens"]


def _checkpointed_grad_error(model, tp, ids: torch.Tensor) -> float:
    """Gradients of `tp` run under activation checkpointing (its own saved-tensor hooks, on
    top of which fxtp's regather steps aside) against the model's."""
    from torch.utils.checkpoint import checkpoint

    from fxtp.testing.checks import local_slice

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    model.zero_grad(set_to_none=True)
    tp.zero_grad(set_to_none=True)
    loss(model(input_ids=ids).logits).backward()
    loss(checkpoint(lambda i: tp(input_ids=i).logits, ids, use_reentrant=False)).backward()
    full = dict(model.named_parameters())
    return max(float((p.grad - local_slice(tp, n, full[n].grad)).abs().max())
               for n, p in tp.named_parameters())


def _saved_whole(model, tp, strategy, ids_for) -> dict[str, Any]:
    """fxtp.for_training(tp, regather=False): the gathered inputs saved whole (more bytes of
    hidden width kept), gradients unchanged; then back to the default."""
    ids = (torch.arange(2 * 24).view(2, 24) * 5) % ids_for.vocab_size
    fxtp.for_training(tp, regather=False)
    whole = _width_bytes(tp, ids, ids_for.hidden_size)
    grads = check_gradients(model, tp, strategy, max_examples=1)
    fxtp.for_training(tp, regather=True)
    return {"width_bytes": whole, "grad_error": grads.max_error,
            "state_after": tp.meta["fxtp"].state.regather}


def sequence_case(name: str, ws: int) -> dict[str, Any]:
    """Outputs on hypothesis inputs (sequences shorter than the ranks and not divisible by
    them included), gradients of every parameter, the graph's collectives, and the saved
    hidden-width activations against the all-reduce layout's."""
    model = train_model(name)
    tp = _transform(name, model, ws, sequence_parallel=True)
    strategy = hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12)
    eq = check_equivalence(model, tp, strategy, max_examples=6)
    lengths = {}          # shorter than the ranks, not divisible by them, divisible
    for length in (1, 3, 5, 8):
        ids = (torch.arange(2 * length).view(2, length) * 7 + length) % model.config.vocab_size
        with torch.no_grad():
            lengths[length] = float((tp(input_ids=ids).logits
                                     - model(input_ids=ids).logits).abs().max())
    tp.train()
    grads = check_gradients(model, tp, strategy, max_examples=3)
    checkpointed = _checkpointed_grad_error(
        model, tp, (torch.arange(2 * 7).view(2, 7) * 3) % model.config.vocab_size)
    plain = fxtp.for_training(_transform(name, model, ws))
    saved_whole = _saved_whole(model, tp, strategy, ids_for=model.config)
    ids = (torch.arange(2 * 24).view(2, 24) * 5) % model.config.vocab_size
    width = model.config.hidden_size
    info = tp.meta["fxtp"]
    from fxtp.inspection.draw import to_dot

    explained = str(fxtp.explain(tp))
    return {"explain_lines": {op: explained.count(f"  {op} ") for op in
                              ("all_reduce", "reduce_scatter", "all_gather", "scatter")},
            "explain_header": explained.splitlines()[2],
            "dot_sequence_ops": to_dot(tp).count("#d9c6f0"),
            "max_error": eq.worst, "examples": eq.examples,
            "length_errors": lengths,
            "grad_error": grads.max_error, "loss_error": grads.loss_error,
            "checkpointed_grad_error": checkpointed,
            "compared": grads.compared, "missing": grads.missing,
            "params": len([p for p in tp.parameters() if p.requires_grad]),
            "counts": _counts(tp), "plain_counts": _counts(plain),
            "width_bytes": (_width_bytes(tp, ids, width), _width_bytes(plain, ids, width)),
            "saved_whole": saved_whole,
            "tokens": ids.numel(),
            "sequence_nodes": len(info.sequence_nodes),
            "summed_together": [len(n.args) - 1 for n in tp.graph.nodes
                                if n.target is sum_grads_over_ranks],
            "plan_collectives": info.plan.sequence_collectives,
            "plan_all_reduces": info.plan.all_reduces}


def module_case(ws: int) -> dict[str, Any]:
    """Plain modules (no Hugging Face config): the sequence is their input's dim 1, drawn from
    1 to 6 tokens with the batch; outputs and gradients. PlainMLP holds its whole residual
    add as tokens; ParallelBlocks (two norms on one residual) the cheapest part of it."""
    from fxtp.testing.strategies import tensor_inputs

    from .modules import ParallelBlocks, PlainMLP

    out = {}
    for make in (PlainMLP, ParallelBlocks):
        torch.manual_seed(0)
        model = make()
        tp = fxtp.transform(model, ws, example_inputs=(torch.randn(2, 8, 16),),
                            sequence_parallel=True)
        strategy = tensor_inputs([(2, 8, 16)], dynamic_dims=(0, 1))
        eq = check_equivalence(model, tp, strategy, max_examples=6)
        grads = check_gradients(model, tp, strategy, max_examples=3,
                                loss_fn=lambda out, _inputs: out.pow(2).mean())
        out[make.__name__] = {"max_error": eq.worst, "grad_error": grads.max_error,
                              "compared": grads.compared,
                              "params": len(list(model.parameters())), "counts": _counts(tp)}
    out["WindowedAttention"] = _size_graph_case(ws)
    return out


def _size_graph_case(ws: int) -> dict[str, Any]:
    """A module whose code branches on the length (a window): a shorter input runs a graph
    built for its sizes, with sequence parallelism too."""
    from hypothesis import strategies as st

    from .modules_mixers import WindowedAttention

    torch.manual_seed(0)
    model = WindowedAttention()
    tp = fxtp.transform(model, ws, example_inputs=(torch.randn(2, 8, 32),),
                        sequence_parallel=True)
    long, short = (torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1)),
                   torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        errors = [float((model(x) - tp(x)).abs().max()) for x in (long, short)]
    grads = check_gradients(model, tp, st.just((short,)), max_examples=1,
                            loss_fn=lambda y, _: y.pow(2).mean())
    graph = tp.size_graphs.graphs[-1][0]
    return {"max_error": max(errors), "grad_error": grads.max_error, "compared": grads.compared,
            "params": len(list(model.parameters())), "counts": _counts(tp),
            "size_graph_counts": _counts(graph),
            "size_graph_sequence": graph.meta["fxtp"].plan.sequence_parallel}


def lora_case(ws: int) -> dict[str, Any]:
    """A PEFT LoRA Llama: A reads the gathered norm output beside the column-parallel base
    (through `rank0_grad`, its gradient counted once). Outputs, adapter gradients, and the
    fold for generation and back."""
    from .train_workers import lora_model

    model = lora_model("llama")
    tp = fxtp.transform(model, ws, sequence_parallel=True)
    strategy = hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12)
    out = {"max_error": check_equivalence(model, tp, strategy, max_examples=3).worst}
    tp.train()
    grads = check_gradients(model, tp, strategy, max_examples=2)
    out.update(grad_error=grads.max_error, compared=grads.compared, missing=grads.missing)
    fxtp.for_generation(tp)
    out["folded_error"] = check_equivalence(model, tp, strategy, max_examples=2).worst
    out["folded_adapters"] = not any("lora_" in str(n.target) for n in tp.graph.nodes
                                     if n.op == "get_attr")
    fxtp.for_training(tp)
    out["unfolded_error"] = check_equivalence(model, tp, strategy, max_examples=2).worst
    return out


def vocab_case(ws: int) -> dict[str, Any]:
    """With vocab_parallel=True: the embedding lookup's partial sum is reduce-scattered (no
    all-reduce, no scatter), the final norm's tokens are gathered for the column-parallel
    lm_head (its backward a reduce-scatter)."""
    model = train_model("llama")
    tp = _transform("llama", model, ws, vocab_parallel=True, sequence_parallel=True)
    strategy = hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12)
    eq = check_equivalence(model, tp, strategy, max_examples=4)
    tp.train()
    grads = check_gradients(model, tp, strategy, max_examples=2)
    gathers = [n.args[6] for n in tp.graph.nodes if n.target is all_gather_seq]
    return {"max_error": eq.worst, "grad_error": grads.max_error, "compared": grads.compared,
            "counts": _counts(tp), "gather_backwards": gathers,
            "plan_collectives": tp.meta["fxtp"].plan.sequence_collectives}


def compile_case(ws: int) -> dict[str, Any]:
    """The sequence-parallel Llama graph under torch.compile(fullgraph=True, dynamic=True):
    forward and backward (AOT autograd) at uneven sequence lengths, against eager."""
    from .compile_workers import backward_calls, compile_counts

    model = train_model("llama")
    tp = fxtp.for_training(_transform("llama", model, ws, sequence_parallel=True))
    return compile_counts(tp, backward_calls(model.config.vocab_size), backend="aot_eager")


def generate_case(ws: int) -> dict[str, Any]:
    """tp.generate of a sequence-parallel graph: its decode step has no sequence to split
    (built without it); greedy tokens equal model.generate's."""
    model = train_model("llama")
    tp = _transform("llama", model, ws, sequence_parallel=True)
    ids = (torch.arange(2 * 5).view(2, 5) * 3) % model.config.vocab_size
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    got = tp.generate(ids, max_new_tokens=4, do_sample=False)
    return {"equal": bool(torch.equal(want, got))}


def cases(ws: int) -> dict[str, Any]:
    out: dict[str, Any] = {f"sp_{n}": (lambda n=n: sequence_case(n, ws)) for n in NAMES}
    out["sp_sgd_llama"] = lambda: optimizer_case("llama", ws, "sgd", sequence_parallel=True)
    out["sp_sgd_gpt2"] = lambda: optimizer_case("gpt2", ws, "sgd", sequence_parallel=True)
    if ws == 2:
        out["sp_module"] = lambda: module_case(ws)
        out["sp_lora_llama"] = lambda: lora_case(ws)
        out["sp_vocab_llama"] = lambda: vocab_case(ws)
        out["sp_compile_llama"] = lambda: compile_case(ws)
        out["sp_generate_llama"] = lambda: generate_case(ws)
    return out
