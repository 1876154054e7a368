"""Numerical equivalence: run ranks as real processes on gloo and compare with the untouched model.

`run_ranks` starts `world_size` processes (forked from a forkserver that imported torch,
transformers and fxtp once; spawn where there is no forkserver), on 127.0.0.1 at a free port,
initialises a gloo group in each, calls a picklable function and collects what every rank
returns; a rank that hangs or dies fails the run after `timeout` seconds instead of blocking. `check_equivalence`
draws inputs with hypothesis (derandomized, so every rank draws the same examples and
collectives line up) and records the largest difference to the original model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from .._transform import transform
from ..capture.export import is_hf_model, model_device
from ..errors import InputError
from ..graph.nodes import runs_index
from ..runtime.agreement import resolve
from .ranks import run_ranks
from .strategies import hf_inputs_for

# ---------------------------------------------------------------------------------------------
# comparing outputs

def flatten_tensors(x: Any) -> list[tuple[str, torch.Tensor]]:
    """Named tensors of a model output (HF ModelOutput, tuple, dict or tensor)."""
    out: list[tuple[str, torch.Tensor]] = []

    def walk(v: Any, name: str) -> None:
        if isinstance(v, torch.Tensor):
            out.append((name or "output", v))
        elif isinstance(v, dict) or hasattr(v, "items"):
            for k, item in v.items():
                walk(item, f"{name}.{k}" if name else str(k))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, f"{name}[{i}]")

    walk(x, "")
    return out


def max_errors(expected: Any, actual: Any) -> dict[str, float]:
    """Largest |a - e| / (1 + |e|) per output tensor (the 1e-4 abs/rel criterion in one number)."""
    exp, act = flatten_tensors(expected), flatten_tensors(actual)
    if [n for n, _ in exp] != [n for n, _ in act]:
        raise AssertionError(f"outputs differ in structure: {[n for n, _ in exp]} vs "
                             f"{[n for n, _ in act]}")
    errs = {}
    for (name, e), (_, a) in zip(exp, act):
        if e.shape != a.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
        if e.numel() == 0:
            errs[name] = 0.0
            continue
        diff = ((a.double() - e.double()).abs() / (1 + e.double().abs()))
        errs[name] = float(diff.max()) if not torch.isnan(diff).any() else math.inf
    return errs


@dataclass
class EquivalenceReport:
    examples: int = 0
    max_error: dict[str, float] = field(default_factory=dict)
    worst_input: Optional[str] = None

    @property
    def worst(self) -> float:
        return max(self.max_error.values(), default=0.0)

    def add(self, errs: dict[str, float], described: str) -> None:
        self.examples += 1
        before = self.worst
        for k, v in errs.items():
            self.max_error[k] = max(self.max_error.get(k, 0.0), v)
        if self.worst > before or self.worst_input is None:
            self.worst_input = described


def check_equivalence(model: nn.Module, tp: nn.Module, strategy, max_examples: int = 10,
                      seed: int = 0) -> EquivalenceReport:
    """Runs `model` and `tp` on hypothesis-drawn inputs; never raises on a mismatch (so every rank
    keeps drawing the same examples and no collective is left waiting) but records it."""
    from hypothesis import HealthCheck, Phase, given, settings

    report = EquivalenceReport()
    device = model_device(model)

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(inputs):
        inputs = _first_ranks_draw(inputs, tp)
        args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
        # drawn on the host; run where the model is (a CUDA model gets CUDA inputs)
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))
        with torch.no_grad():
            expected = model(*args, **kwargs)
            actual = tp(*args, **kwargs)
        shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        shapes.update({f"arg{i}": tuple(a.shape) for i, a in enumerate(args)})
        report.add(max_errors(expected, actual), str(shapes))

    torch.manual_seed(seed)
    run()
    return report


def _first_ranks_draw(inputs: Any, tp: nn.Module) -> Any:
    """The inputs the group's first rank drew, on every rank of `tp`'s group. Hypothesis mixes
    constants from the local modules a process has imported into its draws, so ranks that ran
    different code before draw different examples, and a collective would then sum the
    shards of different inputs: a wrong answer, or a hang on different shapes."""
    graph = getattr(tp, "_orig_mod", tp)        # a torch.compile'd tp
    info = getattr(graph, "meta", {}).get("fxtp") if isinstance(getattr(graph, "meta", None),
                                                                 dict) else None
    if info is None or info.world_size <= 1 or not dist.is_initialized():
        return inputs
    group = resolve(info.group_name)
    box = [inputs]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _verify_rank(rank: int, world_size: int, model: nn.Module, example_inputs: Any,
                 strategy_factory: Optional[Callable], max_examples: int,
                 sequence_parallel: bool = False) -> dict[str, Any]:
    tp = transform(model, world_size, example_inputs=example_inputs,
                   sequence_parallel=sequence_parallel)
    info = tp.meta["fxtp"]
    strategy = strategy_factory() if strategy_factory is not None else None
    if strategy is None:
        strategy = hf_inputs_for(model)
    report = check_equivalence(model, tp, strategy, max_examples)
    return {"rank": rank, "examples": report.examples, "max_error": report.max_error,
            "worst_input": report.worst_input, "all_reduces": len(info.all_reduce_nodes),
            "sequence_collectives": len(info.sequence_nodes),
            "param_fraction": info.plan.param_fraction()}


def verify(model: nn.Module, world_size: int, *, example_inputs: Any = None,
           strategy_factory: Optional[Callable] = None, max_examples: int = 10,
           timeout: float = 600.0, sequence_parallel: bool = False) -> list[dict[str, Any]]:
    """Spawns `world_size` gloo ranks, transforms `model` in each (with `sequence_parallel`
    when asked) and compares it with the untouched model on hypothesis-drawn inputs. Returns
    one report dict per rank.

    HF models get token-id inputs drawn from their vocab; other models need
    `strategy_factory`, a picklable function returning a hypothesis strategy of inputs (see
    `tensor_inputs`)."""
    if strategy_factory is None and not is_hf_model(model):
        raise InputError(f"fxtp.verify: {type(model).__name__} is not a Hugging Face model, so "
                         "fxtp cannot draw its inputs: pass strategy_factory=, a picklable "
                         "function returning a hypothesis strategy of its inputs (e.g. one of "
                         "fxtp.testing.strategies.tensor_inputs)")
    return run_ranks(_verify_rank, world_size, model.eval(), example_inputs, strategy_factory,
                     max_examples, sequence_parallel, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# comparing gradients

def local_slice(tp: nn.Module, name: str, full: torch.Tensor) -> torch.Tensor:
    """The part of a full-model tensor (a parameter or its gradient) that `tp` holds under `name`."""
    rec = tp.meta["fxtp"].param_slices.get(name) if hasattr(tp, "meta") else None
    if rec is None:
        return full
    dim, runs = rec
    return full.index_select(dim, runs_index(runs, full.device))


def token_loss(out: Any, inputs: dict) -> torch.Tensor:
    """Cross-entropy of the logits against the input ids (defined for any sequence length)."""
    logits = out.logits if hasattr(out, "logits") else out[0]
    ids = inputs["input_ids"]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


@dataclass
class GradientReport:
    examples: int = 0
    max_error: float = 0.0                 # max |g_tp - g_slice| / (1 + |g_slice|), all params
    loss_error: float = 0.0
    worst_param: Optional[str] = None
    compared: int = 0                      # parameters compared per example
    missing: list[str] = field(default_factory=list)   # trainable in model, no grad in tp
    min_grad_norm: float = math.inf        # smallest reference gradient norm compared


def check_gradients(model: nn.Module, tp: nn.Module, strategy, max_examples: int = 5,
                    loss_fn: Callable = token_loss) -> GradientReport:
    """Backward through `model` and `tp` on hypothesis-drawn inputs (a tuple: positional, a
    dict: keyword); compares every trainable local parameter's gradient with the matching
    slice of the model's. Records, never raises on a mismatch (so all ranks stay in step)."""
    from hypothesis import HealthCheck, Phase, given, settings

    report = GradientReport()
    full = dict(model.named_parameters(remove_duplicate=False))
    local = dict(tp.named_parameters(remove_duplicate=False))

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(inputs):
        model.zero_grad(set_to_none=True)
        tp.zero_grad(set_to_none=True)
        args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
        ref = loss_fn(model(*args, **kwargs), inputs)
        ref.backward()
        got = loss_fn(tp(*args, **kwargs), inputs)
        got.backward()
        report.examples += 1
        report.loss_error = max(report.loss_error, abs(float(got.detach()) - float(ref.detach())))
        report.compared = 0
        for name, p in local.items():
            if not p.requires_grad:
                continue
            expected = full[name].grad
            if expected is None:
                continue
            if p.grad is None:
                report.missing.append(name)
                continue
            e = local_slice(tp, name, expected).double()
            err = float(((p.grad.double() - e).abs() / (1 + e.abs())).max())
            report.compared += 1
            report.min_grad_norm = min(report.min_grad_norm, float(e.norm()))
            if err > report.max_error or report.worst_param is None:
                report.max_error, report.worst_param = max(err, report.max_error), name

    run()
    return report
