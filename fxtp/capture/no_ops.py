"""Drops the ops a capture leaves that do nothing (casts to the same dtype, whole slices, ...).
"""
from __future__ import annotations

import torch
from torch import fx

from ..graph.devices import graph_modules

aten = torch.ops.aten


_TO = {aten.to.dtype, aten.to.device, aten.to.dtype_layout}
_WHOLE = 2 ** 62       # export writes "to the end" as sys.maxsize


def drop_no_ops(gm: fx.GraphModule) -> None:
    """Removes what export records but eager code skips: dtype/device checks
    (`_assert_tensor_metadata`), casts to the dtype and device a tensor already has, slices of a
    whole dimension. Each is a few microseconds of dispatch per call and a model has several
    per layer. A no-op cast returns its input itself and a whole slice views all of it, so the
    input stands in for either, in-place writes included. Nodes that fxtp's own passes
    annotated are left alone. Graphs nested in higher-order ops (`wrap_with_set_grad_enabled`)
    too: their checks name the capture's device. Recompiles each module it changed."""
    for g in graph_modules(gm):
        removed = 0
        for n in list(g.graph.nodes):
            if n.op != "call_function" or any(k.startswith("fxtp") for k in n.meta):
                continue
            if n.target == aten._assert_tensor_metadata.default:
                g.graph.erase_node(n)
                removed += 1
                continue
            if _is_no_op(n):
                n.replace_all_uses_with(n.args[0])
                g.graph.erase_node(n)
                removed += 1
        if removed:
            g.recompile()


def _is_no_op(n: fx.Node) -> bool:
    src = n.args[0] if n.args else None
    if not isinstance(src, fx.Node):
        return False
    out, inp = n.meta.get("val"), src.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    if n.target in _TO:
        return (not n.kwargs.get("copy", False) and n.kwargs.get("memory_format") is None
                and (out.dtype, out.device, out.layout) == (inp.dtype, inp.device, inp.layout))
    if n.target == aten.slice.Tensor:
        args = n.args
        start = args[2] if len(args) > 2 else n.kwargs.get("start")
        end = args[3] if len(args) > 3 else n.kwargs.get("end")
        step = args[4] if len(args) > 4 else n.kwargs.get("step", 1)
        return start in (0, None) and (end is None or (isinstance(end, int) and end >= _WHOLE)) \
            and step == 1
    return False
