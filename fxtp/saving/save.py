"""fxtp.save: a tensor-parallel model (trained, LoRA-tuned) back to a standard checkpoint.

    fxtp.save(tp, "out")              # on every rank: a Hugging Face directory, or a PEFT
                                      # adapter directory for a PEFT model (merged=True: the
                                      # base with the adapters merged)
    AutoModelForCausalLM.from_pretrained("out")      # or fxtp.load(tp2, "out") at any world size

Every rank, in the same order:
1. What to write (`layout.plan_tensors`, from the weightless copy of the model fxtp keeps) and
   the checks: tp loaded and not folded, the directory empty or `overwrite=True`.
2. Agreement 1, timeout-guarded (`gather_objects`): every rank's status, a checksum of its
   layout and its slice records; rank 0's token names the temporary directory
   `.<name>.fxtp-partial-<token>` beside `path`. Any rank's failure stops every rank here.
3. Every rank writes the files it owns there (`assemble.Assembler`: one tensor at a time,
   gathered from the slices of the ranks that hold it); rank 0 also writes the configs and
   the index. A rank whose disk fails keeps exchanging so its peers do not wait on it.
4. Agreement 2: every rank's status and file sizes. All ok: rank 0 checks that it sees every
   file (the path must be on a filesystem every rank sees) and renames the directory to `path`
   (an old one, `overwrite=True`, moved aside first, removed after). Otherwise the temporary
   directory is removed: nothing half-written is left looking like a checkpoint.
5. Agreement 3: rank 0's result, so every rank returns, or raises, together.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import fx

from ..errors import (
    LoraStateError,
    MetaTensorError,
    SaveError,
)
from ..graph.tensors import meta_tensors
from ..rewrite.lora_fold import merged_weights
from .assemble import Assembler
from .directory import (
    begin,
    check_target,
    finish,
    target_path,
    temporary_dir,
    transformed,
)
from .layout import Layout, _peft_model, index_json, plan_tensors
from .writer import TensorFile

SHOWN = 5


@dataclass
class SaveReport:
    """What `fxtp.save` did on this rank."""

    path: str
    kind: str                     # "model", "adapter", "merged" or "state_dict"
    files: list[str] = field(default_factory=list)       # its tensor files and index
    written: list[str] = field(default_factory=list)     # the files this rank wrote
    tensors: int = 0              # tensors this rank wrote
    bytes_written: int = 0        # tensor bytes this rank wrote
    peak_staged: int = 0          # most bytes held at once for one tensor beyond the shard
    largest_tensor: int = 0       # bytes of the largest tensor this rank wrote
    notes: list[str] = field(default_factory=list)


def save(tp: fx.GraphModule, path: Union[str, os.PathLike], *, merged: bool = False,
         overwrite: bool = False, max_shard_size: Union[int, str] = "50GB") -> SaveReport:
    """Writes `tp` (from `fxtp.transform`) to the directory `path` as a standard checkpoint;
    call it on every rank of `tp`'s group. No rank ever holds the full model: each writes the
    tensors it owns, gathered one at a time from the ranks' slices.

    A Hugging Face model: `config.json`, `generation_config.json` (a model that generates),
    `model.safetensors` or `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json` (about one file per rank; `max_shard_size` splits larger
    ones), the tensors and names `save_pretrained` writes. A PEFT model: the adapter directory
    `PeftModel.save_pretrained` writes (`adapter_config.json`, `adapter_model.safetensors`), or
    with `merged=True` the base model with the adapters merged. Any other module:
    `model.safetensors` of its state_dict (`safetensors.torch.load_model` reads it).

    `path` must be on a filesystem every rank sees (any local path on one node). A non-empty
    directory raises `SaveError` unless `overwrite=True`, which replaces it as a whole (files
    fxtp does not write, such as a tokenizer's, are not kept: save those after). The files are
    written to a temporary directory beside `path` and renamed once every rank is done, so a
    failure (a full disk, a lost rank) leaves nothing at `path`. LoRA folded into the weights
    (`fxtp.fold_lora`) raises `LoraStateError` (call `fxtp.unfold_lora` first), except for
    a PEFT model's adapters (unchanged by folding) and `merged=True` (folded is merged)."""
    gm, info, group = transformed(tp, "fxtp.save")
    rank = info.rank
    made: dict[str, Any] = {}

    def prepare() -> dict:
        made["path"] = target_path(path, "fxtp.save")
        made["layout"], made["merge"] = _prepare(gm, info, merged, max_shard_size)
        check_target(made["path"], overwrite, "fxtp.save")
        return {"layout": made["layout"].digest(),
                "token": secrets.token_hex(6) if rank == 0 else "",
                "slices": {n: [d, [list(r) for r in runs]]
                           for n, (d, runs) in info.param_slices.items()}}

    rows = begin(prepare, group, "fxtp.save")
    path, layout, merge = made["path"], made["layout"], made["merge"]
    if len({r["layout"] for r in rows}) != 1:
        raise SaveError("fxtp.save: the ranks would write different checkpoints (another model, "
                        "plan or merged= on some ranks); call fxtp.save with the same arguments "
                        "on every rank of the same transformed model. Nothing was written.")
    slices = [{n: (d, tuple((a, b) for a, b in runs)) for n, (d, runs) in r["slices"].items()}
              for r in rows]
    tmp = temporary_dir(path, rows[0]["token"])
    report = SaveReport(path, layout.kind, [f.name for f in layout.files]
                        + ([layout.index] if layout.index else []), notes=list(layout.notes))
    written = _write_part(gm, layout, slices, rank, group, merge, tmp, report)
    finish(written, rank, group, tmp, path, overwrite, report.written, "fxtp.save")
    return report


def _prepare(gm: fx.GraphModule, info, merged: bool, max_shard_size) -> tuple[Layout, dict]:
    """The layout, and the merged shards' makers (merged=True on an unfolded PEFT graph)."""
    if info.skeleton is None:
        raise SaveError(f"fxtp.save: {info.skeleton_error or 'no copy of the model was kept'}; "
                        "fxtp.save reads the model's names and config from that copy")
    unloaded = meta_tensors(gm)
    if unloaded:
        raise MetaTensorError(f"fxtp.save: {len(unloaded)} tensor(s) are still on the meta "
                              f"device ({', '.join(unloaded[:SHOWN])}): fill them with "
                              "fxtp.load(tp, checkpoint) first")
    peft = _peft_model(info.skeleton)
    folded = info.state.lora_fold is not None
    if folded and not peft:
        raise LoraStateError("fxtp.save: the LoRA adapters are folded into the weights; call "
                             "fxtp.unfold_lora(tp) before saving")
    layout = plan_tensors(gm, info.skeleton, merged, info.world_size, _shard_bytes(max_shard_size))
    merge: dict = {}
    if merged and not folded:
        merge, consumed = merged_weights(gm, info.plan.solution.linears,
                                         f"the tensor-parallel graph of {info.plan.model_name}")
        _check_all_merged(info.skeleton, consumed)
    return layout, merge


def _check_all_merged(skel, consumed: set[str]) -> None:
    """Every adapter weight PEFT would merge must belong to a LoRA branch fxtp found in the
    graph; one it did not find would be silently left out of the merged weights."""
    from peft import get_peft_model_state_dict

    sd = skel.state_dict(keep_vars=True)
    ident = {id(v): k for k, v in sd.items()}
    for adapter in skel.active_adapters:
        state = get_peft_model_state_dict(skel, state_dict=dict(sd), adapter_name=adapter)
        lost = sorted(ident[id(v)] for v in state.values()
                      if id(v) in ident and ident[id(v)] not in consumed)
        if lost:
            raise SaveError(f"fxtp.save(merged=True): fxtp found no LoRA branch in the graph for "
                            f"{len(lost)} adapter weight(s) ({', '.join(lost[:SHOWN])}), so it "
                            "cannot merge them; save the adapter (merged=False) instead")


def _shard_bytes(size: Union[int, str]) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError) as e:
        raise SaveError(f"fxtp.save: max_shard_size must be bytes or a size such as '5GB', got "
                        f"{size!r}") from e
    if not isinstance(n, int) or n <= 0:
        raise SaveError(f"fxtp.save: max_shard_size must be positive, got {size!r}")
    return n


def _write_part(gm, layout: Layout, slices, rank: int, group, merge, tmp: str,
                report: SaveReport) -> dict:
    """This rank's files (and rank 0's configs and index) in `tmp`; its status for agreement 2.
    A failed exchange (a lost peer) raises: the peers are failing too."""
    status: dict[str, Any] = {"ok": True, "error": "", "sizes": {}}
    errors: list[BaseException] = []
    files: dict[int, TensorFile] = {}
    assembler = None
    try:
        os.makedirs(tmp, exist_ok=True)
        for i, f in enumerate(layout.files):
            if f.owner == rank:
                target = os.path.join(tmp, f.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                files[i] = TensorFile(target, f.entries)
                report.written.append(f.name)
        assembler = Assembler(gm, layout, slices, rank, group, merge)
    except (OSError, TypeError, SaveError) as e:
        errors.append(e)
    if assembler is None:       # cannot take part: the peers' exchange would wait on it
        status.update(ok=False, error=f"fxtp.save: rank {rank} could not start writing in "
                      f"{tmp}: {type(errors[0]).__name__}: {errors[0]}")
        _close(files, ok=False)
        return status
    try:
        with torch.no_grad():
            assembler.run(files, errors.append)
    except BaseException:
        _close(files, ok=False)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.tensors = sum(len(layout.files[i].entries) for i in files)
    report.bytes_written, report.peak_staged = assembler.bytes_written, assembler.peak_staged
    report.largest_tensor = assembler.largest
    try:
        _close(files, ok=not errors)
        if rank == 0 and not errors:
            for write_config in layout.configs:
                write_config(tmp)
            if layout.index:
                with open(os.path.join(tmp, layout.index), "w", encoding="utf-8") as out:
                    out.write(index_json(layout))
    except (OSError, ValueError, TypeError) as e:
        errors.append(e)
    if errors:
        e = errors[0]
        status.update(ok=False, error=f"fxtp.save: rank {rank} could not write its part in "
                      f"{tmp}: {type(e).__name__}: {e}")
    status["sizes"] = {layout.files[i].name: f.size for i, f in files.items()}
    return status


def _close(files: dict[int, TensorFile], ok: bool) -> None:
    for f in files.values():
        f.close(sync=ok)
