"""Capturing a weightless model as if it lived on a device.

A skeleton (capture/skeleton.py) holds meta tensors. Captured as they are, model code that
branches on the device (`if x.device.type == "cpu"`, `x.is_cuda`) takes the meta side, which
is the non-CPU side: DeepSeek-V4 then counts with an int32 `histc` that the CPU lacks, and the
graph fails where it runs. Here the meta tensors become fake tensors *on the device the graph
will run on* for the length of the capture: no memory, no values, but every device check
answers as it would for the real tensors.

    with faked_on(skel, example, tp_device) as fake_example:
        captured = capture(skel, fake_example)     # graph attrs: fake tensors on tp_device
    unfake(captured.gm, skel)                      # graph attrs: the skeleton's meta tensors

The skeleton is left as it was (its meta tensors restored), even when the capture raises.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree

from ..graph.tensors import tensor_attrs


@contextlib.contextmanager
def faked_on(model: nn.Module, example: Any, device: torch.device, *,
             active: bool = False) -> Iterator[Any]:
    """Within: `model`'s meta parameters and buffers are fake tensors on `device` (tied ones
    stay tied), and the yielded `example` has its meta tensors faked alike; real tensors stay
    as they are. torch.export takes the fake mode from the inputs. `active`: the fake mode is
    entered too, so that tensors made within (a KV cache, inputs) are fake as well. A `device`
    of meta changes nothing."""
    if device.type == "meta":
        yield example
        return
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return t
        if id(t) not in made:
            f = mode.fake_tensor_converter.from_meta_and_device(mode, t, device)
            made[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) \
                if isinstance(t, nn.Parameter) else f
        return made[id(t)]

    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None and t.device.type == "meta":
                        swapped.append((table, name, t))
                        table[name] = fake(t)
        faked = pytree.tree_map_only(torch.Tensor, fake, example)
        with mode if active else contextlib.nullcontext():
            yield faked
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t


def unfake(gm: fx.GraphModule, model: nn.Module) -> None:
    """Gives `gm` (captured within `faked_on`) the model's own meta tensors back, by name, and
    a meta tensor of the same shape for any other fake tensor it holds (a constant made during
    the capture), so that the graph holds no tensor of a finished fake mode."""
    own = {**dict(model.named_parameters(remove_duplicate=False)),
           **dict(model.named_buffers(remove_duplicate=False))}
    metas: dict[int, torch.Tensor] = {}
    for name, t in tensor_attrs(gm).items():
        if not isinstance(t, FakeTensor):      # a Parameter of a fake tensor is one too
            continue
        if name in own and own[name].shape == t.shape:
            _store(gm, name, own[name])
            continue
        if id(t) not in metas:
            m = torch.empty(t.shape, dtype=t.dtype, device="meta")
            metas[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) \
                if isinstance(t, nn.Parameter) else m
        _store(gm, name, metas[id(t)])


def _store(gm: fx.GraphModule, qualname: str, t: torch.Tensor) -> None:
    """Puts `t` itself (not a new Parameter around it) under `qualname`."""
    owner_name, _, leaf = qualname.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    for table in (owner._parameters, owner._buffers):
        if leaf in table:
            table[leaf] = t
            return
    setattr(owner, leaf, t)
