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
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import fx, nn

from .errors import CheckpointError, DtypeError, LoraStateError, WeightMismatchError
from .graph.devices import resolve_device, retarget_devices
from .graph.nodes import get_tensor_attr, set_tensor_attr, written_in_place
from .graph.tensors import floating_param_dtypes, meta_tensors, tensor_attrs
from .rewrite.record import META_KEY
from .runtime.agreement import agree_on_digests, tensor_digest
from .runtime.weight_check import checkpoint_digest, mismatch_message

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
    zeroed: list[str] = field(default_factory=list)           # state (KV cache) made as zeros
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
    try:
        for name, rec in meta.items():
            if name == "__metadata__":
                continue
            a, b = (int(x) for x in rec["data_offsets"])
            shape = tuple(int(x) for x in rec["shape"])
            item = DTYPES[rec["dtype"]].itemsize if rec["dtype"] in DTYPES else None
            if not 0 <= a <= b or min(shape, default=0) < 0 or (
                    item is not None and b - a != math.prod(shape) * item):
                raise ValueError(f"{name}: {b - a} bytes at {a}..{b} for a {rec['dtype']} "
                                 f"tensor of shape {list(shape)}")
            out[name] = _Entry(path, str(rec["dtype"]), shape, base + a, base + b)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"fxtp.load: {path} is not a safetensors file fxtp can read: its "
                              f"header does not describe tensors ({type(e).__name__}: {e}). "
                              "Write it with safetensors (model.save_pretrained(dir, "
                              "safe_serialization=True)); nothing was loaded.") from e
    end = max((e.end for e in out.values()), default=base)
    if end > size:
        raise CheckpointError(
            f"fxtp.load: {path} is truncated: its header describes {end} bytes of data, the file "
            f"has {size}. Write the checkpoint again (an interrupted copy or save); nothing was "
            "loaded.")
    return out


def _files(path: str, index_name: str, single: str) -> list[str]:
    """The safetensors files of a checkpoint directory (or one file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"fxtp.load: the checkpoint path must be a str or os.PathLike "
                              f"(a directory of *.safetensors, or one file), got "
                              f"{type(path).__name__}")
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"fxtp.load: {path} is neither a directory nor a file")
    index = os.path.join(path, index_name)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(path, v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"fxtp.load: cannot read the index {index} ({type(e).__name__}: "
                                  f"{e}); it must map tensor names to files under "
                                  "'weight_map': write the checkpoint again") from e
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


def load(tp: Any, path: str, *, device: Union[str, torch.device, None] = None,
         dtype: Optional[torch.dtype] = None, adapter: Optional[str] = None,
         adapter_name: str = "default", reader: str = "direct") -> LoadReport:
    """Fills `tp` (from `fxtp.transform`, typically of a model built under `fxtp.init_empty()`,
    or an `fxtp.generator` of one) with this rank's slices of the checkpoint in `path`: a
    directory holding `model.safetensors` or sharded `model-*.safetensors` with
    `model.safetensors.index.json`, or one file. `adapter`: a PEFT adapter directory
    (`adapter_model.safetensors`) for a PEFT model's LoRA weights, the base weights coming from
    `path`.

    `device`: where the local tensors go (`f"cuda:{local_rank}"`; default: where the graph's
    real tensors are, else the CPU). The whole graph moves there: the buffers the model
    computed, the KV cache of a generator (zeros), and the devices baked into the graph.
    `dtype`: the floating dtype the model was built (and captured) in; checkpoint tensors of
    another floating dtype are cast while reading (a bf16 checkpoint into fp32 and back). A
    `dtype` other than the model's raises `DtypeError`: build the model in that dtype.

    Every tensor is checked (present, full shape, dtype, files whole) before any is read; on
    any problem `CheckpointError` names the tensors and nothing changes. Each tensor is read
    into a host buffer of its local size and moved to `device`: at most one tensor is staged
    in host memory. Call it on every rank.
    """
    gm = tp if isinstance(tp, fx.GraphModule) else getattr(tp, "tp", None)
    info = gm.meta.get(META_KEY) if isinstance(gm, fx.GraphModule) else None
    if info is None:
        raise CheckpointError("fxtp.load takes the result of fxtp.transform or fxtp.generator, "
                              f"not {type(tp).__name__}")
    if info.state.lora_fold is not None:
        raise LoraStateError("fxtp.load: the LoRA adapters are folded into the weights; call "
                             "fxtp.unfold_lora(tp) before loading")
    if reader not in ("direct", "safetensors"):
        raise CheckpointError(f"fxtp.load: reader must be 'direct' or 'safetensors', not {reader!r}")
    target = target_device(gm, device)
    _check_dtype(gm, dtype)
    files = _files(path, "model.safetensors.index.json", "model.safetensors")
    if adapter is not None:
        files += _files(adapter, "adapter_model.safetensors.index.json", "adapter_model.safetensors")
    entries = _headers(files)
    captured = info.plan.captured.gm

    # every tensor of tp once, with all of its names (tied weights)
    named = tensor_attrs(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    state = written_in_place(gm)
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in named.items():
        groups.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    report = LoadReport(files=files)
    plan: list[tuple[list[str], str, _Entry, torch.Tensor]] = []
    moved: list[tuple[list[str], torch.Tensor]] = []     # tensors not in the checkpoint
    missing, shapes, dtypes = [], [], []
    for key, names in groups.items():
        t = tensors[key]
        found = next((c for n in names for c in _candidates(n, adapter_name) if c in entries), None)
        if found is None:
            if t.device.type != "meta" and names[0] not in params:
                # a real buffer computed by the model, or a constant the capture lifted from
                # the forward (Falcon's index lists): it moves with the graph
                report.kept.extend(names)
                moved.append((names, t))
            elif names[0] in state:              # a KV cache: state the graph writes
                report.zeroed.extend(names)
                moved.append((names, t))
            else:
                missing.append(names[0] + (f" (or {', '.join(names[1:])})" if names[1:] else ""))
            continue
        e = entries[found]
        full = tuple(get_tensor_attr(captured, names[0]).shape)
        if e.shape != full:
            shapes.append(f"{found}: {list(e.shape)} in the checkpoint, {list(full)} expected")
        elif DTYPES.get(e.dtype) != t.dtype and not _castable(DTYPES.get(e.dtype), t.dtype):
            dtypes.append(f"{found}: {e.dtype} in the checkpoint, {t.dtype} in the model")
        plan.append((names, found, e, t))
    if missing or shapes or dtypes:
        raise CheckpointError(_problems(missing, shapes, dtypes, len(groups), entries,
                                        {f for _, f, _, _ in plan}, path))
    # read every local slice into new tensors on the target device
    new: list[tuple[list[str], torch.Tensor]] = []
    whole: list[tuple[str, torch.Tensor]] = []     # read whole by every rank: compared
    staging = _Staging()
    handles: dict = {}
    opened: dict[str, object] = {}
    failure = ""
    try:
        for names, found, e, t in plan:
            rec = next((info.param_slices[n] for n in names if n in info.param_slices), None)
            dim, runs = rec if rec else (0, ((0, e.shape[0] if e.shape else 1),))
            # read straight into the result where it is a host tensor of the checkpoint's
            # dtype; otherwise into one reused host buffer, then cast and move
            direct = target.type == "cpu" and DTYPES[e.dtype] == t.dtype
            host = (torch.empty(t.shape, dtype=t.dtype, device="cpu") if direct
                    else staging.view(t.shape, DTYPES[e.dtype]))
            if reader == "direct":
                if e.file not in opened:
                    opened[e.file] = open(e.file, "rb", buffering=0)
                report.bytes_read += _read_into(opened[e.file], e, dim, runs, host)
            else:
                report.bytes_read += _read_with_safetensors(handles, found, e, dim, runs, host)
            out = host if direct else host.to(device=target, dtype=t.dtype, copy=True)
            del host
            report.bytes_loaded += out.numel() * out.element_size()
            report.full_bytes += e.end - e.start
            for n in names:
                report.tensors[n] = found
            new.append((names, out))
            if rec is None:
                whole.append((found, out))
        for names, t in moved:
            new.append((names, torch.zeros(t.shape, dtype=t.dtype, device=target)
                        if t.device.type == "meta" else t.to(target)))
        ok = True
    except (OSError, RuntimeError) as err:    # RuntimeError: out of device memory
        ok, failure = False, f"{type(err).__name__}: {err}"
    except CheckpointError as err:
        ok, failure = False, str(err)
    finally:
        for f in opened.values():
            f.close()
        handles.clear()
        staging.release()
    layout = checkpoint_digest((f, e.shape, e.dtype) for _, f, e, _ in plan)
    if not _all_ranks_agree(ok, info, layout, whole, path):
        raise CheckpointError(failure if not ok else
                              "fxtp.load: another rank failed to read its slices (see its "
                              "error); nothing was loaded")
    for names, out in new:
        set_tensor_attr(gm, names[0], out)   # every alias (tied names) gets the same tensor
    retarget_devices(gm, target)
    info.state.unloaded = meta_tensors(gm)
    return report


class _Staging:
    """One host buffer, grown to the largest tensor read through it and reused: a tensor that
    is cast or moved to another device is read here first. Separate buffers per tensor leave
    the freed ones' pages to the allocator's fragments (a bf16 load of an fp32 checkpoint then
    peaked at 1.84x its shard, against 1.4x with one buffer: the shard plus the largest tensor)."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8, device="cpu")

    def view(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if n > self._buf.numel():
            self._buf = torch.empty(0, dtype=torch.uint8, device="cpu")   # free the old first
            self._buf = torch.empty(n, dtype=torch.uint8, device="cpu")
        return self._buf[:n].view(dtype).view(shape)

    def release(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8, device="cpu")


def target_device(gm: fx.GraphModule, device: Union[str, torch.device, None],
                  what: str = "fxtp.load") -> torch.device:
    """`device`, or where the graph's real tensors already are (the model's computed buffers),
    or the CPU (fxtp.load and fxtp.load_state)."""
    if device is None:
        real = [t.device for t in tensor_attrs(gm).values() if t.device.type != "meta"]
        return real[0] if real else torch.device("cpu")
    try:
        target = resolve_device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{what}: device={device!r} is not a device: {e}") from e
    if target.type == "meta":
        raise CheckpointError(f"{what}: device='meta' holds no values; name the device the "
                              "weights go to (e.g. f'cuda:{local_rank}' or 'cpu')")
    return target


def _check_dtype(gm: fx.GraphModule, dtype: Optional[torch.dtype]) -> None:
    """The floating dtype is the one the model was captured in: the graph's casts, masks and
    constants were recorded in it, so loading weights of another dtype into it would compute
    in a mix of both."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DtypeError(f"fxtp.load: dtype must be a floating torch.dtype, got {dtype!r}")
    built = sorted(map(str, floating_param_dtypes(gm)))
    if built and built != [str(dtype)]:
        raise DtypeError(
            f"fxtp.load: dtype={dtype} but the model was built and captured in {', '.join(built)}. "
            f"The graph's casts and masks are in that dtype: build the model in {dtype} "
            f"(AutoModelForCausalLM.from_config(cfg, dtype={dtype}) under fxtp.init_empty()) "
            "before fxtp.transform, or leave dtype out to cast the checkpoint to the model's dtype.")


def _castable(src: Optional[torch.dtype], dst: torch.dtype) -> bool:
    """A checkpoint tensor is cast while reading between floating dtypes only."""
    return src is not None and src.is_floating_point and dst.is_floating_point


def _all_ranks_agree(ok: bool, info, layout: torch.Tensor,
                     whole: list[tuple[str, torch.Tensor]], path: str) -> bool:
    """In a process group, every rank swaps its tensors in only if every rank read them (one
    guarded gather: a lost rank raises `RankLostError`, never hangs). With the weight check on
    (`transform(check_weights=True)`), the ranks must also have read the same checkpoint: the
    same layout, and the same values of every tensor each of them read whole (norms, tensors
    kept replicated); otherwise `WeightMismatchError` on every rank, and nothing is loaded."""
    if info.world_size == 1 or not dist.is_initialized():
        return ok
    names, digests = [], None
    if info.check_weights:
        names = ["<checkpoint layout>"] + [n for n, _ in whole]
        if ok:
            dev = whole[0][1].device if whole else layout.device
            digests = torch.stack([layout.to(dev)] + [tensor_digest(t) for _, t in whole])
    all_ok, differ, table = agree_on_digests(names, digests, info.group_name,
                                             "the agreement step of fxtp.load", ok)
    if all_ok and differ:
        raise WeightMismatchError(mismatch_message(
            "fxtp.load", differ, table, names, len(names),
            f"The ranks read different checkpoints ({path} on this rank, rank {info.rank}): "
            "every rank must load the same one (the same directory, or identical copies). "
            "Nothing was loaded. check_weights=False at fxtp.transform skips this comparison."))
    return all_ok


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
