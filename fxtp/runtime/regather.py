"""Sequence parallelism's all-gathered activations are gathered again in backward, not saved.

The readers of an all-gathered sequence (the column-parallel linears after a norm, a
replicated output projection) save their input for backward: the whole sequence, N times
what the rank's own tokens take. As Megatron-LM does, the forward keeps only the rank's
tokens and the backward gathers them again when a reader needs them. Here that is a pair of
saved-tensor hooks around `tp`'s forward (`install`): a tensor saved for backward that is
(a view of) an all-gather's output made in this forward is packed as the gather's record
plus the view's geometry; unpacking gathers once for all the readers of that output (q, k
and v share one gather) and hands each its view. The record is dropped when its last reader
has unpacked it.

Only eager training calls use the hooks: without gradients nothing is saved, and under
`torch.compile` AOT autograd decides what its compiled backward saves. Saved-tensor hooks
the caller already has on (activation checkpointing, offloading) are left on top: they
decide what is kept, and these stay off. Hooks that want the regather too call `_pack` and
`_unpack` from theirs (`fxtp.testing.memory` does, to count what is saved).
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

import torch
from torch import nn

_forward = threading.local()      # .gathers: storage id -> _Gathered, during a forward


class _Gathered:
    """One all-gather's inputs, to do it again in backward; its result kept while readers
    that packed it have not unpacked it yet."""

    __slots__ = ("shard", "again", "pending", "full", "made")

    def __init__(self, shard: torch.Tensor, again: Callable[[torch.Tensor], torch.Tensor],
                 made: torch.Tensor):
        self.shard, self.again = shard, again
        # the gathered tensor itself, weakly: memory freed and reused within the forward must
        # not be taken for it
        self.made = weakref.ref(made)
        self.pending = 0
        self.full: Optional[torch.Tensor] = None

    def unpack(self) -> torch.Tensor:
        if self.full is None:
            with torch.no_grad():
                self.full = self.again(self.shard)
        full = self.full
        self.pending -= 1
        if self.pending <= 0:
            self.full = None            # a second backward (retain_graph) gathers again
        return full


def note_gathered(shard: torch.Tensor, full: torch.Tensor,
                  again: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Called by an all-gather with gradients: `full` can be made again from `shard` by
    `again`. Does nothing outside `install`'s hooks."""
    if torch.compiler.is_compiling():
        return
    gathers = getattr(_forward, "gathers", None)
    if gathers is not None:
        gathers[full.untyped_storage().data_ptr()] = _Gathered(shard.detach(), again, full)


def _pack(t: torch.Tensor):
    gathers = getattr(_forward, "gathers", None)
    if not gathers or t.device.type == "meta":
        return t
    rec = gathers.get(t.untyped_storage().data_ptr())
    made = rec.made() if rec is not None else None
    if (made is None or made.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            or made.dtype != t.dtype):
        return t
    rec.pending += 1
    return (rec, t.shape, t.stride(), t.storage_offset())


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    rec, shape, stride, offset = packed
    return rec.unpack().as_strided(shape, stride, offset)


def _hooks_on() -> bool:
    """Whether saved-tensor hooks are on already (the caller's)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False) is not None
    except TypeError:          # older torch: no ignore_is_tracing argument
        return top() is not None


def install(module: nn.Module, enabled: Callable[[], bool] = lambda: True) -> None:
    """Runs `module`'s eager training calls under the hooks (entered before the forward,
    left after it, even when it raises) while `enabled()` says so."""
    hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
    state = threading.local()

    def enter(_module, _args, _kwargs):
        if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not enabled():
            return
        if getattr(_forward, "gathers", None) is not None:   # a nested call: already on
            return
        _forward.gathers = {}
        state.entered = "registry"
        if not _hooks_on():
            hooks.__enter__()
            state.entered = "hooks"

    def leave(_module, _args, _kwargs, _output):
        if torch.compiler.is_compiling():
            return
        entered = getattr(state, "entered", None)
        if entered:
            state.entered = None
            _forward.gathers = None
            if entered == "hooks":
                hooks.__exit__(None, None, None)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True, always_call=True)
