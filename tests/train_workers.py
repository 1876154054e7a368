"""Training cases run inside the spawned gloo ranks of tests/test_multirank.py (same spawn):
gradients through the tensor-parallel graph vs the untouched model, and optimizer steps."""
from __future__ import annotations

from typing import Any

import torch

import fxtp
from fxtp.verify import check_gradients, hf_inputs, local_slice

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def train_model(name: str, seed: int = 0):
    """A tiny model without dropout whose zero-initialised parameters (GPT-2's c_proj biases)
    are made random: a bias added twice or never would otherwise go unnoticed."""
    from fxtp.models import tiny_model

    model = tiny_model(name, seed, **NO_DROPOUT.get(name, {}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def grad_case(name: str, ws: int, vocab_parallel: bool = False) -> dict[str, Any]:
    """Full fine-tuning: every local parameter's gradient vs the slice of the model's."""
    model = train_model(name)
    tp = fxtp.transform(model, ws, vocab_parallel=vocab_parallel)
    tp.train()
    rep = check_gradients(model, tp, hf_inputs(model.config.vocab_size, max_batch=2, max_seq=12),
                          max_examples=4)
    info = tp.meta["fxtp"]
    return {"max_error": rep.max_error, "loss_error": rep.loss_error, "worst": rep.worst_param,
            "examples": rep.examples, "compared": rep.compared, "missing": rep.missing,
            "min_grad_norm": rep.min_grad_norm,
            "params": len(dict(tp.named_parameters(remove_duplicate=False))),
            "grad_syncs": len(info.grad_sync_nodes), "training": tp.training}


def _step_error(model, tp) -> float:
    full = dict(model.named_parameters(remove_duplicate=False))
    err = 0.0
    for name, p in tp.named_parameters(remove_duplicate=False):
        e = local_slice(tp, name, full[name].detach())
        err = max(err, float((p.detach() - e).abs().max()))
    return err


def optimizer_case(name: str, ws: int, opt: str, steps: int = 3) -> dict[str, Any]:
    """A few optimizer steps on the TP graph and on the model, from the same weights: the local
    parameters stay the slices of the model's, step by step."""
    model = train_model(name)
    tp = fxtp.transform(model, ws)
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
    from fxtp.models import tiny_model

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


def cases(ws: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("llama", "gpt2"):
        out[f"train_grad_{name}"] = lambda n=name: grad_case(n, ws)
    out["train_grad_gpt2_vocab"] = lambda: grad_case("gpt2", ws, vocab_parallel=True)
    if ws == 2:
        out["train_sgd_llama"] = lambda: optimizer_case("llama", ws, "sgd")
        out["train_adam_gpt2"] = lambda: optimizer_case("gpt2", ws, "adam")
    out["train_dropout"] = lambda: dropout_case(ws)
    return out
