"""Training cases run inside the spawned gloo ranks of tests/test_multirank.py (same spawn):
gradients through the tensor-parallel graph vs the untouched model, and optimizer steps."""
from __future__ import annotations

from typing import Any

import torch

import fxtp
from fxtp.testing.checks import check_gradients, local_slice
from fxtp.testing.strategies import hf_inputs

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def train_model(name: str, seed: int = 0):
    """A tiny model without dropout whose zero-initialised parameters (GPT-2's c_proj biases)
    are made random: a bias added twice or never would otherwise go unnoticed."""
    from fxtp.testing.models import tiny_model

    return _randomise_zeros(tiny_model(name, seed, **NO_DROPOUT.get(name, {})), seed)


def _randomise_zeros(model, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


_PLANS: dict[tuple, "fxtp.Plan"] = {}


def _transform(name: str, model, ws: int, vocab_parallel: bool = False,
               sequence_parallel: bool = False):
    """`fxtp.transform(model, ws)` with the plan captured from this rank process's first model
    of that name (the cases build the same seeded weights again: transform binds the plan's
    graph to this instance's tensors instead of capturing it again)."""
    if (name, ws) not in _PLANS:
        _PLANS[name, ws] = fxtp.plan(model, ws)
    plan = _PLANS[name, ws]
    if vocab_parallel or sequence_parallel:
        plan = plan.replan(vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel)
    return fxtp.transform(model, ws, plan=plan)


def grad_case(name: str, ws: int, vocab_parallel: bool = False, family: bool = False) -> dict[str, Any]:
    """Full fine-tuning: every local parameter's gradient vs the slice of the model's.
    `family`: a config of fxtp/testing/families.py (uneven shards, whole kv chunks, heads in batch)."""
    if family:
        from fxtp.testing.families import family_model

        model = _randomise_zeros(family_model(name), 0)
    else:
        model = train_model(name)
    tp = _transform(name, model, ws, vocab_parallel)
    tp.train()
    rep = check_gradients(model, tp, hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12),
                          max_examples=4)
    info = tp.meta["fxtp"]
    compiled = {}
    if ws == 2 and not family and not vocab_parallel:
        # the training graph under torch.compile: AOT autograd traces the backward too
        from .compile_workers import backward_calls, compile_counts

        compiled = compile_counts(tp, backward_calls(model.config.vocab_size), backend="aot_eager")
    return {**compiled,
            "max_error": rep.max_error, "loss_error": rep.loss_error, "worst": rep.worst_param,
            "examples": rep.examples, "compared": rep.compared, "missing": rep.missing,
            "min_grad_norm": rep.min_grad_norm,
            "params": len(dict(tp.named_parameters(remove_duplicate=False))),
            "grad_syncs": len(info.grad_sync_nodes), "training": tp.training}


LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


def lora_model(name: str, r: int = 8, seed: int = 0):
    """A PEFT LoRA model (adapters on attention and MLP linears, lora_dropout=0) whose B
    matrices are random, not PEFT's zeros, so the branch changes the outputs."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=LORA_TARGETS[name], lora_dropout=0.0,
                     fan_in_fan_out=name == "gpt2", task_type="CAUSAL_LM")
    model = get_peft_model(train_model(name, seed), cfg).eval()
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:       # test setup only: fxtp itself never reads names
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_case(name: str, ws: int) -> dict[str, Any]:
    """A PEFT model through fxtp.transform as it is: outputs, adapter-only gradients, and
    where the all-reduces are."""
    from fxtp.testing.checks import check_equivalence

    from .rank_workers import _graph_facts

    model = lora_model(name)
    tp = fxtp.transform(model, ws)
    eq = check_equivalence(model, tp, hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12),
                           max_examples=4)
    plan = tp.meta["fxtp"].plan
    tp.train()
    rep = check_gradients(model, tp, hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12),
                          max_examples=3)
    trainable = [n for n, p in tp.named_parameters() if p.requires_grad]
    facts = _graph_facts(model, tp)
    fold = _fold_round_trip(model, tp, compile_check=ws == 2)
    return {"max_error": eq.worst, "grad_error": rep.max_error, "compared": rep.compared,
            "missing": rep.missing, "trainable": len(trainable), "worst": rep.worst_param,
            "all_reduces_per_layer": facts["all_reduces_per_layer"],
            "placements": {e.module: e.placement for e in plan.entries},
            "local_shapes": facts["local_shapes"], **fold}


def _fold_round_trip(model, tp, compile_check: bool = False) -> dict[str, Any]:
    """for_generation folds (outputs equal, no adapter linear left, all-reduces unchanged),
    for_training unfolds (outputs equal, weights restored bit for bit). `compile_check`: the
    unfolded and the folded graph under torch.compile(fullgraph=True) as well."""
    from fxtp.runtime.collectives import all_reduce_sum
    from fxtp.testing.checks import check_equivalence

    from .compile_workers import compile_counts, forward_calls, hf_ids

    compiled: dict[str, Any] = {}

    linears = tp.meta["fxtp"].plan.solution.linears
    adapters = {linears[n].weight for n in linears if "lora_" in linears[n].weight}  # test only

    def facts():
        used = {n.target for n in tp.graph.nodes if n.op == "get_attr"}
        return (len([n for n in tp.graph.nodes if n.target is all_reduce_sum]),
                len(adapters & used))

    before = {k: v.detach().clone() for k, v in tp.named_parameters()}
    ar0, lora0 = facts()
    if compile_check:
        tp.eval()
        compiled["compile_unfolded"] = compile_counts(tp, forward_calls(hf_ids(model)))
    fxtp.for_generation(tp)
    strategy = hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12)
    folded = check_equivalence(model, tp, strategy, max_examples=3).worst
    probe = {"input_ids": torch.arange(10).view(2, 5) % model.config.vocab_size}
    with torch.no_grad():
        folded_probe = tp(**probe).logits
    folded_forward = type(tp).forward
    if compile_check:
        compiled["compile_folded"] = compile_counts(tp, forward_calls(hf_ids(model)))
    ar1, lora1 = facts()
    errors = []
    for call in (fxtp.fold_lora, lambda t: tp.train()):
        try:
            call(tp)
            errors.append(None)
        except fxtp.FxtpError as e:
            errors.append(type(e).__name__)
    fxtp.for_training(tp)
    unfolded = check_equivalence(model, tp, strategy, max_examples=3).worst
    round_trip = max(float((v.detach() - before[k]).abs().max()) for k, v in tp.named_parameters())
    try:
        fxtp.unfold_lora(tp)
        errors.append(None)
    except fxtp.FxtpError as e:
        errors.append(type(e).__name__)
    # a second round reuses both graphs' generated code (no recompile) and gives the same
    # folded outputs and restored weights
    unfolded_forward = type(tp).forward
    fxtp.fold_lora(tp)
    with torch.no_grad():
        second_fold = float((tp(**probe).logits - folded_probe).abs().max())
    reused = type(tp).forward is folded_forward
    fxtp.unfold_lora(tp)
    reused = reused and type(tp).forward is unfolded_forward
    second_trip = max(float((v.detach() - before[k]).abs().max()) for k, v in tp.named_parameters())
    return {"folded_error": folded, "unfolded_error": unfolded, "round_trip": round_trip,
            "second_round": (second_fold, second_trip, reused),
            "all_reduces_unfolded_folded": (ar0, ar1), "adapter_weights_used": (lora0, lora1),
            "state_errors": errors, "training_after": tp.training, **compiled}


def _step_error(model, tp) -> float:
    full = dict(model.named_parameters(remove_duplicate=False))
    err = 0.0
    for name, p in tp.named_parameters(remove_duplicate=False):
        e = local_slice(tp, name, full[name].detach())
        err = max(err, float((p.detach() - e).abs().max()))
    return err


def optimizer_case(name: str, ws: int, opt: str, steps: int = 3,
                   sequence_parallel: bool = False) -> dict[str, Any]:
    """A few optimizer steps on the TP graph and on the model, from the same weights: the local
    parameters stay the slices of the model's, step by step."""
    model = train_model(name)
    tp = _transform(name, model, ws, sequence_parallel=sequence_parallel)
    tp.train()
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
            # eps 1e-6, not 1e-8: GPT-2's key bias has a gradient that is zero in exact arithmetic
            # (softmax ignores a per-row constant) and ~1e-11 of rounding noise in practice;
            # Adam with a tiny eps turns that noise into +-lr steps in either implementation
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-6)}[opt]
    o_ref, o_tp = make(list(model.parameters())), make(list(tp.parameters()))
    g = torch.Generator().manual_seed(1)
    losses, errors = [], []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
        for m, o in ((model, o_ref), (tp, o_tp)):
            o.zero_grad()
            logits = m(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
        errors.append(_step_error(model, tp))
    return {"param_errors": errors, "losses_ref": losses[0::2], "losses_tp": losses[1::2],
            "moved": float(sum((p.detach() - q.detach()).abs().sum() for p, q in
                               zip(model.parameters(), train_model(name).parameters())))}


def dropout_case(ws: int) -> dict[str, Any]:
    """A model with dropout: train() is a named error; disable_dropout=True accepts it."""
    from fxtp.testing.models import tiny_model

    tp = fxtp.transform(tiny_model("gpt2"), ws)
    out: dict[str, Any] = {}
    try:
        tp.train()
        out["error"] = None
    except fxtp.FxtpError as e:
        out["error"] = (type(e).__name__, str(e))
    out["training_after_error"] = tp.training
    fxtp.for_training(tp, disable_dropout=True)
    out["training_after_disable"] = tp.training
    fxtp.for_generation(tp)
    out["training_after_generation"] = tp.training
    return out


# sharding structures whose gradients need more than the Llama/GPT-2 cases show: uneven heads,
# kv chunks kept whole on every rank, heads merged into the batch dim, norms over the heads
# computed from partial statistics (at world 4 over kv heads held by pairs of ranks)
FAMILY_GRADS = ("llama_uneven", "falcon_mqa", "bloom", "olmo2")


# at world 4 only the cases whose layout differs from world 2's: Llama's kv heads held by
# pairs of ranks, uneven heads, a whole chunk summed over 4 ranks, vocab rows over 4 ranks,
# LoRA beside replicated kv heads. GPT-2 without vocab_parallel, BLOOM (heads in the batch dim:
# the same slicing at any world size), GPT-2's LoRA and the dropout refusal run at world 2
# only (4 ranks share this machine's 2 cores; each case costs ~8 s there)
AT_4 = ("train_grad_llama", "lora_llama", "train_grad_gpt2_vocab", "train_grad_llama_uneven",
        "train_grad_falcon_mqa", "train_grad_olmo2")


def cases(ws: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("llama", "gpt2"):
        out[f"train_grad_{name}"] = lambda n=name: grad_case(n, ws)
    for name in ("llama", "gpt2"):
        out[f"lora_{name}"] = lambda n=name: lora_case(n, ws)
    out["train_grad_gpt2_vocab"] = lambda: grad_case("gpt2", ws, vocab_parallel=True)
    for name in FAMILY_GRADS:
        out[f"train_grad_{name}"] = lambda n=name: grad_case(n, ws, family=True)
    out["train_sgd_llama"] = lambda: optimizer_case("llama", ws, "sgd")
    out["train_adam_gpt2"] = lambda: optimizer_case("gpt2", ws, "adam")
    out["train_dropout"] = lambda: dropout_case(ws)
    return out if ws == 2 else {k: v for k, v in out.items() if k in AT_4}
