"""Activation bytes autograd saves for backward, counted in one forward: how the tests and
bench/activations.py measure sequence parallelism's memory.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..runtime import regather


def saved_activation_bytes(module: nn.Module, forward: Callable[[], Any],
                           width: int) -> dict[str, int]:
    """Bytes of the activations saved while `forward()` runs (each storage once; `module`'s
    parameters and views of them not counted): "total", "width" (tensors of at most 3 dims
    whose last dim is `width`: the hidden states every rank holds whole without sequence
    parallelism) and "square" (4-dim tensors whose last two dims are equal and dynamic-sized:
    masks and attention weights over [s, s]); "width_by_tokens" splits "width" by the tensors'
    token counts (elements / width), which tells a sequence shard from a sharded activation
    that happens to have the same width. An input that fxtp's regather hooks keep as the
    rank's tokens (to gather again in backward) counts as those tokens. Returns the counts
    and the forward's result under "output"."""
    seen = {(p.untyped_storage().data_ptr(), p.dtype) for p in module.parameters()}
    counts: dict = {"total": 0, "width": 0, "square": 0, "width_by_tokens": {}}

    def count(t: torch.Tensor) -> None:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key in seen or t.device.type == "meta":
            return
        seen.add(key)
        n = t.untyped_storage().nbytes()
        counts["total"] += n
        if t.dim() <= 3 and t.dim() and t.shape[-1] == width:
            counts["width"] += n
            tokens = counts["width_by_tokens"]
            tokens[t.numel() // width] = tokens.get(t.numel() // width, 0) + n
        if t.dim() == 4 and t.shape[-1] == t.shape[-2] > 1:
            counts["square"] += n

    def pack(t: torch.Tensor):
        out = regather._pack(t)      # what fxtp's regather keeps (its hooks step aside)
        count(out[0].shard if isinstance(out, tuple) else out)
        return out

    with torch.autograd.graph.saved_tensors_hooks(pack, regather._unpack):
        out = forward()
    return {**counts, "output": out}
