"""What a tensor-parallel graph checks when it is called, trained or moved.

`fxtp.transform` installs them on its result, each refusing with a named error rather than
computing a wrong answer: a call fills the inputs the capture fixed and checks the others
against the captured specs (and, with `check_inputs`, across the ranks); a call before
`fxtp.load` of a meta-built graph raises `MetaTensorError`; `train()` refuses a graph whose
dropout was captured off, or whose LoRA is folded; `.to(device)` also moves the lifted constants
and the devices baked into the graph, `.to("meta")` leaves it refusing calls until it is loaded
again, and a dtype other than the captured one raises `DtypeError` before anything moves.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .capture import inputs as captured_inputs
from .capture.export import Captured
from .capture.linear import module_path
from .errors import (
    DropoutError,
    DtypeError,
    InputError,
    LoraStateError,
    MetaTensorError,
)
from .graph.devices import resolve_device, retarget_devices
from .graph.nodes import set_tensor_attr
from .graph.ops import dropout_nodes
from .graph.tensors import floating_param_dtypes, meta_tensors, tensor_attrs
from .rewrite.record import META_KEY
from .runtime import input_check


def guard_training(gm: fx.GraphModule) -> None:
    """`train()` is allowed unless the model has dropout: the capture ran in eval mode, so the
    graph's dropout ops are off, and silently training without dropout would differ from the
    model's own training. `fxtp.for_training(tp, disable_dropout=True)` accepts that."""
    def train(mode: bool = True):
        if mode and gm.meta[META_KEY].state.lora_fold is not None:
            raise LoraStateError("fxtp: the LoRA adapters are folded into the weights (for "
                                 "generation); call fxtp.for_training(tp) or "
                                 "fxtp.unfold_lora(tp) before training")
        if mode and not gm.meta[META_KEY].state.dropout_disabled:
            drops = dropout_nodes(gm)
            if drops:
                n = drops[0]
                p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p")
                raise DropoutError(
                    f"fxtp: the model has dropout (p={p} at {n.name}, module "
                    f"{module_path(n) or '?'}; {len(drops)} dropout op(s) in all), but the "
                    "tensor-parallel graph was captured in eval mode with dropout off. Set the "
                    "dropout probabilities to 0 in the model's config before fxtp.transform "
                    "(RLHF trainers do), or train without dropout on purpose: "
                    "fxtp.for_training(tp, disable_dropout=True).")
        return nn.Module.train(gm, mode)

    gm.train = train
    nn.Module.train(gm, False)     # the graph behaves as in eval mode; say so


def guard_moves(gm: fx.GraphModule) -> None:
    """`tp.to(device)` / `.cuda()` / `.cpu()` move the tensors and point the devices baked into
    the graph by the capture at the new device. A floating dtype other than the captured one
    (`.to(torch.bfloat16)`, `.half()`, ...) raises `DtypeError` before anything moves: the
    graph's casts, masks and constants were recorded in the captured dtype."""
    def refuse(dtype: torch.dtype) -> None:
        have = floating_param_dtypes(gm)
        if dtype is not None and have and have != {dtype}:
            raise DtypeError(
                f"fxtp: the tensor-parallel graph was captured in "
                f"{', '.join(sorted(map(str, have)))} and cannot be cast to {dtype}: its casts, "
                f"masks and constants were recorded in that dtype. Build (or cast) the model in "
                f"{dtype} before fxtp.transform (model.to({dtype}) or from_config(..., "
                f"dtype={dtype})).")

    def to(*args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        refuse(dtype)
        if device is not None:
            if gm.meta[META_KEY].state.lora_fold is not None:
                raise LoraStateError("fxtp: unfold the LoRA adapters (fxtp.unfold_lora(tp) or "
                                     "fxtp.for_training(tp)) before moving the graph to another "
                                     "device; fold them again there")
            device = resolve_device(device)
        nn.Module.to(gm, *args, **kwargs)
        if device is not None:
            # constants lifted from the forward are plain attributes, which Module.to skips
            held = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
            for name, t in tensor_attrs(gm).items():
                if id(t) not in held and t.device != device:
                    set_tensor_attr(gm, name, t.to(device))
            retarget_devices(gm, device)
            if device.type == "meta":   # the values are gone: calls refuse until fxtp.load

                gm.meta[META_KEY].state.unloaded = meta_tensors(gm)
        return gm

    def cast(dtype: torch.dtype):
        def method(*_args, **_kwargs):
            refuse(dtype)
            return gm
        return method

    gm.to = to
    gm.cuda = lambda device=None: to(torch.device("cuda", device) if isinstance(device, int)
                                     else (device or "cuda"))
    gm.cpu = lambda: to("cpu")
    gm.half, gm.bfloat16 = cast(torch.float16), cast(torch.bfloat16)
    gm.float, gm.double = cast(torch.float32), cast(torch.float64)


def guard_meta(gm: fx.GraphModule) -> None:
    """A graph of a model built on the meta device holds no values until `fxtp.load`: calling
    it raises `MetaTensorError` rather than computing on meta tensors. Checks a flag (the
    names recorded at transform/load); rescans only while it is set, so weights assigned by
    other means are noticed."""
    def hook(module, args, kwargs):
        state = module.meta[META_KEY].state
        if state.unloaded:
            state.unloaded = meta_tensors(module)
            if state.unloaded:
                shown = ", ".join(state.unloaded[:5])
                more = f" and {len(state.unloaded) - 5} more" if len(state.unloaded) > 5 else ""
                raise MetaTensorError(
                    f"fxtp: the tensor-parallel model holds {len(state.unloaded)} tensor(s) on "
                    f"the meta device ({shown}{more}): the model was built without weights. "
                    "Fill them with fxtp.load(tp, checkpoint_dir) on every rank first.")

    gm.register_forward_pre_hook(hook, with_kwargs=True)


def install_input_defaults(gm: fx.GraphModule, captured: Captured) -> None:
    """Lets the result be called like the model: fills inputs the capture fixed (use_cache=False,
    an all-ones attention_mask) and names the accepted inputs when a caller passes others.
    Inputs that break a size condition the capture recorded are routed to a graph for their
    sizes (`tp.size_graphs`). With `check_inputs` set (`TPInfo.state`), then compares the
    inputs across the ranks."""
    names = captured.kwarg_names
    defaults = dict(captured.defaults)
    slots = input_check.slot_names(captured.arg_count, names)
    specs = captured_inputs.specs(captured)
    conditions = recorded_conditions(gm)

    def hook(module, args, kwargs):
        info = module.meta[META_KEY]
        if not info.state.check_inputs:
            return fill(module, args, kwargs)
        try:
            args, kwargs = fill(module, args, kwargs)
        except InputError:
            input_check.failed_input(slots, info.group_name, info.rank)   # the others raise too
            raise
        input_check.check_inputs(slots, args, kwargs, info.group_name, info.rank)
        return args, kwargs

    def fill(module, args, kwargs):
        if captured.hf and "attention_mask" in kwargs and kwargs["attention_mask"] is None:
            # Hugging Face's forward reads a None mask as all ones: filled in below
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        if len(args) > captured.arg_count:
            raise InputError(f"fxtp: got {len(args)} positional inputs, captured with "
                             f"{captured.arg_count}; pass inputs as {names or 'positional'}")
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise InputError(f"fxtp: inputs {unknown} were not part of the capture; the "
                             f"transformed model takes {list(names)}. Pass example_inputs with "
                             "them to fxtp.plan/transform to capture them.")
        compiling = torch.compiler.is_compiling()   # a compiled graph guards its inputs itself
        if not compiling:
            first = next(module.parameters(), None)
            captured_inputs.check(specs, args, kwargs,
                                  first.device if first is not None else None, captured.hf)
        missing = [k for k in names if k not in kwargs]
        if missing:
            kwargs = dict(kwargs)
            for k in missing:
                if k in defaults:
                    kwargs[k] = defaults[k]
                elif k == "attention_mask" and captured.hf and "input_ids" in kwargs:
                    kwargs[k] = torch.ones_like(kwargs["input_ids"])
                else:
                    raise InputError(f"fxtp: input {k!r} is required (the model was captured "
                                     "with it)")
        if conditions is not None and not compiling:
            try:
                conditions(module, args, kwargs)
            except InputError as broken:
                sizes = getattr(module, "size_graphs", None)    # fxtp/size_graphs.py
                if sizes is None:
                    raise
                sizes.choose(args, kwargs, broken)      # this call runs another graph
        return args, kwargs

    gm.register_forward_pre_hook(hook, with_kwargs=True)


def recorded_conditions(gm: fx.GraphModule):
    """A check of the conditions on input sizes torch.export recorded (the model's code took one
    path for sizes that meet them: a sequence at most a window), to run before the graph: a
    call that breaks one raises `InputError` quoting it, instead of the graph's bare
    `AssertionError` (and before any rank reaches a collective). None when the graph records
    none. The graph is read once, here, not on every call."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"),
                None)
    spec = getattr(gm, "_in_spec", None)
    if node is None or spec is None:
        return None
    import torch.fx._pytree as fx_pytree

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    at = [placeholders.index(a) if a in placeholders else None for a in node.args]

    def check(module: fx.GraphModule, args: tuple, kwargs: dict) -> None:
        flat = fx_pytree.tree_flatten_spec((args, kwargs), spec)
        try:
            module._guards_fn(*[flat[i] if i is not None else a for i, a in zip(at, node.args)])
        except AssertionError as e:
            raise InputError(f"fxtp: these inputs break a condition the capture recorded ({e}): "
                             "the model's code takes another path for such sizes than for the "
                             "example it was captured with. Pass inputs that meet it, or "
                             "capture with example_inputs of this size.") from e
    return check
