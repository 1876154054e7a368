"""The tensors a graph holds, and copies of a graph that choose what its tensors become: the
same tensors (no weight copied), meta tensors of the same shapes (a plan kept without its
weights), or its own copies (a result sharing nothing with the user's model)."""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional

import torch
from torch import fx, nn

from .nodes import get_tensor_attr, set_tensor_attr


def tensor_attrs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the module holds, by every name: parameters, buffers and plain tensor
    attributes that the graph reads (`get_attr`), tied ones under each of their names."""
    out = {**dict(gm.named_parameters(remove_duplicate=False)),
           **dict(gm.named_buffers(remove_duplicate=False))}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in out:
            t = get_tensor_attr(gm, n.target)
            if isinstance(t, torch.Tensor):
                out[n.target] = t
    return out


def floating_param_dtypes(gm: nn.Module) -> set[torch.dtype]:
    """The floating dtypes of the parameters: the dtype the model was built and captured in
    (buffers may differ on purpose: rotary `inv_freq` stays fp32 in a bf16 model)."""
    return {p.dtype for p in gm.parameters() if p.dtype.is_floating_point}


def deepcopy_graph(gm: fx.GraphModule, memo: dict) -> fx.GraphModule:
    """`copy.deepcopy(gm, memo)`: `memo` maps tensors to what the copy holds instead (the
    same tensor: no weight copied; a meta tensor: shapes only)."""
    with warnings.catch_warnings():
        # torch's own pytree spec pickling warns about its deprecated LeafSpec; not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, memo)


def own_tensors(gm: fx.GraphModule, full: dict[int, torch.Tensor],
                 on_read: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Gives the rewritten graph its own copy of every tensor it still shares with the capture
    (what it keeps whole: norms, replicated linears, buffers): training or folding LoRA into
    `tp` must not write into the user's model. Sliced tensors are new already. Peak memory:
    the model (the user's) plus this rank's shard. `on_read` sees each tensor copied."""
    copies: dict[int, torch.Tensor] = {}
    for name, t in tensor_attrs(gm).items():
        if id(t) in full:
            if id(t) not in copies:
                if on_read is not None:
                    on_read(t)
                with torch.no_grad():
                    copies[id(t)] = t.detach().clone()
            set_tensor_attr(gm, name, copies[id(t)])


def meta_tensors(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters and buffers of `module` still on the meta device."""
    return tuple(n for n, t in [*module.named_parameters(remove_duplicate=False),
                                *module.named_buffers(remove_duplicate=False)]
                 if t.device.type == "meta")
