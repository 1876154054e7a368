"""fxtp.transform: plan (or check the given plan), rewrite for this rank, install the call guards.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import fx, nn

from .capture.skeleton import try_skeleton
from .errors import NotDivisibleError, PlanOverrideError
from .graph.tensors import deepcopy_graph, tensor_attrs
from .guards import guard_meta, guard_moves, guard_training, install_input_defaults
from .planning.plan import Plan
from .planning.planner import model_name, plan_model
from .rewrite.pipeline import rewrite
from .rewrite.record import META_KEY
from .runtime import regather
from .runtime.group import resolve_group


def transform(model: nn.Module, world_size: int, *, plan: Optional[Plan] = None,
              group: Optional[dist.ProcessGroup] = None, example_inputs: Any = None,
              vocab_parallel: bool = False, sequence_parallel: bool = False,
              check_weights: bool = True, check_inputs: bool = False) -> fx.GraphModule:
    """Returns this rank's tensor-parallel GraphModule of `model`.

    Call it on every rank of an initialised process group (`group`, default WORLD) with the
    same model weights. The result takes the model's inputs and returns its outputs on every
    rank; its parameters keep their names and hold this rank's slices.

    `check_weights` (default on): the ranks compare a checksum of every parameter and buffer,
    taken while the rewrite reads it for slicing, in one small gather; ranks holding different
    weights (another seed, another checkpoint) raise `WeightMismatchError` on every rank. A
    model built on the meta device is checked by `fxtp.load` instead. `check_inputs` (default
    off: it costs a gather and a host sync per call): every call compares a checksum of the
    inputs across the ranks and raises `InputMismatchError` on every rank when they differ.
    `sequence_parallel=True` (Megatron-SP): the norms and residual adds between the layers hold
    1/N of the tokens per rank, each layer's all-reduce becoming a reduce-scatter and an
    all-gather (the same bytes); the plan says where and why an all-reduce stays.
    """
    info = resolve_group(world_size, group)
    if plan is not None and not isinstance(plan, Plan):
        raise PlanOverrideError(
            f"plan= takes a Plan (fxtp.plan(model, ws), or Plan.from_json(text) of a saved one), "
            f"got {type(plan).__name__}" + (": load a dict with fxtp.Plan.from_dict(d)"
                                            if isinstance(plan, dict) else ""))
    if plan is None:
        plan = plan_model(model, world_size, example_inputs=example_inputs,
                          vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel,
                          probe=False)
    elif sequence_parallel and not plan.sequence_parallel:
        raise PlanOverrideError(
            "sequence_parallel=True with a plan made without it: pass "
            "plan=plan.replan(sequence_parallel=True), or fxtp.plan(model, ws, "
            "sequence_parallel=True)")
    elif plan.world_size != world_size:
        raise PlanOverrideError(f"the plan was made for world_size={plan.world_size}, not "
                                f"{world_size}: rebuild it with fxtp.plan(model, {world_size})")
    if plan.captured is None or plan.probe:   # loaded from JSON, or planned from a probe
        plan = _rederive(model, plan, example_inputs)
    else:
        plan = _bind(model, plan)
    if plan.not_divisible:
        r = plan.not_divisible[0]
        raise NotDivisibleError(
            f"{r.module or r.node}: {r.text} (node {r.node}). Keep it replicated: "
            f"fxtp.transform(model, {world_size}, "
            f"plan=fxtp.plan(model, {world_size}).override({{{(r.module or r.node)!r}: 'replicate'}}))")
    gm = rewrite(plan, info, check_weights=check_weights)
    skel, why = try_skeleton(model, set(tensor_attrs(gm)))
    gm.meta[META_KEY] = dataclasses.replace(gm.meta[META_KEY], skeleton=skel,
                                            skeleton_error=why or "")
    gm.meta[META_KEY].state.check_inputs = check_inputs and info.world_size > 1
    guard_meta(gm)
    install_input_defaults(gm, gm.meta[META_KEY].plan.captured)   # shapes only
    guard_training(gm)
    guard_moves(gm)
    if gm.meta[META_KEY].sequence_nodes:
        # all-gathered sequences are gathered again in backward (state.regather)
        regather.install(gm, lambda: gm.meta[META_KEY].state.regather)
    # function-level import: tp_generate builds its decode step with transform()
    from .generation.tp_generate import attach

    attach(gm, model)       # tp.generate: on the skeleton, the step built lazily
    # function-level import: size_graphs builds its graphs with transform()
    from .size_graphs import attach as attach_size_graphs

    attach_size_graphs(gm)  # graphs for sizes this one does not hold for, built lazily
    return gm


def _rederive(model: nn.Module, saved: Plan, example_inputs: Any) -> Plan:
    """A plan loaded from JSON has decisions but no graph: plan the model again with the saved
    overrides and insist that every decision is the same (another model, another fxtp version
    or a hand-edited entry would otherwise be applied silently)."""
    fresh = plan_model(model, saved.world_size, example_inputs=example_inputs,
                       overrides=saved.overrides, vocab_parallel=saved.vocab_parallel,
                       sequence_parallel=saved.sequence_parallel, probe=False)
    diffs = saved.mismatches(fresh)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; ... {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise PlanOverrideError(
            f"the plan does not match {model_name(model)} (given vs derived from the whole model): {shown}. "
            "A saved plan is re-derived from the model with its 'overrides'; change decisions "
            "there (module -> 'replicate'/'shard'), or save a new plan from fxtp.plan(model, ws).")
    return fresh


def _bind(model: nn.Module, plan: Plan) -> Plan:
    """A plan the user passed carries the graph captured from the model it was made of: it must
    be this model's (the same parameter names, shapes, dtypes, devices and ties), and the
    rewrite must slice this model's tensors, not those of the model the plan was captured from
    (another instance with other weights would otherwise give a graph of the wrong weights)."""
    gm = plan.captured.gm
    have = {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}
    mine = {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}
    params = dict(model.named_parameters(remove_duplicate=False))
    planned = dict(gm.named_parameters(remove_duplicate=False))
    problems = [f"{n} is not in the model" for n in planned if n not in params]
    problems += [f"{n} is not in the plan" for n in params if n not in planned]
    for n, t in have.items():
        m = mine.get(n)
        if m is not None and (m.shape, m.dtype, m.device) != (t.shape, t.dtype, t.device):
            problems.append(f"{n}: {list(t.shape)} {t.dtype} on {t.device} in the plan, "
                            f"{list(m.shape)} {m.dtype} on {m.device} in the model")
    shared = [n for n in have if n in mine]
    if not problems:     # tied weights (one tensor under several names) tied alike
        a, b = _ties(have, shared), _ties(mine, shared)
        problems += [f"{n} is tied to {sorted(a[n] - {n}) or 'nothing'} in the plan, to "
                     f"{sorted(b[n] - {n}) or 'nothing'} in the model"
                     for n in shared if a[n] != b[n]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise PlanOverrideError(
            f"the plan was made for {plan.model_name}, and {model_name(model)} differs from "
            f"it: {shown}. Plan this model itself: fxtp.transform(model, ws, "
            f"plan=fxtp.plan(model, ws)) (a plan saved as JSON is re-derived from the model).")
    if all(have[n] is mine[n] for n in shared):
        return plan
    memo = {id(have[n]): mine[n] for n in shared}     # the graph copied, the tensors rebound
    bound = deepcopy_graph(gm, memo)
    return dataclasses.replace(plan, live=plan.live.with_graph(bound))


def _ties(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, frozenset]:
    """name -> every name (of `names`) of the same tensor."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(tensors[n]), []).append(n)
    return {n: frozenset(groups[id(tensors[n])]) for n in names}
