"""Small graph helpers shared by the passes."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def get_arg(node: fx.Node, path: tuple) -> Any:
    head = node.args[path[0]] if isinstance(path[0], int) else node.kwargs[path[0]]
    for p in path[1:]:
        head = head[p]
    return head


def arg_or_kwarg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """The argument an op takes at position `i` or by keyword `name` (`default` if absent)."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def set_arg(node: fx.Node, path: tuple, value: Any) -> None:
    """Replaces the argument at `path` ((i,), (i, j) into a list arg, or (kwarg name,))."""
    def replace(container, rest):
        if not rest:
            return value
        items = list(container)
        items[rest[0]] = replace(items[rest[0]], rest[1:])
        return type(container)(items) if isinstance(container, tuple) else items

    if isinstance(path[0], int):
        args = list(node.args)
        args[path[0]] = replace(args[path[0]], path[1:])
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[path[0]] = replace(kwargs[path[0]], path[1:])
        node.kwargs = kwargs


def set_tensor_attr(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """Stores `value` under the same qualified name, as a parameter, buffer or plain attribute.

    Aliases of the old tensor elsewhere in the module tree (tied weights registered under two
    names) are replaced too, so they stay tied and the full tensor is not kept alive."""
    owner_name, _, leaf = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, leaf)
    if leaf in owner._parameters:
        new = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        new = value
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is old:
                    table[name] = new
    if leaf not in owner._parameters and leaf not in owner._buffers:
        setattr(owner, leaf, new)


def get_tensor_attr(gm: fx.GraphModule, qualname: str) -> torch.Tensor:
    owner_name, _, leaf = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return getattr(owner, leaf)


def index_runs(index: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Runs (start, length) of consecutive indices, in the order kept: the compact form of the
    global indices a rank holds of a sliced tensor (one run per piece of each fused chunk)."""
    runs: list[tuple[int, int]] = []
    for i in index.tolist():
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return tuple(runs)


def runs_index(runs: tuple[tuple[int, int], ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The indices of `runs`, on `device`."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in runs])


def written_in_place(gm: fx.GraphModule) -> set[str]:
    """Tensor attributes the graph writes in place (an op whose schema marks that argument as
    written: the static KV cache's `index_copy_`): state, not weights."""
    out: set[str] = set()
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None:
            continue
        for i, a in enumerate(n.args[:len(schema.arguments)]):
            info = schema.arguments[i].alias_info
            if isinstance(a, fx.Node) and a.op == "get_attr" and info is not None and info.is_write:
                out.add(a.target)
    return out
