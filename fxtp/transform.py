"""fxtp.plan and fxtp.transform: capture, solve, rewrite for this rank."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import fx, nn

from . import captured_inputs, input_check
from .capture import Captured, capture
from .errors import (DropoutError, DtypeError, InputError, LoraStateError, MetaTensorError,
                     NotDivisibleError, PlanOverrideError)
from .graph_tensors import (deepcopy_graph, floating_param_dtypes, own_tensors, shapes_only,
                            tensor_attrs)
from .passes import (cleanup, gather_vocab_outputs, insert_all_reduces, insert_grad_syncs,
                     insert_local_slices,
                     keep_constant_adds_on_rank0, mask_vocab_embeddings, rewrite_shape_constants,
                     shard_linear_params)
from .patterns.linear import split_biases
from .plan import Plan, build_plan, check_overrides
from .repeats import (expand_plan, find_repeats, probe as probe_layers, same_decisions,
                      same_layers)
from .passes._util import get_tensor_attr, index_runs, set_tensor_attr
from .passes.devices import resolve_device, retarget_devices
from .runtime import GroupInfo, check_world_size, resolve_group
from .weight_check import WeightDigests

META_KEY = "fxtp"


@dataclass
class TPInfo:
    """What fxtp did to a graph; stored in `tp.meta["fxtp"]` for explain/draw and tests."""

    plan: Plan
    rank: int
    world_size: int
    group_name: str
    sharded_params: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)
    sliced_attrs: list[str] = field(default_factory=list)
    rewritten_constants: list[tuple[str, object, int]] = field(default_factory=list)
    all_reduce_nodes: list[str] = field(default_factory=list)
    all_gather_nodes: list[str] = field(default_factory=list)
    grad_sync_nodes: list[str] = field(default_factory=list)
    # parameter/buffer name (every alias of a tied one) -> (dim, runs (global start, length) of
    # the indices this rank keeps, in order): plain ints, so nothing here is on a device
    param_slices: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    dropout_disabled: bool = False     # set by fxtp.for_training(tp, disable_dropout=True)
    lora_fold: Any = None              # passes.lora.FoldState while LoRA is folded
    lora_last_fold: Any = None         # the latest FoldState: its two graphs serve later folds
    # parameters/buffers still on the meta device (a model built on meta, before fxtp.load)
    unloaded: tuple[str, ...] = ()
    check_weights: bool = False        # transform(check_weights=): fxtp.load checks too
    check_inputs: bool = False         # transform(check_inputs=): every call compares inputs
    weight_check: Any = None           # what the weight check at transform compared


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    return f"{type(model).__name__}" + (f" ({kind})" if kind else "")


def plan_model(model: nn.Module, world_size: int, *, example_inputs: Any = None,
               overrides: Optional[dict[str, str]] = None, vocab_parallel: bool = False,
               probe: bool = True) -> Plan:
    """The sharding decisions for `model` at `world_size`; needs no process group.

    `vocab_parallel=True` also splits embedding tables by rows (masked lookup + all-reduce) and
    makes output projections (lm_head) column-parallel with their logits all-gathered; tied
    weights stay tied (both uses slice the same rows). A deep model is planned from a capture
    of a few of its repeated layers (`fxtp.repeats`; `probe=False` captures every layer).
    """
    world_size = check_world_size(world_size, PlanOverrideError, "fxtp.plan")
    overrides = check_overrides(overrides)
    repeats = find_repeats(model) if probe else []
    if any(_inside_repeat(module, repeats) for module in overrides or {}):
        repeats = []             # a decision for one repeated layer: capture them all
    with probe_layers(model, repeats):
        captured = capture(model, example_inputs)
    split_biases(captured.gm)
    if not repeats:
        return build_plan(captured, world_size, _model_name(model), overrides, vocab_parallel)
    return plan_from_probe(captured, model, tuple(repeats), world_size, overrides,
                           vocab_parallel, example_inputs)


def plan_from_probe(captured: Captured, model: nn.Module, repeats: tuple, world_size: int,
                    overrides: Optional[dict[str, str]], vocab_parallel: bool,
                    example_inputs: Any) -> Plan:
    """Solves the probe capture and writes its decisions for every repeated layer; captures
    every layer instead when the graph does not confirm that the layers are the same, an
    override names a repeated layer (the layers then differ), or the probe's layers were
    planned differently."""
    repeats = list(repeats)
    plan = None
    if (all(same_layers(captured.gm, r) for r in repeats)
            and not any(_inside_repeat(module, repeats) for module in overrides or {})):
        plan = build_plan(captured, world_size, _model_name(model), overrides, vocab_parallel)
    if plan is None or not same_decisions(plan, repeats):
        return plan_model(model, world_size, example_inputs=example_inputs, overrides=overrides,
                          vocab_parallel=vocab_parallel, probe=False)
    plan = expand_plan(plan, model, repeats)
    plan.source_inputs = example_inputs
    return plan


def _inside_repeat(module: str, repeats: list) -> bool:
    """An override inside a repeated list makes its layers differ: capture them all."""
    return any(module == r.path or module.startswith(r.path + ".") for r in repeats)


def transform(model: nn.Module, world_size: int, *, plan: Optional[Plan] = None,
              group: Optional[dist.ProcessGroup] = None, example_inputs: Any = None,
              vocab_parallel: bool = False, check_weights: bool = True,
              check_inputs: bool = False) -> fx.GraphModule:
    """Returns this rank's tensor-parallel GraphModule of `model`.

    Call it on every rank of an initialised process group (`group`, default WORLD) with the
    same model weights. The result takes the model's inputs and returns its outputs on every
    rank; its parameters keep their names and hold this rank's slices.

    `check_weights` (default on): the ranks compare a checksum of every parameter and buffer,
    taken while the rewrite reads it for slicing, in one small gather; ranks holding different
    weights (another seed, another checkpoint) raise `WeightMismatchError` on every rank. A
    model built on the meta device is checked by `fxtp.load` instead. `check_inputs` (default
    off: it costs a gather and a host sync per call): every call compares a checksum of the
    inputs across the ranks and raises `InputMismatchError` on every rank when they differ.
    """
    info = resolve_group(world_size, group)
    if plan is not None and not isinstance(plan, Plan):
        raise PlanOverrideError(
            f"plan= takes a Plan (fxtp.plan(model, ws), or Plan.from_json(text) of a saved one), "
            f"got {type(plan).__name__}" + (": load a dict with fxtp.Plan.from_dict(d)"
                                            if isinstance(plan, dict) else ""))
    if plan is None:
        plan = plan_model(model, world_size, example_inputs=example_inputs,
                          vocab_parallel=vocab_parallel, probe=False)
    elif plan.world_size != world_size:
        raise PlanOverrideError(f"the plan was made for world_size={plan.world_size}, not "
                                f"{world_size}: rebuild it with fxtp.plan(model, {world_size})")
    if plan.captured is None or plan.probe:   # loaded from JSON, or planned from a probe
        plan = _rederive(model, plan, example_inputs)
    else:
        plan = _bind(model, plan)
    if plan.not_divisible:
        r = plan.not_divisible[0]
        raise NotDivisibleError(
            f"{r.module or r.node}: {r.text} (node {r.node}). Choose a world_size that divides "
            f"the head count, or keep it replicated: fxtp.transform(model, {world_size}, "
            f"plan=fxtp.plan(model, {world_size}).override({{{(r.module or r.node)!r}: 'replicate'}}))")
    gm = rewrite(plan, info, check_weights=check_weights)
    gm.meta[META_KEY].check_inputs = check_inputs and info.world_size > 1
    _guard_meta(gm)
    _install_input_defaults(gm, gm.meta[META_KEY].plan.captured)   # shapes only
    _guard_training(gm)
    _guard_moves(gm)
    # function-level import: tp_generate builds its decode step with transform()
    from .tp_generate import attach

    attach(gm, model)       # tp.generate: a weightless skeleton of the model, the step built lazily
    return gm


def _rederive(model: nn.Module, saved: Plan, example_inputs: Any) -> Plan:
    """A plan loaded from JSON has decisions but no graph: plan the model again with the saved
    overrides and insist that every decision is the same (another model, another fxtp version
    or a hand-edited entry would otherwise be applied silently)."""
    fresh = plan_model(model, saved.world_size, example_inputs=example_inputs,
                       overrides=saved.overrides, vocab_parallel=saved.vocab_parallel,
                       probe=False)
    diffs = saved.mismatches(fresh)
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; ... {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise PlanOverrideError(
            f"the plan does not match {_model_name(model)} (given vs derived from the whole model): {shown}. "
            "A saved plan is re-derived from the model with its 'overrides'; change decisions "
            "there (module -> 'replicate'/'shard'), or save a new plan from fxtp.plan(model, ws).")
    return fresh


def _bind(model: nn.Module, plan: Plan) -> Plan:
    """A plan the user passed carries the graph captured from the model it was made of: it must
    be this model's (the same parameter names, shapes, dtypes, devices and ties), and the
    rewrite must slice this model's tensors, not those of the model the plan was captured from
    (another instance with other weights would otherwise give a graph of the wrong weights)."""
    gm = plan.captured.gm
    have = {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}
    mine = {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}
    params = dict(model.named_parameters(remove_duplicate=False))
    planned = dict(gm.named_parameters(remove_duplicate=False))
    problems = [f"{n} is not in the model" for n in planned if n not in params]
    problems += [f"{n} is not in the plan" for n in params if n not in planned]
    for n, t in have.items():
        m = mine.get(n)
        if m is not None and (m.shape, m.dtype, m.device) != (t.shape, t.dtype, t.device):
            problems.append(f"{n}: {list(t.shape)} {t.dtype} on {t.device} in the plan, "
                            f"{list(m.shape)} {m.dtype} on {m.device} in the model")
    shared = [n for n in have if n in mine]
    if not problems:     # tied weights (one tensor under several names) tied alike
        a, b = _ties(have, shared), _ties(mine, shared)
        problems += [f"{n} is tied to {sorted(a[n] - {n}) or 'nothing'} in the plan, to "
                     f"{sorted(b[n] - {n}) or 'nothing'} in the model"
                     for n in shared if a[n] != b[n]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise PlanOverrideError(
            f"the plan was made for {plan.model_name}, and {_model_name(model)} differs from "
            f"it: {shown}. Plan this model itself: fxtp.transform(model, ws, "
            f"plan=fxtp.plan(model, ws)) (a plan saved as JSON is re-derived from the model).")
    if all(have[n] is mine[n] for n in shared):
        return plan
    memo = {id(have[n]): mine[n] for n in shared}     # the graph copied, the tensors rebound
    bound = deepcopy_graph(gm, memo)
    return dataclasses.replace(plan, captured=dataclasses.replace(plan.captured, gm=bound))


def _ties(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, frozenset]:
    """name -> every name (of `names`) of the same tensor."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(tensors[n]), []).append(n)
    return {n: frozenset(groups[id(tensors[n])]) for n in names}


def dropout_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Dropout ops with p > 0 in the graph (captured in eval mode, so they do nothing)."""
    from .rules import _DROPOUT

    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _DROPOUT:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.0)
            if p > 0:
                out.append(n)
    return out


def _guard_training(gm: fx.GraphModule) -> None:
    """`train()` is allowed unless the model has dropout: the capture ran in eval mode, so the
    graph's dropout ops are off, and silently training without dropout would differ from the
    model's own training. `fxtp.for_training(tp, disable_dropout=True)` accepts that."""
    from .patterns.linear import module_path

    def train(mode: bool = True):
        if mode and gm.meta[META_KEY].lora_fold is not None:
            raise LoraStateError("fxtp: the LoRA adapters are folded into the weights (for "
                                 "generation); call fxtp.for_training(tp) or "
                                 "fxtp.unfold_lora(tp) before training")
        if mode and not gm.meta[META_KEY].dropout_disabled:
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


def _guard_moves(gm: fx.GraphModule) -> None:
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
            if gm.meta[META_KEY].lora_fold is not None:
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
                from .load import meta_tensors   # load imports transform

                gm.meta[META_KEY].unloaded = meta_tensors(gm)
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


def rewrite(plan: Plan, info: GroupInfo, check_weights: bool = False) -> fx.GraphModule:
    """Applies the plan's actions to a copy of the captured graph for `info.rank`; with
    `check_weights`, compares the full tensors' checksums across the ranks (`check_weights`)."""
    captured, sol = plan.captured, plan.solution
    full = {id(t): t for t in tensor_attrs(captured.gm).values()}
    # the graph is copied, the weights are not: each rank slices the captured (= the user's)
    # tensors into new local ones, then copies what it keeps whole (`_own_tensors`)
    gm = deepcopy_graph(captured.gm, dict(full))
    tp = TPInfo(plan=shapes_only(plan), rank=info.rank, world_size=info.world_size,
                group_name=info.group_name, check_weights=check_weights)
    digests = WeightDigests(full) if check_weights and info.world_size > 1 else None
    on_read = digests.read if digests is not None else None
    if info.world_size > 1:
        slices: dict[str, tuple[int, torch.Tensor]] = {}
        tp.sharded_params = shard_linear_params(gm, sol.actions, sol.linears, info.rank, slices,
                                                on_read)
        tp.rewritten_constants = rewrite_shape_constants(gm, sol.actions, info.rank)
        tp.sliced_attrs = insert_local_slices(gm, sol.actions, info.rank, slices, on_read)
        mask_vocab_embeddings(gm, sol.actions, info.rank)
        tp.all_reduce_nodes = insert_all_reduces(gm, sol.actions, info.group_name)
        tp.all_gather_nodes = gather_vocab_outputs(gm, sol.actions, info.world_size, info.group_name,
                                                   info.rank)
        keep_constant_adds_on_rank0(gm, sol.actions, info.rank)
        tp.grad_sync_nodes = insert_grad_syncs(gm, sol.actions, sol.linears, info.rank,
                                               info.world_size, info.group_name,
                                               [*tp.sharded_params, *tp.sliced_attrs])
        tp.param_slices = _with_aliases(gm, slices)
    cleanup(gm)
    own_tensors(gm, full, on_read)
    from .load import meta_tensors

    if digests is not None:
        tp.weight_check = digests.check(tensor_attrs(captured.gm), info.group_name)
    tp.unloaded = meta_tensors(gm)
    gm.meta[META_KEY] = tp
    return gm


def _guard_meta(gm: fx.GraphModule) -> None:
    """A graph of a model built on the meta device holds no values until `fxtp.load`: calling
    it raises `MetaTensorError` rather than computing on meta tensors. Checks a flag (the
    names recorded at transform/load); rescans only while it is set, so weights assigned by
    other means are noticed."""
    def hook(module, args, kwargs):
        info = module.meta[META_KEY]
        if info.unloaded:
            from .load import meta_tensors

            info.unloaded = meta_tensors(module)
            if info.unloaded:
                shown = ", ".join(info.unloaded[:5])
                more = f" and {len(info.unloaded) - 5} more" if len(info.unloaded) > 5 else ""
                raise MetaTensorError(
                    f"fxtp: the tensor-parallel model holds {len(info.unloaded)} tensor(s) on "
                    f"the meta device ({shown}{more}): the model was built without weights. "
                    "Fill them with fxtp.load(tp, checkpoint_dir) on every rank first.")

    gm.register_forward_pre_hook(hook, with_kwargs=True)


def _with_aliases(gm: fx.GraphModule, slices: dict) -> dict:
    """The slice records under every name of each (possibly tied) tensor, as runs."""
    slices = {name: (dim, index_runs(index)) for name, (dim, index) in slices.items()}
    by_id = {id(get_tensor_attr(gm, name)): rec for name, rec in slices.items()}
    named = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    out = dict(slices)
    for name, t in named.items():
        if id(t) in by_id:
            out.setdefault(name, by_id[id(t)])
    return out


def _install_input_defaults(gm: fx.GraphModule, captured: Captured) -> None:
    """Lets the result be called like the model: fills inputs the capture fixed (use_cache=False,
    an all-ones attention_mask) and names the accepted inputs when a caller passes others.
    With `check_inputs` set (`TPInfo`), then compares the inputs across the ranks."""
    names = captured.kwarg_names
    defaults = dict(captured.defaults)
    slots = input_check.slot_names(captured.arg_count, names)
    specs = captured_inputs.specs(captured)

    def hook(module, args, kwargs):
        info = module.meta[META_KEY]
        if not info.check_inputs:
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
        if not torch.compiler.is_compiling():    # a compiled graph guards its inputs itself
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
        return args, kwargs

    gm.register_forward_pre_hook(hook, with_kwargs=True)
