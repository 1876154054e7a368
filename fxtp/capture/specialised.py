"""Sizes a capture fixed: with `Dim.AUTO`, torch.export quietly turns a batch or sequence dim
into a constant when the model's code needs one (a Python loop over the positions,
`for i in range(seq_len)`). The graph then fails on the next input of another size, deep
inside, with a guard's `AssertionError`. fxtp notices at capture time instead: it records
where each size was fixed (the model's source line and the submodule running it), and
`capture` either captures that submodule as an opaque call or raises `CaptureError` naming
the line.

    with recording(model) as fixed:
        ep = torch.export.export(...)
    fixed_token_dims(gm)     # [("input_ids", 1, 8)]: dims of the token inputs that became constants
    fixed[0].where           # "modeling_mamba.py:261 in slow_forward: `for index in range(seq_len):`"
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import fx, nn

# the inputs of a Hugging Face model whose dims 0 and 1 are batch and sequence
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                "decoder_input_ids", "decoder_attention_mask")
_TORCH = os.path.dirname(torch.__file__)
_FXTP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Fixed:
    """A size symbol the capture replaced by a constant, and the model code that did it."""

    symbol: str
    value: int
    where: str                 # "path:line in func: `code`" of the model's code, or ""
    module: Optional[str]      # the innermost submodule running it ("" for the root), or None


def _user_frame(frame) -> Optional[str]:
    import linecache

    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith((_TORCH, _FXTP)) and "<" not in path:
            code = linecache.getline(path, frame.f_lineno).strip()
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}: `{code}`"
        frame = frame.f_back
    return None


def _module_of(frame, names: dict[int, str]) -> Optional[str]:
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            return names[id(owner)]
        frame = frame.f_back
    return None


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[list[Fixed]]:
    """Records every size symbol set to a constant while the body runs (an export of
    `model`). Uses the symbolic-shape environment's replacement hook; where torch has no such
    hook, nothing is recorded (the fixed dims are still found from the graph)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fixed: list[Fixed] = []
    original = getattr(ShapeEnv, "_set_replacement", None)
    if original is None:   # pragma: no cover - another torch
        yield fixed
        return
    names = {id(m): name for name, m in model.named_modules()}

    def set_replacement(self, a, tgt, msg):
        if getattr(tgt, "is_number", False) and getattr(tgt, "is_integer", False):
            frame = sys._getframe(1)
            fixed.append(Fixed(str(a), int(tgt), _user_frame(frame) or "",
                               _module_of(frame, names)))
        return original(self, a, tgt, msg)

    ShapeEnv._set_replacement = set_replacement
    try:
        yield fixed
    finally:
        ShapeEnv._set_replacement = original


def fixed_token_dims(gm: fx.GraphModule) -> list[tuple[str, int, int]]:
    """(input, dim, size) for each batch or sequence dim of a token input that the captured
    graph holds as a constant."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder" or n.name not in TOKEN_INPUTS:
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            out += [(n.name, d, int(s)) for d, s in enumerate(val.shape[:2]) if _constant(s)]
    return out


def _constant(size) -> bool:
    if isinstance(size, torch.SymInt):
        return bool(size.node.expr.is_number)
    return isinstance(size, int)


def cause(fixed: list[Fixed], size: int) -> Optional[Fixed]:
    """The first recorded fixing to `size` that points at model code."""
    return next((f for f in fixed if f.value == size and f.where), None)


def size_conditions(gm: fx.GraphModule) -> list[str]:
    """The conditions on input sizes torch.export recorded in the graph's guard function that
    are ranges (`x.size()[1] > 4`: the model's code took one path for such sizes), as torch
    words them; checked at every call (`guards.recorded_conditions`), listed
    in the plan. Read from the generated function's constants; [] where torch keeps them
    elsewhere."""
    guards = getattr(gm, "_guards_fn", None)
    forward = getattr(guards, "forward", None)
    texts: list[str] = []
    for cell in getattr(forward, "__closure__", None) or ():
        code = getattr(cell.cell_contents, "__code__", None)
        if code is not None:
            texts += _strings(code)
    prefix = "Guard failed: "
    out = [t[len(prefix):] for t in texts if t.startswith(prefix)]
    return [c for c in dict.fromkeys(out) if _a_range(c)]


def _strings(code) -> list[str]:
    out = []
    for c in code.co_consts:
        if isinstance(c, str):
            out.append(c)
        elif hasattr(c, "co_consts"):
            out += _strings(c)
    return out


def _a_range(condition: str) -> bool:
    """`x.size()[1] > 4`, `(8 - s % 8) % 8 <= 0`: sizes the model's code branched on. Not the
    equalities (a static dim, inputs of one batch and length, `use_cache == False`), which the
    input specs check already."""
    return any(op in condition for op in ("<", ">", "!="))
