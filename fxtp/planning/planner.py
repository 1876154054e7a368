"""fxtp.plan: capture the model (or a probe of its repeated layers), solve, describe.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..capture.export import Captured, capture
from ..capture.linear import split_biases
from ..errors import CaptureError
from ..runtime.group import check_world_size
from .describe import build_plan
from .overrides import check_overrides
from .plan import Plan
from .repeats import expand_plan, find_repeats, same_decisions, same_layers
from .repeats import probe as probe_layers


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    return f"{type(model).__name__}" + (f" ({kind})" if kind else "")


def plan_model(model: nn.Module, world_size: int, *, example_inputs: Any = None,
               overrides: Optional[dict[str, str]] = None, vocab_parallel: bool = False,
               sequence_parallel: bool = False, probe: bool = True) -> Plan:
    """The sharding decisions for `model` at `world_size`; needs no process group.

    `vocab_parallel=True` also splits embedding tables by rows (masked lookup + all-reduce) and
    makes output projections (lm_head) column-parallel with their logits all-gathered; tied
    weights stay tied (both uses slice the same rows). `sequence_parallel=True` splits the
    replicated region between the layers (norms, residual adds) along the sequence, with a
    reduce-scatter and an all-gather in place of each of the layers' all-reduces
    (`fxtp.solve.sequence`). A deep model is planned from a capture
    of a few of its repeated layers (`fxtp.planning.repeats`; `probe=False` captures every layer).
    """
    world_size = check_world_size(world_size, "fxtp.plan")
    overrides = check_overrides(overrides)
    repeats = find_repeats(model) if probe else []
    if any(_inside_repeat(module, repeats) for module in overrides or {}):
        repeats = []             # a decision for one repeated layer: capture them all
    try:
        with probe_layers(model, repeats):
            captured = capture(model, example_inputs)
    except CaptureError:
        if not repeats:
            raise
        captured = None
    if repeats and (captured is None or captured.opaque):
        # opaque parts run the model's own code, which a probe's cut lists can break (an
        # expert index past the list): capture every layer
        return plan_model(model, world_size, example_inputs=example_inputs, overrides=overrides,
                          vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel,
                          probe=False)
    split_biases(captured.gm)
    if not repeats:
        return build_plan(captured, world_size, model_name(model), overrides, vocab_parallel,
                          sequence_parallel)
    return plan_from_probe(captured, model, tuple(repeats), world_size, overrides,
                           vocab_parallel, example_inputs, sequence_parallel)


def plan_from_probe(captured: Captured, model: nn.Module, repeats: tuple, world_size: int,
                    overrides: Optional[dict[str, str]], vocab_parallel: bool,
                    example_inputs: Any, sequence_parallel: bool = False) -> Plan:
    """Solves the probe capture and writes its decisions for every repeated layer; captures
    every layer instead when the graph does not confirm that the layers are the same, an
    override names a repeated layer (the layers then differ), or the probe's layers were
    planned differently."""
    repeats = list(repeats)
    plan = None
    if (all(same_layers(captured.gm, r) for r in repeats)
            and not any(_inside_repeat(module, repeats) for module in overrides or {})):
        plan = build_plan(captured, world_size, model_name(model), overrides, vocab_parallel,
                          sequence_parallel)
    if plan is None or not same_decisions(plan, repeats):
        return plan_model(model, world_size, example_inputs=example_inputs, overrides=overrides,
                          vocab_parallel=vocab_parallel, sequence_parallel=sequence_parallel,
                          probe=False)
    return expand_plan(plan, model, repeats, example_inputs, _replan_probe)


def _replan_probe(plan: Plan, world_size: int, overrides: dict[str, str],
                  vocab_parallel: bool, sequence_parallel: bool = False) -> Plan:
    """`Plan.override`/`replan` of a plan solved from a probe capture."""
    live = plan.live
    return plan_from_probe(live.captured, live.model, live.probe, world_size, overrides,
                           vocab_parallel, live.example_inputs, sequence_parallel)


def _inside_repeat(module: str, repeats: list) -> bool:
    """An override inside a repeated list makes its layers differ: capture them all."""
    return any(module == r.path or module.startswith(r.path + ".") for r in repeats)
