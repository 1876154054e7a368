"""Cases of tests/test_checks.py, run inside one spawn of gloo ranks at world 2: ranks that hold
different weights, read different checkpoints, or get different inputs; out-of-vocabulary ids
with vocab-parallel tables; PEFT models of every task type; example inputs that are views; and
last, a rank that leaves while the other still calls fxtp. Every rank draws the same hypothesis
examples (derandomized) and applies a disagreement on rank 1 only. Ranks return plain data."""
from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

import fxtp
from fxtp.capture.lora import find_lora_branches
from fxtp.testing.checks import check_equivalence
from fxtp.testing.models import TINY, tiny_model
from fxtp.testing.strategies import hf_inputs

from .rank_workers import _run_timed

EXAMPLES = 6
LOST_TIMEOUT_S = 0.5


def _settings(n: int = EXAMPLES):
    from hypothesis import HealthCheck, Phase, settings

    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def _error(fn: Callable[[], Any]) -> tuple[str, str]:
    """(error class name, message) of fn(), or ("", "") when it returns."""
    try:
        fn()
    except Exception as e:      # the test decides which ones are right
        return type(e).__name__, str(e)
    return "", ""


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()}


def _same(before: dict, module) -> bool:
    now = module.state_dict(keep_vars=True)
    return before.keys() == now.keys() and all(torch.equal(before[n], now[n].detach())
                                               for n in before)


def _llama(seed: int = 0):
    """The tiny Llama with one layer (a capture costs half of two layers')."""
    return tiny_model("llama", seed=seed, num_hidden_layers=1)


class Plans:
    """The captures the cases share, made on first use: the Llama's, and the meta Llama's (a
    plan applied to another instance of the same model slices that instance's tensors)."""

    def __init__(self, ws: int):
        self.ws, self._plans = ws, {}

    def of(self, model, key: str):
        if key not in self._plans:
            self._plans[key] = fxtp.plan(model, self.ws)
        return self._plans[key]


# ---------------------------------------------------------------------------------------------
# weights

def weights_case(rank: int, ws: int, plans: Plans) -> dict[str, Any]:
    """Same weights: the check passes having read each tensor once, and the result is right.
    Another seed on rank 1: WeightMismatchError on every rank, the model untouched;
    check_weights=False skips the check. One drawn element of one drawn tensor changed on
    rank 1: that tensor, and only it, is named."""
    from hypothesis import given
    from hypothesis import strategies as st

    out: dict[str, Any] = {}
    model = _llama()
    plan = plans.of(model, "llama")
    tp = fxtp.transform(model, ws, plan=plan)
    check = tp.meta[fxtp.META_KEY].weight_check
    out["checked"], out["read_late"] = check.tensors, check.read_late
    out["tensors"] = len({id(t) for t in model.state_dict(keep_vars=True).values()})
    out["max_error"] = check_equivalence(model, tp, hf_inputs(128), 3).worst

    other = _llama(seed=rank)
    before = _weights(other)
    out["other_seed"] = _error(lambda: fxtp.transform(other, ws, plan=plan))
    out["other_seed_untouched"] = _same(before, other)
    out["unchecked"] = _error(lambda: fxtp.transform(other, ws, plan=plan, check_weights=False))

    names = sorted(n for n, _ in model.named_parameters())
    drawn = []

    @_settings(4)
    @given(st.sampled_from(names), st.integers(0, 10 ** 6), st.sampled_from([1e-3, -1.0, 7.0]))
    def one_tensor(name, at, delta):
        t = dict(model.named_parameters())[name]
        i = at % t.numel()
        with torch.no_grad():
            old = t.view(-1)[i].clone()
            if rank == 1:
                t.view(-1)[i] += delta
            err = _error(lambda: fxtp.transform(model, ws, plan=plan))
            t.view(-1)[i] = old
        drawn.append((name, err))

    one_tensor()
    out["one_tensor"] = drawn
    return out


def load_case(rank: int, ws: int, ckpts: dict, plans: Plans) -> dict[str, Any]:
    """A meta-built model is checked at fxtp.load: rank 1 reading another checkpoint raises
    WeightMismatchError on every rank and nothing is loaded; the same checkpoint loads."""
    out: dict[str, Any] = {}
    with fxtp.init_empty():
        model = _llama()
    tp = fxtp.transform(model, ws, plan=plans.of(model, "meta llama"))
    out["deferred"] = tp.meta[fxtp.META_KEY].weight_check.meta
    out["other_ckpt"] = _error(lambda: fxtp.load(tp, ckpts["seed0" if rank == 0 else "seed1"]))
    out["still_unloaded"] = len(tp.meta[fxtp.META_KEY].state.unloaded)
    fxtp.load(tp, ckpts["seed0"])
    reference = _llama()
    out["max_error"] = check_equivalence(reference, tp, hf_inputs(128), 3).worst
    return out


# ---------------------------------------------------------------------------------------------
# inputs

def inputs_case(rank: int, ws: int, plans: Plans) -> dict[str, Any]:
    """check_inputs=True: drawn inputs, and each disagreement made on rank 1 in turn (other
    values, another length, another dtype, an unknown input). Agreeing ranks get the model's outputs;
    disagreeing ones raise on every rank, and the next call is right again (no rank left
    waiting in a collective)."""
    from hypothesis import given

    model = _llama()
    tp = fxtp.transform(model, ws, plan=plans.of(model, "llama"), check_inputs=True)
    seen: list[dict] = []

    kinds = ["none", "values", "length", "dtype", "unknown"]

    @_settings(10)
    @given(hf_inputs(128, max_batch=2, max_seq=10))
    def run(inputs):
        how = kinds[len(seen) % len(kinds)]       # each kind on two drawn inputs
        ids = inputs["input_ids"]
        mine = dict(inputs)
        if rank == 1 and how == "values":
            mine["input_ids"] = (ids + 1) % 128
        elif rank == 1 and how == "length":
            mine = {"input_ids": torch.cat([ids, ids[:, :1]], 1)}
        elif rank == 1 and how == "dtype":
            mine["input_ids"] = ids.to(torch.int32)
        elif rank == 1 and how == "unknown":
            mine["labels"] = ids
        with torch.no_grad():
            err = _error(lambda: tp(**mine))
            after = (tp(**inputs).logits - model(**inputs).logits).abs().max().item()
        seen.append({"how": how, "error": err, "after": after})

    run()
    return {"seen": seen}


def vocab_case(rank: int, ws: int) -> dict[str, Any]:
    """Vocab-parallel embedding: a drawn id outside [0, vocab) at a drawn place raises on every
    rank (the model raises IndexError) instead of looking up zeros."""
    from hypothesis import given
    from hypothesis import strategies as st

    model = _llama()
    tp = fxtp.transform(model, ws, vocab_parallel=True)
    seen: list[dict] = []

    @_settings(6)
    @given(hf_inputs(128, max_batch=2, max_seq=10),
           st.one_of(st.integers(128, 10 ** 6), st.integers(-10 ** 6, -1)), st.integers(0, 99))
    def run(inputs, bad, at):
        ids = inputs["input_ids"].clone()
        ids.view(-1)[at % ids.numel()] = bad
        with torch.no_grad():
            model_err = _error(lambda: model(input_ids=ids))
            err = _error(lambda: tp(input_ids=ids))
            good = (tp(**inputs).logits - model(**inputs).logits).abs().max().item()
        seen.append({"bad": bad, "model": model_err[0], "error": err, "good": good})

    run()
    return {"seen": seen}


# ---------------------------------------------------------------------------------------------
# capture

def peft_case(rank: int, ws: int) -> dict[str, Any]:
    """PEFT LoRA models of every task type (none, as RLHF libraries build them, too) capture,
    equal the model, and have their adapters found from the graph (folding works)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
    )

    cfg_args = {k: v for k, v in TINY["llama"].items() if k != "model_type"}
    cfg_args["num_hidden_layers"] = 1
    out: dict[str, Any] = {}
    for task, cls in ((None, LlamaForCausalLM), ("CAUSAL_LM", LlamaForCausalLM),
                      ("SEQ_CLS", LlamaForSequenceClassification),
                      ("TOKEN_CLS", LlamaForTokenClassification)):
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("llama", pad_token_id=0, num_labels=3, **cfg_args)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          **({"task_type": task} if task else {}))
        model = get_peft_model(cls(cfg), lora).eval()
        with torch.no_grad():         # B starts at zero: make the adapters matter
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        tp = fxtp.transform(model, ws)
        err = check_equivalence(model, tp, hf_inputs(128, max_seq=8), 2).worst
        fxtp.fold_lora(tp)
        folded = check_equivalence(model, tp, hf_inputs(128, max_seq=8), 1).worst
        fxtp.unfold_lora(tp)
        branches = len(find_lora_branches(tp, tp.meta[fxtp.META_KEY].plan.solution.linears))
        out[str(task)] = {"type": type(model).__name__, "max_error": err, "folded": folded,
                          "branches": branches}
    return out


def view_inputs_case(rank: int, ws: int) -> dict[str, Any]:
    """example_inputs given as views of a larger tensor: later calls of any shape work."""
    model = _llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    tp = fxtp.transform(model, ws, example_inputs={"input_ids": ids[:2, :8],
                                                   "attention_mask": torch.ones_like(ids)[:2, :8]})
    return {"max_error": check_equivalence(model, tp, hf_inputs(128), 4).worst}


# ---------------------------------------------------------------------------------------------
# a lost rank

def lost_rank_case(rank: int, ws: int, ckpts: dict, plans: Plans) -> dict[str, Any]:
    """Both ranks build, on a group with a short timeout, what calls fxtp's own agreement steps
    (a check_inputs graph, a generator, a meta graph to load); then rank 1 leaves. Each step
    on rank 0 raises RankLostError naming rank 1 within the group's timeout."""
    group = dist.new_group(list(range(ws)))
    model = _llama()
    plan = plans.of(model, "llama")
    tp = fxtp.transform(model, ws, plan=plan, group=group, check_inputs=True)
    gen = fxtp.generator(model, ws, max_len=16, group=group)
    with fxtp.init_empty():
        empty = _llama()
    meta_tp = fxtp.transform(empty, ws, plan=plans.of(empty, "meta llama"), group=group)
    # short only now: the ranks' captures above may finish seconds apart on a busy machine
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=LOST_TIMEOUT_S), group)
    dist.barrier(group)
    root = os.path.dirname(ckpts["seed0"])
    halfway = os.path.join(root, "saved_halfway")
    if rank != 0:
        _crash_halfway_through_save(tp, halfway)
        return {}            # this rank's process ends: rank 0 carries on alone
    ids = torch.randint(0, 128, (1, 4))
    steps = {"save_halfway": lambda: fxtp.save(tp, halfway),     # first: rank 1 is in it
             "transform": lambda: fxtp.transform(model, ws, plan=plan, group=group),
             "check_inputs": lambda: tp(input_ids=ids),
             "generate": lambda: gen.generate(ids, max_new_tokens=2),
             "load": lambda: fxtp.load(meta_tp, ckpts["seed0"]),
             "save": lambda: fxtp.save(tp, os.path.join(root, "saved_alone"))}
    out = {}
    for name, step in steps.items():
        t = time.monotonic()
        out[name] = (*_error(step), time.monotonic() - t)
    out["saved"] = sorted(f for f in os.listdir(root) if "saved" in f or "fxtp-" in f)
    return out


class _Crash(Exception):
    pass


def _crash_halfway_through_save(tp, path: str) -> None:
    """fxtp.save on this rank, which stops dead in its second round of exchanges (as a rank
    killed there would): its peer is left waiting for its slices."""
    from fxtp.saving.assemble import Assembler

    exchange = Assembler._exchange

    def crash(self, k, mine):
        if k >= 1:
            raise _Crash("this rank stops here")
        return exchange(self, k, mine)

    Assembler._exchange = crash
    try:
        fxtp.save(tp, path)
    except _Crash:
        pass
    finally:
        Assembler._exchange = exchange


# ---------------------------------------------------------------------------------------------

def write_checkpoints(root: str) -> dict[str, str]:
    """In the test process: the tiny Llama with seeds 0 and 1."""
    import os

    dirs = {}
    for seed in (0, 1):
        d = os.path.join(root, f"seed{seed}")
        _llama(seed).save_pretrained(d, safe_serialization=True)
        dirs[f"seed{seed}"] = d
    return dirs


def run_all(rank: int, ws: int, ckpts: dict) -> dict[str, Any]:
    plans = Plans(ws)
    cases = {"weights": lambda: weights_case(rank, ws, plans),
             "load": lambda: load_case(rank, ws, ckpts, plans),
             "inputs": lambda: inputs_case(rank, ws, plans),
             "vocab": lambda: vocab_case(rank, ws),
             "peft": lambda: peft_case(rank, ws),
             "view_inputs": lambda: view_inputs_case(rank, ws),
             "lost_rank": lambda: lost_rank_case(rank, ws, ckpts, plans)}   # last: 1 leaves
    return _run_timed(cases)
