"""Small readers of fx nodes that the rules and the propagation share: a node's shape, static
ints among symbolic sizes, dim normalisation, operands by argument path.

Separate from the rules so that each rule module and the propagation import them from one
place, none of them private to another.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from .placements import REPLICATE, Sharded


def node_shape(node: Any) -> Optional[list]:
    """The shape of the tensor a node yields (ints or SymInts), None if it yields no tensor."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return list(val.shape)
    return None


def static_int(x) -> Optional[int]:
    """`x` as an int when it is one (or a SymInt known to be constant), else None."""
    if isinstance(x, int):
        return x
    try:
        if x.node.is_constant():
            return int(x)
    except AttributeError:
        pass
    return None


def static_prod(sizes) -> Optional[int]:
    """The product of sizes, None when one of them is not static."""
    out = 1
    for s in sizes:
        v = static_int(s)
        if v is None:
            return None
        out *= v
    return out


def norm_dim(d: int, rank: int) -> int:
    """A dim index made non-negative for a tensor of `rank` dims."""
    return d + rank if d < 0 else d


def arg_at(n: fx.Node, path: tuple):
    """The operand of `n` at an argument path: (arg index or kwarg name, then indices into it)."""
    head = n.args[path[0]] if isinstance(path[0], int) else n.kwargs[path[0]]
    for p in path[1:]:
        head = head[p]
    return head


def per_rank(values: list) -> Any:
    """One int when every rank gets the same value, else a tuple indexed by rank."""
    return values[0] if all(v == values[0] for v in values) else tuple(values)


def sharded_or_replicate(dims: dict, origin: dict) -> Any:
    """`Sharded` on `dims`, or REPLICATE when no dim is left sharded."""
    return Sharded.of(dims, origin) if dims else REPLICATE
