"""A weightless copy of the model: what fxtp keeps of the user's module once the graph holds
the weights, so that `tp` holds no reference to the full weights (`del model` frees them).

`tp.generate` captures its decode step from it; `fxtp.save` reads from it what a checkpoint of
the model is: its config and generation config, its state_dict names (persistent buffers only,
tied weights by identity) and, for a PEFT model, its adapters' names and config.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

from torch import nn


def skeleton(model: nn.Module, held: set[str]) -> nn.Module:
    """A deep copy of `model` without its weights: every parameter, and every buffer `tp`
    holds under the same name (`held`), becomes a meta tensor of the same shape and dtype (tied
    ones stay tied); other buffers and plain tensor attributes are copied with their values."""
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in held and id(b) not in memo:
            memo[id(b)] = b.detach().to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model, memo)


def try_skeleton(model: nn.Module, held: set[str]) -> tuple[Optional[nn.Module], Optional[str]]:
    """`skeleton(model, held)`, or None and why it could not be made (a module that cannot be
    deep-copied): the transform still works, generation and saving then say why they cannot."""
    try:
        return skeleton(model, held), None
    except Exception as e:  # noqa: BLE001 - any failure to copy is reported where it matters
        return None, (f"fxtp could not keep a weightless copy of {type(model).__name__} "
                      f"({type(e).__name__}: {e})")
