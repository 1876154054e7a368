"""What the tensor-parallel graph may be called with: the inputs it was captured for.

`torch.export` specialises the graph to the example inputs' ranks, dtypes, static sizes and
non-tensor values, and ties dims that had one size (a mask's sequence to the ids'). A call that
breaks one of these failed deep inside the graph with a bare `IndexError`, `RuntimeError` or a
guard's `AssertionError`; `check` raises `InputError` naming the input and what to pass instead,
before anything runs (so nothing changes and no rank reaches a collective). (Whether the ranks
were given the same inputs is `input_check.py`'s question, with `check_inputs=True`.)

    s = specs(captured)                    # once, at transform: from the captured placeholders
    check(s, args, kwargs, device)         # every call, in the input hook: a few attribute reads
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError
from .export import Captured

_EMBEDDING = (torch.ops.aten.embedding.default,)


@dataclass(frozen=True)
class InputSpec:
    """One leaf input of the capture (a positional index or a keyword name)."""

    key: Any                         # int: positional index, str: keyword
    tensor: bool
    dtype: Optional[torch.dtype] = None
    sizes: tuple = ()                # int (static) or str (a symbol shared by tied dims)
    indices: bool = False            # read as embedding indices (token ids): integer only
    value: Any = None                # a non-tensor input's captured value

    @property
    def label(self) -> str:
        return f"input {self.key}" if isinstance(self.key, int) else str(self.key)


def specs(captured: Captured) -> list[InputSpec]:
    """The leaf inputs of the captured graph (inputs that are containers are not checked)."""
    gm = captured.gm
    spec = getattr(gm, "_in_spec", None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if spec is None or spec.num_children != 2:
        return []
    arg_spec, kw_spec = spec.children()
    keys = [*range(arg_spec.num_children), *(kw_spec.context or [])]
    out, at = [], 0
    for key, child in zip(keys, [*arg_spec.children(), *kw_spec.children()]):
        if child.is_leaf() and at < len(placeholders):
            out.append(_spec(key, placeholders[at]))
        at += child.num_leaves
    return [s for s in out if s is not None]


def _spec(key: Any, node) -> Optional[InputSpec]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        sizes = tuple(int(s) if not isinstance(s, torch.SymInt) else
                      (str(s.node.expr) if s.node.expr.is_Symbol else None) for s in val.shape)
        indices = any(u.op == "call_function" and u.target in _EMBEDDING and len(u.args) > 1
                      and u.args[1] is node for u in node.users)
        return InputSpec(key, True, val.dtype, sizes, indices)
    if val is None or isinstance(val, (bool, int, float, str)):
        return InputSpec(key, False, value=val)
    return None


def check(specs: list[InputSpec], args: tuple, kwargs: dict, device: Optional[torch.device],
          hf: bool = False) -> None:
    """Raises InputError for the first input the graph was not captured for."""
    seen: dict[str, tuple[str, int, int]] = {}      # symbol -> (input, dim, size)
    for s in specs:
        if isinstance(s.key, int):
            if s.key >= len(args):
                continue
            v = args[s.key]
        elif s.key in kwargs:
            v = kwargs[s.key]
        else:
            continue
        if not s.tensor:
            if isinstance(v, torch.Tensor) or not (v is s.value or (
                    isinstance(v, (bool, int, float, str)) and v == s.value)):
                raise InputError(
                    f"fxtp: {s.label}={v!r}, but the graph was captured with "
                    f"{s.label}={s.value!r} (a non-tensor input is fixed by the capture"
                    + ("; the tensor-parallel forward has no KV cache: generate with "
                       "fxtp.generator(model, ws)" if s.key == "use_cache" else "")
                    + f"). Pass {s.value!r} or leave it out.")
            continue
        _check_tensor(s, v, device, seen)
    if hf:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
                and mask.dim() == 2 and ids.shape != mask.shape):
            raise InputError(f"fxtp: attention_mask has shape {list(mask.shape)} but input_ids "
                             f"{list(ids.shape)}: give one mask entry per token ([batch, seq])")


def _check_tensor(s: InputSpec, v: Any, device: Optional[torch.device],
                  seen: dict[str, tuple[str, int, int]]) -> None:
    want = f"a tensor of {len(s.sizes)} dims ({_shape(s.sizes)}), dtype {s.dtype}"
    if not isinstance(v, torch.Tensor):
        raise InputError(f"fxtp: {s.label} must be {want} as captured, got "
                         f"{type(v).__name__}" + (": wrap it in torch.tensor(...)"
                                                  if isinstance(v, (list, tuple)) else ""))
    if v.dim() != len(s.sizes):
        raise InputError(f"fxtp: {s.label} has {v.dim()} dims (shape {list(v.shape)}); the graph "
                         f"was captured with {want}. Reshape it (e.g. input_ids[None] for one "
                         "sequence) or capture again with example_inputs of this shape.")
    if s.indices:
        if v.dtype not in (torch.int64, torch.int32):
            raise InputError(f"fxtp: {s.label} is {v.dtype}, but it holds embedding indices "
                             "(token ids): pass torch.long (or torch.int32) ids")
    elif s.dtype.is_floating_point or s.dtype.is_complex:
        if v.dtype != s.dtype:
            raise InputError(f"fxtp: {s.label} is {v.dtype}, the graph was captured with "
                             f"{s.dtype} (its casts were recorded for that dtype): pass "
                             f"{s.label}.to({s.dtype})")
    elif v.dtype.is_complex:
        raise InputError(f"fxtp: {s.label} is {v.dtype}, captured as {s.dtype}")
    if device is not None and v.device != device:
        raise InputError(f"fxtp: {s.label} is on {v.device}, the tensor-parallel model on "
                         f"{device}: move it there first (.to({str(device)!r}))")
    for d, (size, want_size) in enumerate(zip(v.shape, s.sizes)):
        if isinstance(want_size, int):
            if size != want_size:
                raise InputError(f"fxtp: {s.label} has size {size} in dim {d} (shape "
                                 f"{list(v.shape)}); the graph was captured with {want_size} "
                                 f"there ({_shape(s.sizes)}): pass that size, or capture with "
                                 "example_inputs of the size you need.")
        elif want_size is not None:
            if size < 1:
                raise InputError(f"fxtp: {s.label} is empty in dim {d} (shape {list(v.shape)}); "
                                 "pass at least one element there (one sequence, one token)")
            other = seen.setdefault(want_size, (s.label, d, size))
            if other[2] != size:
                raise InputError(
                    f"fxtp: {s.label} has size {size} in dim {d} but {other[0]} has "
                    f"{other[2]} in dim {other[1]}; the model takes them equal (e.g. one "
                    "attention_mask entry per token)")


def _shape(sizes: tuple) -> str:
    return "[" + ", ".join(str(s) if isinstance(s, int) else "any" for s in sizes) + "]"
