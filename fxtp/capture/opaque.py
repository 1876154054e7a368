"""Submodules torch.export cannot capture, called as one opaque op: partial capture.

A submodule with data-dependent Python (a loop over the experts a batch hits, a loop over the
sequence positions) makes torch.export fail, or fix the sequence length, for the whole model.
`capture` then captures the rest and calls that submodule (every module of its class) as one
op, `fxtp::opaque_call`. The op's operands are the submodule's tensor inputs and its
parameters and buffers, so the graph holds them like any other weight: they are loaded,
saved, moved and trained with the rest. The op runs the submodule's own forward on them
(`torch.func.functional_call` on a weightless copy); its backward runs that forward again
under autograd. No rule shards it: fxtp keeps it replicated and lists it in the plan with the
line that stopped the capture.

    before:  ... -> mixer(hidden, mask) -> ...        (export fails inside mixer)
    after:   ... -> fxtp.opaque_call("backbone.layers.0.mixer#0", [hidden, mask],
                                     [in_proj.weight, conv1d.weight, ...])[0] -> ...

Export needs each output's shape from the inputs' (symbolic) shapes without running the
submodule: the model runs once or twice eagerly first (two batch and sequence sizes for a
Hugging Face model), and each output dim is matched to the input dim (or product of two)
that moved with it, else kept constant.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from .skeleton import skeleton

# (kind, ...): ("const", size) | ("dim", leaf, dim) | ("prod", leaf, dim, leaf, dim)
DimRule = tuple


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple
    dtype: torch.dtype


@dataclass
class Call:
    """One call of an opaque submodule, as recorded eagerly: its input and output leaves."""

    in_shapes: list[Optional[tuple]]          # per input leaf: the shape, None for non-tensors
    out_spec: Any
    out_leaves: list[Any]                      # tensors as TensorMeta, others as values


@dataclass
class OpaquePart:
    """An opaque submodule call: what its op needs to run and to be traced."""

    key: str
    name: str                                   # the submodule's qualified name
    why: str                                    # the line that stopped the capture
    module: nn.Module                           # a weightless copy: its code
    tensor_names: list[str]                     # its parameters and buffers, in operand order
    out_spec: Any = None
    out_consts: list = field(default_factory=list)       # non-tensor output leaves (_TENSOR)
    out_rules: list[tuple[list[DimRule], torch.dtype]] = field(default_factory=list)
    in_spec: Any = None
    in_consts: list = field(default_factory=list)        # non-tensor input leaves (_TENSOR)

    def run(self, inputs: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        leaves = list(self.in_consts)
        it = iter(inputs)
        leaves = [next(it) if c is _TENSOR else c for c in leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        state = dict(zip(self.tensor_names, tensors))
        out = torch.func.functional_call(self.module, state, tuple(args), dict(kwargs))
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def fake(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [t.shape for t in inputs]
        device = inputs[0].device if inputs else torch.device("cpu")
        return [torch.empty([_size(r, shapes) for r in rules], dtype=dtype, device=device)
                for rules, dtype in self.out_rules]


_TENSOR = object()            # marks a tensor leaf among an input's constants
PARTS: dict[str, OpaquePart] = {}


def _size(rule: DimRule, shapes: list) -> Any:
    if rule[0] == "const":
        return rule[1]
    if rule[0] == "dim":
        return shapes[rule[1]][rule[2]]
    return shapes[rule[1]][rule[2]] * shapes[rule[3]][rule[4]]


@torch.library.custom_op("fxtp::opaque_call", mutates_args=())
def opaque_call(key: str, inputs: list[torch.Tensor],
                tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runs the opaque submodule `key` on its tensor inputs and its parameters/buffers."""
    outs = PARTS[key].run(inputs, tensors)
    given = {t.untyped_storage().data_ptr() for t in [*inputs, *tensors] if t.numel()}
    return [t.clone() if t.numel() and t.untyped_storage().data_ptr() in given else t
            for t in outs]


@opaque_call.register_fake
def _opaque_fake(key: str, inputs: list[torch.Tensor],
                 tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return PARTS[key].fake(inputs)


def _setup(ctx, inputs, output) -> None:
    key, ins, tensors = inputs
    ctx.key, ctx.count = key, len(ins)
    ctx.save_for_backward(*ins, *tensors)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    ins, tensors = list(saved[:ctx.count]), list(saved[ctx.count:])
    with torch.enable_grad():
        ins = [t.detach().requires_grad_(t.is_floating_point()) for t in ins]
        tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
        outs = PARTS[ctx.key].run(ins, tensors)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [t for t in ins + tensors if t.requires_grad]
        found = (torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                     allow_unused=True) if pairs and wrt else [None] * len(wrt))
    by_id = {id(t): g for t, g in zip(wrt, found)}
    return (None, [by_id.get(id(t)) for t in ins], [by_id.get(id(t)) for t in tensors])


opaque_call.register_autograd(_backward, setup_context=_setup)


# -- recording the calls eagerly ----------------------------------------------------------------
def record_calls(model: nn.Module, names: set[str],
                 runs: list[Callable[[], Any]]) -> list[dict[str, list[Call]]]:
    """Each run's calls of the modules `names`, in call order."""
    modules = dict(model.named_modules())
    out = []
    for run in runs:
        calls: dict[str, list[Call]] = {n: [] for n in names}
        handles = []
        for n in names:
            def hook(mod, args, kwargs, output, n=n):
                leaves = pytree.tree_leaves((args, kwargs))
                outs, spec = pytree.tree_flatten(output)
                calls[n].append(Call(
                    [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in leaves],
                    spec, [TensorMeta(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor)
                           else x for x in outs]))
            handles.append(modules[n].register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                run()
        finally:
            for h in handles:
                h.remove()
        out.append(calls)
    return out


def _dim_rules(shapes: list[tuple], ins: list[list[Optional[tuple]]]) -> Optional[list[DimRule]]:
    """How each dim of an output follows the inputs over the runs (`shapes[k]` and `ins[k]`
    are run k's output shape and input leaf shapes)."""
    rules = []
    tensor_leaves = [i for i, s in enumerate(ins[0]) if s is not None]
    for d in range(len(shapes[0])):
        values = [s[d] for s in shapes]
        if len(set(values)) == 1 and len(shapes) > 1:
            rules.append(("const", values[0]))
            continue
        dims = [(j, leaf, e) for j, leaf in enumerate(tensor_leaves) for e in range(len(ins[0][leaf]))]
        rule = next((("dim", j, e) for j, leaf, e in dims
                     if [run[leaf][e] for run in ins] == values), None)
        if rule is None:
            rule = next((("prod", j, e, k, f) for (j, a, e), (k, b, f)
                         in itertools.combinations(dims, 2)
                         if [run[a][e] * run[b][f] for run in ins] == values), None)
        if rule is None and len(shapes) == 1:
            rule = ("const", values[0])
        if rule is None:
            return None
        rules.append(rule)
    return rules


@contextlib.contextmanager
def opaque_forwards(model: nn.Module, names: dict[str, str], recorded: list[dict[str, list[Call]]],
                    ) -> Iterator[dict[str, OpaquePart]]:
    """While the body runs (an export), the modules `names` (name -> why) call their op."""
    modules = dict(model.named_modules())
    made: dict[str, OpaquePart] = {}
    originals = {}
    for name, why in names.items():
        mod = modules[name]
        tensor_names = [k for k, _ in itertools.chain(mod.named_parameters(), mod.named_buffers())]
        copy = skeleton(mod, {k for k, _ in mod.named_buffers()})
        count = itertools.count()

        def forward(*args, _mod=mod, _name=name, _why=why, _copy=copy, _names=tensor_names,
                    _count=count, **kwargs):
            i = next(_count)
            calls = [run[_name][i] for run in recorded]
            leaves, spec = pytree.tree_flatten((args, kwargs))
            key = f"{_name}#{i}:{id(made)}"
            rules = []
            for k, leaf in enumerate(calls[0].out_leaves):
                if isinstance(leaf, TensorMeta):
                    r = _dim_rules([c.out_leaves[k].shape for c in calls],
                                   [c.in_shapes for c in calls])
                    if r is None:
                        raise OpaqueShapeError(_name, k)
                    rules.append((r, leaf.dtype))
            part = OpaquePart(key, _name, _why, _copy, list(_names), calls[0].out_spec,
                              [_TENSOR if isinstance(x, TensorMeta) else x
                               for x in calls[0].out_leaves], rules, spec,
                              [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves])
            PARTS[key] = made[key] = part
            state = dict(itertools.chain(_mod.named_parameters(), _mod.named_buffers()))
            outs = iter(torch.ops.fxtp.opaque_call(
                key, [x for x in leaves if isinstance(x, torch.Tensor)], [state[k] for k in _names]))
            out = [next(outs) if c is _TENSOR else c for c in part.out_consts]
            return pytree.tree_unflatten(out, part.out_spec)

        originals[name] = mod.__dict__.get("forward")
        mod.forward = forward
    try:
        yield made
    finally:
        for name, old in originals.items():
            if old is None:
                del modules[name].forward
            else:
                modules[name].forward = old


class OpaqueShapeError(Exception):
    """An output size of an opaque submodule follows no input size."""

    def __init__(self, name: str, leaf: int):
        super().__init__(f"output {leaf} of {name} has a size that follows none of its inputs'")


def culprit(error: BaseException, model: nn.Module) -> Optional[str]:
    """The innermost submodule (not the model itself) whose code was running when `error`
    was raised, from the frames of its traceback."""
    names = {id(m): n for n, m in model.named_modules() if n}
    found, tb = None, error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def same_class(model: nn.Module, name: str) -> list[str]:
    """Every submodule of the class of `name` (the same code fails the same way)."""
    modules = dict(model.named_modules())
    cls = type(modules[name])
    return [n for n, m in modules.items() if n and type(m) is cls]
