"""fxtp.load: fills a tensor-parallel graph built on the `meta` device with this rank's slices,
read from `*.safetensors` files, so no rank ever holds (or reads) the full model.

    with fxtp.init_empty():                          # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(cfg)
    tp = fxtp.transform(model, world_size)           # meta parameters of the local shapes
    report = fxtp.load(tp, "ckpt_dir")               # or adapter="peft_dir" for LoRA weights

What each rank keeps of a tensor is `TPInfo.param_slices` (dim, global indices), recorded by the
passes that sliced it: runs of contiguous indices (several for fused qkv chunks, uneven shards
or kv groups). Each run is read straight from the file into the new local tensor with
`readinto` at the offsets of the safetensors header: no file mapping, no intermediate copy, so a
rank's resident memory grows by its shard and nothing else (`reader="safetensors"` reads with
safetensors' own lazy `get_slice` instead, which maps the file).

Nothing is read before everything is checked: every tensor of `tp` has a checkpoint tensor
(under one of its names: tied weights, PEFT's saved names) of the full shape the plan was made
for and the same dtype, and every file's header is whole and its data fits in the file. The
values go into new tensors that replace the meta ones only once every read succeeded (and, in a
process group, once every rank's did), so a failed load leaves `tp` as it was, unusable
(`MetaTensorError` when called) rather than partly loaded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import fx, nn

from .errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
SHOWN = 5   # offending tensors named in an error message


@contextlib.contextmanager
def init_empty() -> Iterator[None]:
    """Builds modules with their parameters on the `meta` device and their buffers real.

    Parameters cost nothing (their values come from `fxtp.load`); buffers computed in
    `__init__` and absent from checkpoints (rotary `inv_freq`, non-persistent) keep their
    values. A plain `with torch.device("meta")` also works with `fxtp.transform`, but such
    buffers then have no values and `fxtp.load` says so. Same idea as accelerate's
    `init_empty_weights(include_buffers=False)`: each parameter is moved to meta as it is
    registered, before any initialiser writes it, so its CPU memory is never touched.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.detach().to("meta"),
                                                    requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@dataclass
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int      # absolute byte offsets in the file
    end: int


@dataclass
class LoadReport:
    """What `fxtp.load` did on this rank."""

    files: list[str] = field(default_factory=list)
    tensors: dict[str, str] = field(default_factory=dict)     # tp name -> checkpoint name
    kept: list[str] = field(default_factory=list)             # real buffers not in the checkpoint
    bytes_read: int = 0         # bytes read from the files
    bytes_loaded: int = 0       # bytes of the local tensors filled (each tied tensor once)
    full_bytes: int = 0         # bytes of the same tensors unsliced


def _read_header(path: str) -> dict[str, _Entry]:
    """The safetensors header of `path` (8-byte little-endian length, JSON), checked against
    the file's size so a truncated file is reported before anything is read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes does not fit in the file ({size} bytes)")
            meta = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"fxtp.load: cannot read {path}: {e}. The file is truncated or "
                              "not a safetensors file; write it again.") from e
    out: dict[str, _Entry] = {}
    base = 8 + n
    for name, rec in meta.items():
        if name == "__metadata__":
            continue
        a, b = rec["data_offsets"]
        out[name] = _Entry(path, rec["dtype"], tuple(rec["shape"]), base + a, base + b)
    end = max((e.end for e in out.values()), default=base)
    if end > size:
        raise CheckpointError(
            f"fxtp.load: {path} is truncated: its header describes {end} bytes of data, the file "
            f"has {size}. Write the checkpoint again (an interrupted copy or save); nothing was "
            "loaded.")
    return out


def _files(path: str, index_name: str, single: str) -> list[str]:
    """The safetensors files of a checkpoint directory (or one file)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"fxtp.load: {path} is neither a directory nor a file")
    index = os.path.join(path, index_name)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"fxtp.load: cannot read the index {index}: {e}") from e
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"fxtp.load: the index {index} names files that are not "
                                  f"there: {missing[:SHOWN]}")
        return files
    if os.path.exists(os.path.join(path, single)):
        return [os.path.join(path, single)]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"fxtp.load: no *.safetensors file in {path} (save the model with "
                              "model.save_pretrained(dir, safe_serialization=True))")
    return files


def _headers(files: list[str]) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for f in files:
        entries.update(_read_header(f))
    return entries


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted runs (start, length) of consecutive global indices, in the order kept."""
    runs: list[tuple[int, int]] = []
    for i in index.tolist():
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _read_into(f, entry: _Entry, dim: int, runs: list[tuple[int, int]], out: torch.Tensor) -> int:
    """Reads `runs` of `entry` along `dim` into the contiguous `out`; returns bytes read."""
    shape = entry.shape or (1,)         # a 0-d tensor reads as one element
    item = out.element_size()
    outer, size, inner = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])
    n_local = out.shape[dim] if out.dim() else 1
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    total, pos = 0, 0
    for a, n in runs:
        length = n * inner * item
        # one contiguous byte range per index before `dim` (a single one for dim 0)
        for o in range(outer):
            src = entry.start + (o * size + a) * inner * item
            dst = (o * n_local + pos) * inner * item
            f.seek(src)
            view, got = buf[dst:dst + length], 0
            while got < length:
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(f"fxtp.load: {entry.file} ended while reading "
                                          "(truncated while loading?)")
                got += k
            total += length
        pos += n
    return total


def _read_with_safetensors(handles: dict, name: str, entry: _Entry, dim: int,
                           runs: list[tuple[int, int]], out: torch.Tensor) -> int:
    """The same through safetensors' lazy slicing (`get_slice`), for comparison."""
    from safetensors import safe_open

    if entry.file not in handles:
        handles[entry.file] = safe_open(entry.file, "pt")
    sl = handles[entry.file].get_slice(name)
    pos, total = 0, 0
    for a, n in runs:
        index = (slice(None),) * dim + (slice(a, a + n),)
        part = sl[index] if entry.shape else sl[...]
        out.narrow(dim, pos, n).copy_(part) if entry.shape else out.copy_(part)
        total += part.numel() * part.element_size()
        pos += n
    return total


def _candidates(name: str, adapter_name: str) -> list[str]:
    """Checkpoint names a tp tensor may be saved under: its own; a PEFT model's base weight in
    the base model's checkpoint (`base_model.model.` prefix and `.base_layer` dropped); a PEFT
    adapter weight in `adapter_model.safetensors` (the adapter's name dropped). These are names
    of PEFT's file format, not of any model's structure."""
    out = [name]
    base = name[len("base_model.model."):] if name.startswith("base_model.model.") else None
    if base is not None:
        out += [".".join(p for p in base.split(".") if p != "base_layer"), base]
    parts = name.split(".")
    if adapter_name in parts:
        out.append(".".join(p for p in parts if p != adapter_name))
    return out


def _show(items: list[str]) -> str:
    more = f" ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def load(tp: fx.GraphModule, path: str, *, adapter: Optional[str] = None,
         adapter_name: str = "default", reader: str = "direct") -> LoadReport:
    """Fills `tp` (from `fxtp.transform`, typically of a model built under `fxtp.init_empty()`)
    with this rank's slices of the checkpoint in `path`: a directory holding `model.safetensors`
    or sharded `model-*.safetensors` with `model.safetensors.index.json`, or one file.
    `adapter`: a PEFT adapter directory (`adapter_model.safetensors`) for a PEFT model's LoRA
    weights, the base weights coming from `path`.

    Every tensor is checked (present, full shape, dtype, files whole) before any is read; on
    any problem `CheckpointError` names the tensors and nothing changes. Call it on every rank.
    """
    from .transform import META_KEY

    info = tp.meta.get(META_KEY)
    if info is None:
        raise CheckpointError("fxtp.load takes the result of fxtp.transform")
    if info.lora_fold is not None:
        raise CheckpointError("fxtp.load: the LoRA adapters are folded into the weights; call "
                              "fxtp.unfold_lora(tp) before loading")
    if reader not in ("direct", "safetensors"):
        raise CheckpointError(f"fxtp.load: reader must be 'direct' or 'safetensors', not {reader!r}")
    files = _files(path, "model.safetensors.index.json", "model.safetensors")
    if adapter is not None:
        files += _files(adapter, "adapter_model.safetensors.index.json", "adapter_model.safetensors")
    entries = _headers(files)
    captured = info.plan.captured.gm
    from .passes._util import get_tensor_attr

    # every tensor of tp once, with all of its names (tied weights)
    params = dict(tp.named_parameters(remove_duplicate=False))
    buffers = dict(tp.named_buffers(remove_duplicate=False))
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in {**params, **buffers}.items():
        groups.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    report = LoadReport(files=files)
    plan: list[tuple[list[str], str, _Entry, torch.Tensor]] = []
    missing, shapes, dtypes = [], [], []
    for key, names in groups.items():
        t = tensors[key]
        found = next((c for n in names for c in _candidates(n, adapter_name) if c in entries), None)
        if found is None:
            if names[0] in buffers and t.device.type != "meta":
                report.kept.extend(names)        # a real buffer computed by the model
            else:
                missing.append(names[0] + (f" (or {', '.join(names[1:])})" if names[1:] else ""))
            continue
        e = entries[found]
        full = tuple(get_tensor_attr(captured, names[0]).shape)
        if e.shape != full:
            shapes.append(f"{found}: {list(e.shape)} in the checkpoint, {list(full)} expected")
        elif DTYPES.get(e.dtype) != t.dtype:
            dtypes.append(f"{found}: {e.dtype} in the checkpoint, {t.dtype} in the model")
        plan.append((names, found, e, t))
    if missing or shapes or dtypes:
        raise CheckpointError(_problems(missing, shapes, dtypes, len(groups), entries,
                                        {f for _, f, _, _ in plan}, path))
    # read every local slice into new tensors
    new: list[tuple[list[str], torch.Tensor]] = []
    handles: dict = {}
    opened: dict[str, object] = {}
    try:
        for names, found, e, t in plan:
            rec = next((info.param_slices[n] for n in names if n in info.param_slices), None)
            dim, runs = (rec[0], _runs(rec[1])) if rec else (0, [(0, e.shape[0] if e.shape else 1)])
            out = torch.empty(t.shape, dtype=t.dtype)
            if reader == "direct":
                if e.file not in opened:
                    opened[e.file] = open(e.file, "rb", buffering=0)
                report.bytes_read += _read_into(opened[e.file], e, dim, runs, out)
            else:
                report.bytes_read += _read_with_safetensors(handles, found, e, dim, runs, out)
            report.bytes_loaded += out.numel() * out.element_size()
            report.full_bytes += e.end - e.start
            for n in names:
                report.tensors[n] = found
            new.append((names, out))
        ok = True
    except OSError as err:
        ok, failure = False, f"{type(err).__name__}: {err}"
    except CheckpointError as err:
        ok, failure = False, str(err)
    finally:
        for f in opened.values():
            f.close()
        handles.clear()
    if not _all_ranks_ok(ok, info):
        raise CheckpointError(failure if not ok else
                              "fxtp.load: another rank failed to read its slices (see its "
                              "error); nothing was loaded")
    from .passes._util import set_tensor_attr

    for names, out in new:
        set_tensor_attr(tp, names[0], out)   # every alias (tied names) gets the same tensor
    _retarget_devices(tp, torch.device("cpu"))
    info.unloaded = meta_tensors(tp)
    return report


def _retarget_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """A graph captured from a meta model has `device=meta` baked into some ops (export's
    `_assert_tensor_metadata` checks, factory calls, `to(device)`): point them at the device
    the weights were loaded to."""
    def fix(a):
        if isinstance(a, torch.device) and a.type == "meta":
            return device
        if isinstance(a, (list, tuple)):
            return type(a)(fix(x) for x in a)
        if isinstance(a, dict):
            return {k: fix(v) for k, v in a.items()}
        return a

    changed = False
    for n in gm.graph.nodes:
        args, kwargs = fix(n.args), fix(n.kwargs)
        if args != n.args or kwargs != n.kwargs:
            n.args, n.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def _all_ranks_ok(ok: bool, info) -> bool:
    """In a process group, every rank swaps its tensors in only if every rank read them."""
    import torch.distributed as dist

    if info.world_size == 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0])
    flag = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(flag, "min", info.group_name))
    return bool(flag.item())


def _problems(missing, shapes, dtypes, n_tensors, entries, used, path) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing: {_show(missing)}")
    if shapes:
        parts.append(f"{len(shapes)} with another shape: {_show(shapes)}")
    if dtypes:
        parts.append(f"{len(dtypes)} with another dtype: {_show(dtypes)}")
    msg = f"fxtp.load: the checkpoint {path} does not fit the model: " + "; ".join(parts) + "."
    if len(missing) + len(shapes) > n_tensors // 2:
        unused = sorted(set(entries) - used)
        msg += (f" Most of the model's {n_tensors} tensors do not match: this looks like a "
                f"checkpoint of another architecture or config (it holds "
                f"{_show(unused) if unused else 'nothing else'}).")
    if missing and any(".default." in m or "lora_" in m for m in missing):
        msg += " LoRA weights come from the adapter directory: fxtp.load(tp, base, adapter=dir)."
    msg += (" Load the checkpoint written for this model's config, or build the model with the "
            "checkpoint's config (AutoConfig.from_pretrained(dir)); a non-persistent buffer "
            "missing here needs the model built under fxtp.init_empty() so it keeps its value. "
            "Nothing was loaded.")
    return msg


def meta_tensors(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters and buffers of `module` still on the meta device."""
    return tuple(n for n, t in [*module.named_parameters(remove_duplicate=False),
                                *module.named_buffers(remove_duplicate=False)]
                 if t.device.type == "meta")
