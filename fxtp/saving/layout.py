"""What `fxtp.save` writes, decided before anything is written and the same on every rank: the
tensors a standard checkpoint of the model holds (names, full shapes, dtypes), each tied to the
tensor of `tp` holding its values, and which rank writes it into which file.

The names come from the model's weightless copy (`TPInfo.skeleton`, parameters on meta) through
the libraries that define the formats, so nothing here knows an architecture:
- a Hugging Face model: its `state_dict` (persistent buffers only) less
  `_keys_to_ignore_on_save`, tied weights once under the name transformers keeps
  (`remove_tied_weights_from_state_dict`), and `revert_weight_conversion` where it only renames;
- a PEFT model: `get_peft_model_state_dict` per adapter (`merged=False`), or the names of the
  base model PEFT's `merge_and_unload` leaves on a copy of the skeleton (`merged=True`);
- any other module: its `state_dict`, tied tensors once under the first of their names in sorted
  order (what `safetensors.torch.save_model` keeps, so `load_model` restores the ties).
The skeleton's tensors are the objects its state_dict returns (`keep_vars=True`), so a name a
library returns is traced back to the skeleton's own name by identity, and that name is `tp`'s.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from ..errors import SaveError
from ..graph.tensors import tensor_attrs

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Entry:
    name: str                     # the tensor's name in the file
    source: str                   # tp's tensor holding the values (one of its names)
    shape: tuple[int, ...]        # the full shape
    dtype: torch.dtype
    # the value itself, for a buffer the model computed that tp's graph does not hold (every
    # rank has it whole)
    value: Optional[torch.Tensor] = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class File:
    name: str                     # path relative to the checkpoint directory
    owner: int                    # the rank that writes it
    entries: list[Entry]


@dataclass
class Layout:
    kind: str                     # "model", "adapter", "merged" or "state_dict"
    files: list[File]
    index: Optional[str] = None   # the index of a sharded model (rank 0 writes it)
    total_parameters: int = 0
    # rank 0 writes the configs into the checkpoint directory
    configs: list[Callable[[str], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def digest(self) -> int:
        """A checksum of what is written where: ranks that would write different checkpoints
        (another model, another fxtp version) are told apart before anything is written."""
        rows = [(f.name, f.owner, [(e.name, list(e.shape), str(e.dtype)) for e in f.entries])
                for f in self.files]
        h = hashlib.sha256(json.dumps([self.kind, rows]).encode()).digest()
        return int.from_bytes(h[:7], "little")


# ---------------------------------------------------------------------------------------------
# which tensors, under which names

def _peft_model(skel: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(skel, peft.PeftModel)


def _hf_model(skel: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(skel, PreTrainedModel)


def hf_names(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """The names `model.save_pretrained` writes, each with the state_dict name of `model` it
    holds (the same but where transformers renames on saving), and notes."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict(keep_vars=True)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        sd.pop(key, None)
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    names = [k for k in sd if k in kept]
    same = [(k, k) for k in names]
    notes: list[str] = []
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, {k: sd[k] for k in names})
    except ImportError:
        return same, notes
    if list(reverted) == names:
        return same, notes
    by_id = {id(sd[k]): k for k in names}
    if all(id(v) in by_id for v in reverted.values()) and len(reverted) == len(names):
        return [(k, by_id[id(v)]) for k, v in reverted.items()], notes   # renames only
    notes.append(f"{type(model).__name__}'s checkpoints are converted by transformers on load "
                 "(fused or split tensors): written in the model's own layout, as "
                 "save_pretrained(save_original_format=False) does; from_pretrained and "
                 "fxtp.load read it")
    return same, notes


def _state_dict_names(module: nn.Module) -> list[tuple[str, str]]:
    """Every state_dict tensor once: tied ones under the first of their names, sorted."""
    groups: dict[int, list[str]] = {}
    sd = module.state_dict(keep_vars=True)
    for k, v in sd.items():
        groups.setdefault(id(v), []).append(k)
    first = {min(names) for names in groups.values()}
    return [(k, k) for k in sd if k in first]


def _entries(pairs: list[tuple[str, str]], skel_sd: dict[str, torch.Tensor],
             tp_tensors: dict[str, torch.Tensor], what: str) -> list[Entry]:
    """Entries for (name in the file, skeleton name) pairs; a skeleton name is tp's too."""
    out, missing = [], []
    for name, src in pairs:
        skel_t = skel_sd[src]
        t = tp_tensors.get(src)
        if t is not None:
            out.append(Entry(name, src, tuple(skel_t.shape), t.dtype))
        elif skel_t.device.type != "meta":      # a buffer the capture folded away
            out.append(Entry(name, src, tuple(skel_t.shape), skel_t.dtype, skel_t.detach()))
        else:
            missing.append(src)
    if missing:
        raise SaveError(f"fxtp.save: the tensor-parallel graph holds no tensor for {len(missing)} "
                        f"of the {what}'s state_dict entries ({', '.join(missing[:5])}); it "
                        "cannot write them. Nothing was written.")
    return out


def plan_tensors(tp: fx.GraphModule, skel: nn.Module, merged: bool, world_size: int,
                 max_shard_bytes: int) -> Layout:
    """The layout of the checkpoint of `tp` (its skeleton `skel`) at `world_size`."""
    tp_tensors = tensor_attrs(tp)
    skel_sd = skel.state_dict(keep_vars=True)
    ident = {id(v): k for k, v in reversed(list(skel_sd.items()))}    # first name wins
    if _peft_model(skel):
        if merged:
            return _merged_layout(skel, skel_sd, ident, tp_tensors, world_size, max_shard_bytes)
        return _adapter_layout(skel, skel_sd, ident, tp_tensors)
    if merged:
        raise SaveError(f"fxtp.save(merged=True) is for PEFT models (peft.get_peft_model); "
                        f"{type(skel).__name__} has no adapters to merge: save without merged=")
    if _hf_model(skel):
        names, notes = hf_names(skel)
        layout = shard(_entries(names, skel_sd, tp_tensors, "model"), world_size, max_shard_bytes)
        layout.notes += notes
        return _with_hf_configs(layout, skel, ident, tp_tensors)
    layout = shard(_entries(_state_dict_names(skel), skel_sd, tp_tensors, "module"), world_size,
                   max_shard_bytes)
    layout.kind = "state_dict"
    return layout


def _adapter_layout(skel, skel_sd, ident, tp_tensors) -> Layout:
    """One `adapter_model.safetensors` per adapter, as `PeftModel.save_pretrained` writes it
    (an adapter other than "default" in a subdirectory of its name), written by rank 0."""
    from peft import get_peft_model_state_dict

    files, configs = [], []
    for adapter in skel.peft_config:
        state = get_peft_model_state_dict(skel, state_dict=dict(skel_sd), adapter_name=adapter)
        pairs = []
        for k, v in state.items():
            if id(v) not in ident:
                raise SaveError(f"fxtp.save: PEFT names {k} for adapter {adapter!r}, a tensor "
                                "the model does not hold as it is; fxtp cannot write it")
            pairs.append((k, ident[id(v)]))
        sub = "" if adapter == "default" else adapter + "/"
        files.append(File(sub + ADAPTER_WEIGHTS, 0, _entries(pairs, skel_sd, tp_tensors,
                                                             "adapter")))
        configs.append(lambda d, a=adapter, s=sub: adapter_config(skel, a, d, s))
    return Layout("adapter", files, configs=configs)


def _merged_layout(skel, skel_sd, ident, tp_tensors, world_size, max_shard_bytes) -> Layout:
    """The base model with the adapters merged: PEFT's `merge_and_unload` on a copy of the
    skeleton that shares its (meta) tensors says which names remain and which tensors they are
    (a merged linear keeps its base layer's weight object)."""
    shared = {id(t): t for t in skel_sd.values()}
    with torch.device("meta"):
        base = copy.deepcopy(skel, dict(shared)).merge_and_unload()
    names, notes = hf_names(base) if _hf_model(base) else (_state_dict_names(base), [])
    base_sd = base.state_dict(keep_vars=True)
    pairs = []
    for name, own in names:
        t = base_sd[own]
        if id(t) not in ident:
            raise SaveError(f"fxtp.save(merged=True): PEFT's merged model has a new tensor "
                            f"{name}; fxtp cannot tell which of the model's tensors it is")
        pairs.append((name, ident[id(t)]))
    layout = shard(_entries(pairs, skel_sd, tp_tensors, "model"), world_size, max_shard_bytes)
    layout.kind, layout.notes = "merged", notes
    return _with_hf_configs(layout, base, ident, tp_tensors) if _hf_model(base) else layout


def _with_hf_configs(layout: Layout, model: nn.Module, ident: dict[int, str],
                     tp_tensors: dict[str, torch.Tensor]) -> Layout:
    """The layout with the configs `save_pretrained` writes for `model` and its parameter count."""
    dtype = _model_dtype(model, ident, tp_tensors)
    layout.configs.append(lambda d: hf_configs(model, dtype, d))
    layout.total_parameters = sum(p.numel() for p in model.parameters())
    return layout


def _model_dtype(model: nn.Module, ident: dict[int, str], tp_tensors: dict[str, torch.Tensor]
                 ) -> Optional[torch.dtype]:
    """`model.dtype` as transformers reads it (its first floating parameter), of tp's tensor."""
    for p in model.parameters():
        if p.is_floating_point():
            t = tp_tensors.get(ident.get(id(p), ""))
            return t.dtype if t is not None else p.dtype
    return None


# ---------------------------------------------------------------------------------------------
# which rank writes what, into which file

def shard(entries: list[Entry], world_size: int, max_shard_bytes: int) -> Layout:
    """Spreads the tensors over the ranks by bytes (largest first, to the least loaded rank),
    each rank's in name order, split into files of at most `max_shard_bytes` (a larger tensor
    gets a file of its own). One file in all is `model.safetensors`; more are
    `model-0000i-of-0000n.safetensors` with an index, as `save_pretrained` names them."""
    load = [0] * world_size
    owned: list[list[Entry]] = [[] for _ in range(world_size)]
    for e in sorted(entries, key=lambda e: (-e.nbytes, e.name)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += e.nbytes
        owned[r].append(e)
    chunks: list[tuple[int, list[Entry]]] = []
    for r, es in enumerate(owned):
        size, current = 0, []
        for e in sorted(es, key=lambda e: e.name):
            if current and size + e.nbytes > max_shard_bytes:
                chunks.append((r, current))
                size, current = 0, []
            current.append(e)
            size += e.nbytes
        if current:
            chunks.append((r, current))
    n = len(chunks)
    if n <= 1:
        return Layout("model", [File(WEIGHTS, r, es) for r, es in chunks])
    files = [File(f"model-{i + 1:05d}-of-{n:05d}.safetensors", r, es)
             for i, (r, es) in enumerate(chunks)]
    return Layout("model", files, index=INDEX)


def index_json(layout: Layout) -> str:
    """The index `from_pretrained` reads a sharded checkpoint through."""
    weight_map = {e.name: f.name for f in layout.files for e in f.entries}
    total = sum(e.nbytes for f in layout.files for e in f.entries)
    meta: dict[str, Any] = {"total_size": total}
    if layout.total_parameters:
        meta["total_parameters"] = layout.total_parameters
    return json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))},
                      indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# configs

def hf_configs(model: nn.Module, dtype: Optional[torch.dtype], directory: str) -> None:
    """config.json as `save_pretrained` writes it (the model's dtype and class name), and the
    generation config of a model that generates. The skeleton's own config is not changed."""
    config = copy.deepcopy(model.config)
    if dtype is not None:
        config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if getattr(model, "_auto_class", None) is not None:    # remote code: its files too
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=config)
    config.save_pretrained(directory)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if can_generate and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def adapter_config(skel: nn.Module, adapter: str, directory: str, sub: str) -> None:
    """adapter_config.json as `PeftModel.save_pretrained` writes it: inference mode on, the
    base model's name when it has one."""
    import os

    config = copy.deepcopy(skel.peft_config[adapter])
    if getattr(config, "base_model_name_or_path", None) is None:
        base = skel.base_model.model if not config.is_prompt_learning else skel.base_model
        config.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    out = os.path.join(directory, sub) if sub else directory
    os.makedirs(out, exist_ok=True)
    if config.task_type is None:
        base = skel.get_base_model()
        config.save_pretrained(out, auto_mapping_dict={"base_model_class": type(base).__name__,
                                                       "parent_library": type(base).__module__})
    else:
        config.save_pretrained(out)
