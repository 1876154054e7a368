"""fxtp.save_state / fxtp.load_state: a training snapshot, resumed at the same world size.

    fxtp.save_state(tp, "step_1000", optimizer=opt)     # every rank: its shards + its optimizer
    fxtp.load_state(tp, "step_1000", optimizer=opt)     # the same world size and plan

`fxtp.save` writes the portable checkpoint (transformers reads it, any world size loads it) by
gathering each tensor from the ranks' slices. A snapshot to resume training needs neither: each
rank writes its own shards and its optimizer's state, in parallel, with
`torch.distributed.checkpoint` (DCP), under keys of its own rank (`rank<r>.model.<name>`,
`rank<r>.optimizer....`): DCP takes equal keys on several ranks for one replicated tensor and
writes it once, which would lose every shard but one. `fxtp_state.json` records the world size
and a checksum of each rank's local layout (names, shapes, dtypes): a snapshot read at another
world size, or into a graph planned differently, raises `CheckpointError` before anything is
read. Resharding the optimizer state is not done: to change the world size, `fxtp.save` the
weights and start a new optimizer.

Both go through the same temporary-directory protocol as `fxtp.save` (directory.py); loading
reads into new tensors and swaps them in only once every rank read its part, so a failed load
changes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from typing import Any, Iterator, Optional, Union

import torch
from torch import fx

from .._load import target_device
from ..errors import CheckpointError, LoraStateError, MetaTensorError
from ..graph.devices import retarget_devices
from ..graph.nodes import get_tensor_attr, set_tensor_attr
from ..graph.tensors import meta_tensors, tensor_attrs
from .directory import (
    agree,
    begin,
    check_target,
    finish,
    raise_for_others,
    target_path,
    temporary_dir,
    transformed,
)

FILE = "fxtp_state.json"
FORMAT = "fxtp-training-state"
SHOWN = 5


def save_state(tp: fx.GraphModule, path: Union[str, os.PathLike], *,
               optimizer: Optional[torch.optim.Optimizer] = None,
               overwrite: bool = False) -> None:
    """Writes this rank's shards of `tp` (from `fxtp.transform`) and, when given, the state of
    `optimizer` (built on `tp.parameters()`) into the directory `path`; call it on every rank.
    `fxtp.load_state` resumes from it at the same world size. `path` is handled as in
    `fxtp.save`: a filesystem every rank sees, a non-empty directory only with
    `overwrite=True`, nothing left at `path` when any rank fails."""
    what = "fxtp.save_state"
    gm, info, group = transformed(tp, what)
    rank = info.rank
    made: dict[str, Any] = {}

    def prepare() -> dict:
        made["path"] = target_path(path, what)
        unloaded = meta_tensors(gm)
        if unloaded:
            raise MetaTensorError(f"{what}: {len(unloaded)} tensor(s) are still on the meta "
                                  f"device ({', '.join(unloaded[:SHOWN])}): nothing to save")
        if info.state.lora_fold is not None:
            raise LoraStateError(f"{what}: the LoRA adapters are folded into the weights; call "
                                 "fxtp.unfold_lora(tp) first, so the snapshot holds the base "
                                 "weights training resumes from")
        _check_optimizer(gm, optimizer, what)
        check_target(made["path"], overwrite, what)
        return {"token": secrets.token_hex(6) if rank == 0 else "", "layout": layout_digest(gm)}

    rows = begin(prepare, group, what)
    path = made["path"]
    tmp = temporary_dir(path, rows[0]["token"])
    written: dict[str, Any] = {"ok": True, "error": "", "sizes": {}}
    try:
        import torch.distributed.checkpoint as dcp

        os.makedirs(tmp, exist_ok=True)
        with _single_process_quiet():
            dcp.save({f"rank{rank}": _state(gm, optimizer)},
                     storage_writer=dcp.FileSystemWriter(tmp), process_group=group,
                     no_dist=group is None)     # world 1 in a larger job: this rank alone
        if rank == 0:
            record = {"format": FORMAT, "version": 1, "world_size": info.world_size,
                      "model": info.plan.model_name, "optimizer": optimizer is not None,
                      "layouts": [r["layout"] for r in rows]}
            with open(os.path.join(tmp, FILE), "w") as f:
                json.dump(record, f, indent=2)
        mine = [f for f in os.listdir(tmp) if f.startswith(f"__{rank}_")]
        if rank == 0:
            mine += [f for f in (".metadata", FILE) if os.path.exists(os.path.join(tmp, f))]
        written["sizes"] = {f: os.path.getsize(os.path.join(tmp, f)) for f in mine}
    except Exception as e:      # noqa: BLE001 - DCP raises on every rank when any rank fails
        written.update(ok=False, error=f"{what}: rank {rank} could not write its part in "
                       f"{tmp}: {type(e).__name__}: {str(e)[:500]}")
    finish(written, rank, group, tmp, path, overwrite, sorted(written["sizes"]), what)


def load_state(tp: fx.GraphModule, path: Union[str, os.PathLike], *,
               optimizer: Optional[torch.optim.Optimizer] = None,
               device: Union[str, torch.device, None] = None) -> None:
    """Fills `tp` (and `optimizer`, when given) from a snapshot `fxtp.save_state` wrote at the
    same world size, on every rank. `tp` may be built on the meta device (`fxtp.init_empty`):
    its tensors are made on `device` (default: where its real tensors are, else the CPU).
    An optimizer holds parameter objects, so it must be built on `tp.parameters()` once they
    are real: for a meta `tp`, call `load_state(tp, path)` first, build the optimizer, then
    `load_state(tp, path, optimizer=opt)`. Raises `CheckpointError` (nothing changed) for a
    snapshot of another world size or plan, or one without optimizer state."""
    what = "fxtp.load_state"
    gm, info, group = transformed(tp, what)
    rank = info.rank
    made: dict[str, Any] = {}

    def prepare() -> dict:
        made["path"] = os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) \
            else None
        record = _record(made["path"], path, what)
        if record["world_size"] != info.world_size:
            raise CheckpointError(
                f"{what}: {path} was saved at world size {record['world_size']}, this graph runs "
                f"at {info.world_size}. A snapshot resumes at its own world size only: to change "
                "it, write the weights with fxtp.save and load them at the new size with "
                "fxtp.load (the optimizer starts again).")
        if record["layouts"][rank] != layout_digest(gm):
            raise CheckpointError(
                f"{what}: rank {rank}'s tensors differ from those saved in {path} (names, local "
                f"shapes or dtypes): it was saved from another model ({record['model']}) or "
                "plan. Transform the same model with the same plan and world size.")
        if optimizer is not None and not record["optimizer"]:
            raise CheckpointError(f"{what}: {path} holds no optimizer state (saved without "
                                  "optimizer=); load it without optimizer=")
        if optimizer is not None:
            if meta_tensors(gm):
                raise CheckpointError(
                    f"{what}: tp's parameters are on the meta device, so the optimizer holds "
                    "meta parameters that loading replaces. Call fxtp.load_state(tp, path) "
                    "first, build the optimizer on tp.parameters(), then call "
                    "fxtp.load_state(tp, path, optimizer=opt).")
            _check_optimizer(gm, optimizer, what)
        made["target"] = target_device(gm, device, what)
        return {}

    begin(prepare, group, what, CheckpointError, "before reading anything")
    import torch.distributed.checkpoint as dcp

    target = made["target"]
    state, error = _empty_like_state(gm, optimizer, target), ""
    try:
        with _single_process_quiet():
            dcp.load({f"rank{rank}": state}, process_group=group, no_dist=group is None,
                     storage_reader=dcp.FileSystemReader(made["path"]))
    except Exception as e:      # noqa: BLE001 - reported on every rank, nothing swapped in
        error = f"{what}: rank {rank} could not read its part: {type(e).__name__}: {str(e)[:500]}"
    rows = agree({"ok": not error, "error": error}, group, f"the agreement step of {what}")
    if error:
        raise CheckpointError(error + "; nothing was loaded")
    raise_for_others(rows, "to read its part; nothing was loaded", what, CheckpointError)
    _swap_in(gm, state, optimizer, target)
    info.state.unloaded = meta_tensors(gm)


# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it runs in a single process even when asked to (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def layout_digest(gm: fx.GraphModule) -> str:
    """A checksum of this rank's tensors: names, local shapes and dtypes."""
    rows = sorted((n, list(t.shape), str(t.dtype)) for n, t in tensor_attrs(gm).items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _check_optimizer(gm: fx.GraphModule, optimizer, what: str) -> None:
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CheckpointError(f"{what}: optimizer= takes a torch.optim.Optimizer, got "
                              f"{type(optimizer).__name__}")
    mine = {id(p) for p in gm.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in mine)
    if foreign:
        raise CheckpointError(f"{what}: the optimizer holds {foreign} parameter(s) that are not "
                              "tp's (built on the model before fxtp.transform, or before "
                              "fxtp.load replaced them): build it on tp.parameters()")


def _state(gm: fx.GraphModule, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(gm)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(gm, optimizer)
    return state


def _empty_like_state(gm: fx.GraphModule, optimizer, target: torch.device) -> dict:
    """The state's structure with new tensors on `target` for DCP to read into."""
    from torch.utils._pytree import tree_map

    def fresh(v):
        return torch.empty(v.shape, dtype=v.dtype, device=target) if isinstance(
            v, torch.Tensor) else v

    return tree_map(fresh, _state(gm, optimizer))


def _swap_in(gm: fx.GraphModule, state: dict, optimizer, target: torch.device) -> None:
    """The read tensors into tp: new tensors where tp's are meta (and the graph's devices
    follow), copied into the existing ones otherwise (an optimizer keeps its parameters)."""
    moved = False
    with torch.no_grad():
        for name, value in state["model"].items():
            old = get_tensor_attr(gm, name)
            if old.device.type == "meta":
                set_tensor_attr(gm, name, value)
                moved = True
            else:
                old.copy_(value)
    if moved:
        retarget_devices(gm, target)
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(gm, optimizer, state["optimizer"])


def _record(path: Optional[str], given: Any, what: str) -> dict:
    if path is None:
        raise CheckpointError(f"{what}: path must be a str or os.PathLike, got "
                              f"{type(given).__name__}")
    try:
        with open(os.path.join(path, FILE)) as f:
            record = json.load(f)
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        return record
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{what}: {given} is not a snapshot written by fxtp.save_state (no "
                              f"readable {FILE}: {type(e).__name__}: {e}). A checkpoint written "
                              "by fxtp.save or save_pretrained loads with fxtp.load.") from e
