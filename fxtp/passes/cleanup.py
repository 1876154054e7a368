"""Final tidy-up: joins biases back into their linears where they stayed local, drops dead
code, checks and recompiles the graph."""
from __future__ import annotations

import torch
from torch import fx

from ..patterns.linear import BIAS_META

aten = torch.ops.aten


def fuse_biases(gm: fx.GraphModule) -> None:
    """add(linear(x, W), b) -> linear(x, W, b); add(mm(x, W), b) -> addmm(b, x, W)."""
    g = gm.graph
    for add in list(g.nodes):
        if add.op != "call_function" or BIAS_META not in add.meta:
            continue
        mm, bias = add.args
        if not isinstance(mm, fx.Node) or mm.name != add.meta[BIAS_META] or len(mm.users) != 1:
            continue
        x, w = mm.args[:2]
        if mm.target == aten.linear.default:
            mm.args = (x, w, bias)
        elif mm.target == aten.mm.default:
            mm.target, mm.args = aten.addmm.default, (bias, x, w)
        else:
            continue
        add.replace_all_uses_with(mm)
        g.erase_node(add)


def cleanup(gm: fx.GraphModule) -> None:
    fuse_biases(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
