"""A user's decisions about the plan (`overrides`: module path -> 'replicate' | 'shard'):
checked as given, turned into the solver's reasons, and checked again against its solution
('shard' must have happened)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import fx

from ..capture.export import Captured
from ..capture.linear import module_path
from ..errors import PlanOverrideError
from ..solve.records import Reason, ReasonKind, Solution

OVERRIDE_CHOICES = ("replicate", "shard")


def check_overrides(decisions: Any) -> dict[str, str]:
    """`decisions` as a dict of module path -> 'replicate' | 'shard', else PlanOverrideError
    naming the entry (a plan's overrides, fxtp.plan(overrides=), fxtp.generator(overrides=), a
    saved plan's 'overrides')."""
    if decisions is None:
        return {}
    if not isinstance(decisions, Mapping):
        raise PlanOverrideError(
            f"overrides must be a dict of module path -> 'replicate' or 'shard', got "
            f"{type(decisions).__name__}: e.g. {{'model.layers.0.mlp': 'replicate'}}")
    for module, choice in decisions.items():
        if not isinstance(module, str):
            raise PlanOverrideError(
                f"override key {module!r} ({type(module).__name__}) is not a module path; name "
                "modules as model.named_modules() does, e.g. 'model.layers.0.mlp'")
        if not isinstance(choice, str) or choice not in OVERRIDE_CHOICES:
            raise PlanOverrideError(
                f"override for {module!r} is {choice!r}; supported: {', '.join(OVERRIDE_CHOICES)}"
                " (fxtp decides column/row placement itself: 'replicate' keeps a module "
                "whole, 'shard' demands that it be sharded and fails if that is unsafe)")
    return dict(decisions)


def override_reasons(captured: Captured, linears, overrides: dict[str, str]) -> dict[str, Reason]:
    """The reasons the solver reports for linears the user keeps replicated; an override
    naming a module the model does not have raises PlanOverrideError with close matches."""
    known = module_paths(captured.gm)
    out: dict[str, Reason] = {}
    for module, choice in overrides.items():
        if module not in known:
            close = difflib.get_close_matches(module, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PlanOverrideError(f"override names module {module!r}, which is not in the model."
                                    f"{hint}")
        if choice != "replicate":
            continue
        for name, m in linears.items():
            if m.module == module or m.module.startswith(module + "."):
                out[name] = Reason(f"user override: {module} -> {choice}", name, m.module,
                                   ReasonKind.OVERRIDE)
    return out


def check_shard_overrides(linears, sol: Solution, overrides: dict[str, str]) -> None:
    """A module the user wants sharded must be: fxtp never shards what it found unsafe."""
    for module, choice in overrides.items():
        if choice != "shard":
            continue
        inside = [n for n, m in linears.items() if m.module == module or m.module.startswith(module + ".")]
        if not inside:
            raise PlanOverrideError(f"override asks to shard {module!r}, which has no linear layer")
        for name in inside:
            if name not in sol.actions.columns and name not in sol.actions.rows:
                reason = sol.replicated.get(name)
                raise PlanOverrideError(
                    f"override asks to shard {module!r}, but {linears[name].module} cannot be "
                    f"sharded safely: {reason or 'it is not between a replicated input and a row-parallel linear'}."
                    " Remove the override or make it 'replicate'.")


def module_paths(gm: fx.GraphModule) -> set[str]:
    """Every module path the graph's nodes were traced in, and their parents."""
    paths: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            parts = n.target.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
        mp = module_path(n)
        if mp:
            parts = mp.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return paths
