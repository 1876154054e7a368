"""Model -> FX GraphModule, through torch.export (non-strict) with dynamic batch and sequence.

Hugging Face models get dummy inputs built from their config (`input_ids`, `attention_mask`,
`use_cache=False`); any other module is captured from the `example_inputs` the user gives.
The exported module keeps the model's calling convention (pytree in/out specs), so the
rewritten graph returns the same output type (`CausalLMOutputWithPast`, tuples, ...).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim

from ..errors import CaptureError
from .no_ops import drop_no_ops
from .opaque import OpaqueShapeError, culprit, opaque_forwards, record_calls, same_class
from .specialised import cause, fixed_token_dims, recording, size_conditions


@dataclass
class Captured:
    """A captured graph plus what is needed to call it like the original model."""

    gm: fx.GraphModule
    arg_count: int
    kwarg_names: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)   # filled in when the caller omits them
    hf: bool = False
    # submodules torch.export could not capture, called as one replicated op: name -> why
    opaque: dict[str, str] = field(default_factory=dict)
    # conditions on input sizes the graph holds for (`x.size()[1] > 4`), checked at each call
    conditions: list[str] = field(default_factory=list)


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face model, or a wrapper that exposes one's config (a PEFT `PeftModel`)."""
    try:
        from transformers import PretrainedConfig, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if isinstance(model, PreTrainedModel):
        return True
    try:
        return isinstance(getattr(model, "config", None), PretrainedConfig)
    except Exception:  # a wrapper's __getattr__ may raise anything
        return False


def model_device(model: nn.Module) -> torch.device:
    """The device a model computes on: its parameters' (meta for a model built without
    weights), else its buffers', else the CPU. Every tensor fxtp makes for the model goes there."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def config_vocab(cfg: Any) -> Optional[int]:
    """The vocabulary size a config gives, or its text config's (a multimodal model's
    top-level config has none of its own)."""
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is None and hasattr(cfg, "get_text_config"):
        vocab = getattr(cfg.get_text_config(), "vocab_size", None)
    return vocab


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, Any]:
    """Dummy inputs for a Hugging Face model, from its config: token ids within the vocab, on
    the model's device (a CUDA model is captured with CUDA inputs, a meta-built one with meta
    inputs: torch.export propagates devices and rejects a mix)."""
    cfg = model.config
    vocab = config_vocab(cfg) or 32
    dev = model_device(model)
    ids = torch.randint(0, vocab, (batch, seq), device="cpu").to(dev)
    params = inspect.signature(model.forward).parameters
    # wrappers (PEFT) take **kwargs and pass them on to the model
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in params or takes_any:
        kwargs["attention_mask"] = torch.ones_like(ids)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(2, seq // 2))).to(dev)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


MAX_OPAQUE = 16    # submodule classes called as opaque parts before the capture gives up


def _dynamic_shapes(args: tuple, kwargs: dict, hf: bool) -> tuple:
    def spec(x: Any, name: str = "") -> Any:
        if isinstance(x, torch.Tensor):
            if hf and name in ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                               "decoder_input_ids", "decoder_attention_mask"):
                return {0: Dim.AUTO, 1: Dim.AUTO}
            return {d: Dim.AUTO for d in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v, k) for k, v in x.items()}
        return None

    return tuple(spec(a) for a in args), {k: spec(v, k) for k, v in kwargs.items()}


def capture(model: nn.Module, example_inputs: Any = None, *,
            keep_fixed: bool = False) -> Captured:
    """Exports `model` to an ATen-level GraphModule with dynamic batch/sequence dims.

    `example_inputs` is an args tuple, a kwargs dict, or a pair (args, kwargs). Required for
    modules that are not Hugging Face models. `keep_fixed`: a batch or sequence size the
    capture fixes is kept, not refused (a graph meant for these sizes only, whose own guards
    then refuse other sizes: size_graphs.py).
    """
    hf = is_hf_model(model)
    args, kwargs = _own_inputs(*_split_inputs(model, example_inputs, hf))
    was_training = model.training
    model.eval()
    # a wrapper without a use_cache argument (PEFT) runs the model with its config's default:
    # no KV cache in the captured graph
    cfg = getattr(model, "config", None) if hf else None
    had_cache = getattr(cfg, "use_cache", None)
    if had_cache and "use_cache" not in kwargs:
        cfg.use_cache = False
    dyn_args, dyn_kwargs = _dynamic_shapes(args, kwargs, hf)
    opaque: dict[str, str] = {}     # submodules called as one op: name -> why
    try:
        while True:
            gm, error, fixed = _export(model, args, kwargs, hf, (dyn_args, dyn_kwargs), opaque)
            if error is None:
                dims = fixed_token_dims(gm) if hf and not keep_fixed else []
                why = cause(fixed, dims[0][2]) if dims else None
                if not dims or not (why and why.module and why.module not in opaque):
                    break
                error_text = f"it fixed the batch or sequence size at {why.where}"
                name = why.module
            else:
                name = culprit(error, model)
                error_text = f"{type(error).__name__}: {_first_line(error)}{_user_code(error)}"
                if name is None or name in opaque or len(opaque) >= MAX_OPAQUE:
                    raise CaptureError(
                        f"fxtp could not capture {type(model).__name__} with torch.export: "
                        f"{error_text}. Make the forward traceable (no data-dependent Python "
                        "control flow on tensor values) or pass example_inputs that match its "
                        "signature." + (f" ({', '.join(opaque)} already called as opaque "
                                        "parts)" if opaque else "")) from error
            opaque.update(dict.fromkeys(same_class(model, name), error_text))
    finally:
        model.train(was_training)
        if had_cache and "use_cache" not in kwargs:
            cfg.use_cache = had_cache
    if hf and not keep_fixed:
        _refuse_fixed_sizes(model, gm, fixed)
    drop_no_ops(gm)
    defaults = {}
    if hf:
        if "use_cache" in kwargs:
            defaults["use_cache"] = False
    return Captured(gm=gm, arg_count=len(args), kwarg_names=tuple(kwargs), defaults=defaults,
                    hf=hf, opaque=dict(opaque), conditions=size_conditions(gm))


def _export(model: nn.Module, args: tuple, kwargs: dict, hf: bool, dynamic: tuple,
            opaque: dict[str, str]) -> tuple[Optional[fx.GraphModule], Optional[Exception], list]:
    """One torch.export attempt with the submodules `opaque` called as opaque ops: the graph,
    or the exception it raised; and the sizes it fixed."""
    recorded = _recorded_calls(model, opaque, args, kwargs, hf) if opaque else []
    try:
        with _named_forward(model, args, kwargs), recording(model) as fixed, \
                opaque_forwards(model, opaque, recorded):
            # keyed by the names of the forward in place (the stand-in's, for a pass-through)
            shapes = _dyn_for(model, *dynamic, args, kwargs)
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except CaptureError:
        raise
    except OpaqueShapeError as e:
        raise CaptureError(f"fxtp could not capture {type(model).__name__}: {e}, so it cannot "
                           "be called as an opaque part") from e
    except Exception as e:  # torch raises many types here; all mean "cannot capture"
        return None, e, []
    return ep.module(), None, fixed


def _recorded_calls(model: nn.Module, opaque: dict[str, str], args: tuple, kwargs: dict,
                    hf: bool) -> list:
    """The opaque submodules' calls in eager runs of the model: two batch and sequence
    sizes for a Hugging Face model, the example inputs otherwise. A model without values
    (meta, or faked on a device: capture/on_device.py) cannot run them."""
    if any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in model.parameters()):
        raise CaptureError(
            f"fxtp could not capture {', '.join(sorted(opaque))} of {type(model).__name__} "
            f"({next(iter(opaque.values()))}), and calling it as an opaque part needs an eager "
            "run of the model with its weights, which a weightless model (built on meta, or "
            "fxtp's weightless copy) cannot do")
    if hf and not args:
        inputs = [hf_example_inputs(model, 2, 8), hf_example_inputs(model, 3, 5)]
        runs = [lambda kw=kw: model(**kw) for kw in inputs]
    else:
        runs = [lambda: model(*args, **kwargs)]
    try:
        return record_calls(model, set(opaque), runs)
    except Exception as e:  # noqa: BLE001 - the model's own eager failure, reported as such
        raise CaptureError(
            f"fxtp could not capture {', '.join(sorted(opaque))} of {type(model).__name__} "
            f"({next(iter(opaque.values()))}), and calling it as an opaque part needs an eager "
            f"run of the model, which failed: {type(e).__name__}: {_first_line(e)} (a model "
            "built on meta cannot run: build it with its weights)") from e


def _refuse_fixed_sizes(model: nn.Module, gm: fx.GraphModule, fixed: list) -> None:
    """A batch or sequence size the capture made a constant: the graph would fail on the next
    input of another size, so the capture fails now, naming the model's line."""
    dims = fixed_token_dims(gm)
    if not dims:
        return
    name, dim, size = dims[0]
    why = cause(fixed, size)
    what = "batch size" if dim == 0 else "sequence length"
    at = (f" at {why.where}" + (f" (in {why.module})" if why.module else "")) if why else ""
    raise CaptureError(
        f"fxtp: capturing {type(model).__name__} fixed the {what} to {size} ({name} dim {dim})"
        f"{at}: Python code that loops or branches on the {what} makes torch.export keep "
        f"that size, and the graph would fail on the next input of another {what}. Make that "
        "code independent of the size (a tensor op instead of a Python loop) to transform "
        "this model.")


@contextlib.contextmanager
def _named_forward(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[None]:
    """A pass-through `forward(*args, **kwargs)` (PEFT's `PeftModel` built without a
    task_type) called with keyword inputs only is exported through a stand-in forward whose
    signature names those inputs: torch.export cannot match dynamic shapes to an empty
    `*args` ("Must provide a tree_name when there might be a mismatch"). The stand-in calls the
    model's own forward, so the graph and its parameter names are the model's."""
    params = inspect.signature(model.forward).parameters.values()
    if args or not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        yield
        return
    own = model.forward

    def forward(**inputs: Any) -> Any:
        return own(**inputs)

    forward.__signature__ = inspect.Signature(   # type: ignore[attr-defined]
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in kwargs])
    had = "forward" in model.__dict__
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = own
        else:
            del model.forward


def _dyn_for(model: nn.Module, dyn_args: tuple, dyn_kwargs: dict, args: tuple, kwargs: dict) -> Any:
    """dynamic_shapes keyed by forward's parameter names, as torch.export matches them; inputs
    taken by a `**kwargs` parameter are nested under its name."""
    params = inspect.signature(model.forward).parameters
    var_kw = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_kw is not None and any(k not in params for k in dyn_kwargs):
        named = {k: v for k, v in dyn_kwargs.items() if k in params}
        extra = {k: v for k, v in dyn_kwargs.items() if k not in params}
        named[var_kw] = extra if any(v is not None for v in extra.values()) else None
        dyn_kwargs = named
    if not args:
        return dyn_kwargs
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example_inputs do not match {type(model).__name__}.forward: {e}") from e
    names = list(bound.arguments)
    out = {name: d for name, d in zip(names, dyn_args)}
    out.update(dyn_kwargs)
    return out


def _own_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Example inputs that are views (`ids[:, :8]`) are copied first: torch.export records a
    guard on a view's base, and the exported module then fails on every later call with
    tensors that are not views ("'NoneType' object has no attribute 'size'")."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t._is_view() else t,
                                (args, kwargs))


def _split_inputs(model: nn.Module, example_inputs: Any, hf: bool) -> tuple[tuple, dict]:
    if example_inputs is None:
        if not hf:
            raise CaptureError(
                f"{type(model).__name__} is not a Hugging Face model: pass example_inputs= "
                "(an args tuple, a kwargs dict, or (args, kwargs)) so fxtp can capture it."
            )
        return (), hf_example_inputs(model)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2
            and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tuple, a dict or (args, kwargs), got "
                       f"{type(example_inputs).__name__}")


def _user_code(e: Exception) -> str:
    """The model source line torch.export stopped at, when its message names one."""
    import re

    m = re.search(r"File: (\S+?):(\d+) in (\w+), code: (.+)", str(e))
    if not m:
        m = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', str(e))
    if not m:
        return ""
    path, line, func, code = m.groups()
    return f" (at {path}:{line} in {func}: `{code.strip()}`)"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
