"""A second graph that runs on `tp`'s own tensors: built from `tp`'s weightless skeleton (the
decode step of `tp.generate`, a graph for input sizes the capture did not hold for), it gets
no copy of the weights. Each parameter, and each buffer `tp` holds under the same name, is
`tp`'s tensor object (the two plans must have given it the same slice, checked); the graph's
other tensors (a KV cache, constants) are its own and follow `tp`'s device.

    shared = SharedTensors.match(tp, graph, own={"cache_0"}, refuse=refuse)   # refuse(text)
    shared.bind(tp)      # before each call: cheap identity checks; redone after fxtp.load or .to

Because the tensors are shared, optimizer steps on `tp` are what the graph computes with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NoReturn, Optional

import torch
from torch import fx

from .capture.export import model_device
from .graph.devices import retarget_devices
from .graph.nodes import get_tensor_attr, set_tensor_attr
from .graph.tensors import tensor_attrs
from .rewrite.record import META_KEY

SHOWN = 5


def slice_text(rec) -> str:
    if rec is None:
        return "the whole tensor"
    dim, runs = rec
    return f"dim {dim} runs {list(runs)[:4]}"


@dataclass
class SharedTensors:
    """Which of `graph`'s tensors are `tp`'s, and which are its own (see the module doc)."""

    graph: fx.GraphModule
    shared: list = field(default_factory=list)      # (table, leaf, name, is_param)
    shapes: dict = field(default_factory=dict)      # name -> the shape it was built for
    own: list = field(default_factory=list)         # the graph's own tensors
    zeros: frozenset = frozenset()                  # own tensors made as zeros on tp's device
    device: Optional[torch.device] = None

    @classmethod
    def match(cls, tp: fx.GraphModule, graph: fx.GraphModule, own: set,
              refuse: Callable[[list[str]], NoReturn]) -> "SharedTensors":
        """Records which of `graph`'s tensors are `tp`'s (same local shape, same slice of the
        full tensor by the two plans' records) and which are its own (`own`: made as zeros on
        `tp`'s device when they are meta; buffers `tp` lacks). `refuse(problems)` raises the
        caller's error when something can be neither."""
        info, graph_info = tp.meta[META_KEY], graph.meta[META_KEY]
        mine = {**dict(tp.named_parameters(remove_duplicate=False)),
                **dict(tp.named_buffers(remove_duplicate=False))}
        params = dict(graph.named_parameters(remove_duplicate=False))
        buffers = dict(graph.named_buffers(remove_duplicate=False))
        out = cls(graph, zeros=frozenset(own))
        problems: list[str] = []
        for name, t in {**buffers, **params}.items():
            if name in own:
                continue
            src = mine.get(name)
            if src is None:
                if name in params:
                    problems.append(f"{name}: not a parameter of tp")
                elif t.device.type == "meta":
                    problems.append(f"{name}: tp does not hold this buffer and the model's has no "
                                    "value (built on the meta device)")
                else:
                    out.own.append(name)
                continue
            if src.shape != t.shape:
                problems.append(f"{name}: {tuple(src.shape)} in tp, {tuple(t.shape)} here")
            elif info.param_slices.get(name) != graph_info.param_slices.get(name):
                problems.append(f"{name}: sliced differently (tp keeps "
                                f"{slice_text(info.param_slices.get(name))}, this graph "
                                f"{slice_text(graph_info.param_slices.get(name))})")
            else:
                owner_name, _, leaf = name.rpartition(".")
                owner = graph.get_submodule(owner_name) if owner_name else graph
                table = owner._parameters if name in params else owner._buffers
                out.shared.append((table, leaf, name, name in params))
                out.shapes[name] = t.shape
        held = set(params) | set(buffers)
        for name, t in tensor_attrs(graph).items():
            if name in held or name in own:
                continue
            if t.device.type == "meta":
                problems.append(f"{name}: a constant computed in the forward, without a value on "
                                "the weightless skeleton")
            else:
                out.own.append(name)
        if problems:
            refuse(problems)
        out.own.extend(own)
        return out

    def bind(self, tp: fx.GraphModule, replaced: Callable[[str, str], NoReturn]) -> None:
        """Points the shared slots at `tp`'s current tensors (new ones after `fxtp.load`;
        `tp.to` keeps parameter objects but makes new buffers) and moves the graph's own
        tensors and graph devices to `tp`'s device. Cheap when nothing changed: identity
        checks. `replaced(name, what)` raises when `tp`'s tensor is gone or reshaped."""
        params = dict(tp.named_parameters(remove_duplicate=False))
        buffers = dict(tp.named_buffers(remove_duplicate=False))
        for table, leaf, name, is_param in self.shared:
            src = (params if is_param else buffers).get(name)
            if src is None or src.shape != self.shapes[name]:
                replaced(name, "gone" if src is None else str(tuple(src.shape)))
            if table[leaf] is not src:
                table[leaf] = src
        dev = model_device(tp)
        if dev == self.device:
            return
        for name in self.own:
            t = get_tensor_attr(self.graph, name)
            if t.device == dev:
                continue
            if name in self.zeros and t.device.type == "meta":
                t = torch.zeros(t.shape, dtype=t.dtype, device=dev)
            set_tensor_attr(self.graph, name, t.to(dev))
        retarget_devices(self.graph, dev)
        self.device = dev
