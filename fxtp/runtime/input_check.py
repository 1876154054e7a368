"""`fxtp.transform(..., check_inputs=True)`: every call compares its inputs across the ranks.

Every rank must call the tensor-parallel graph with the same inputs: the graph's all-reduces
sum partial results that were computed from each rank's own inputs, so ranks fed different
batches all return garbage, silently. With the check on, each call gathers a few int64 per
input (a layout checksum and a checksum of the values, `agreement.tensor_digest`, computed
where the inputs are) and raises `InputMismatchError` on every rank when any differ, before the
graph runs: no rank is left waiting in a collective, and the ranks stay in step for the next
call. A rank whose inputs fxtp itself rejects (`InputError`) still takes part, flagged, so the
others raise too. Off by default: it costs a gather and a host sync per call
(`bench/checks.py` measures it).
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from ..errors import InputMismatchError
from .agreement import differing, guarded_gather, rank_groups, tensor_digest
from .group import collective_device

WHAT = "the input check of the tensor-parallel model (check_inputs=True)"


def slot_names(arg_count: int, kwarg_names: Sequence[str]) -> list[str]:
    """The inputs compared: each captured positional argument, then each captured keyword."""
    return [f"positional input {i}" for i in range(arg_count)] + list(kwarg_names)


def _layout(value: Any) -> tuple[str, list[torch.Tensor]]:
    """The structure of one input as text (tree, shapes, dtypes, non-tensor values) and its
    tensors."""
    leaves, spec = pytree.tree_flatten(value)
    parts, tensors = [str(spec)], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(f"tensor{list(leaf.shape)}:{leaf.dtype}")
            tensors.append(leaf)
        else:
            parts.append(repr(leaf))
    return "|".join(parts), tensors


def input_fingerprint(slots: Sequence[str], args: tuple, kwargs: dict, failed: bool,
                      device: torch.device) -> torch.Tensor:
    """`[failed, layout_0, values_0, layout_1, values_1, ...]` as int64 on `device`."""
    out = [torch.tensor(int(failed), dtype=torch.int64, device=device)]
    for i, name in enumerate(slots):
        if failed:
            out += [torch.zeros((), dtype=torch.int64, device=device)] * 2
            continue
        value = args[i] if i < len(args) else (kwargs[name] if name in kwargs else "<missing>")
        text, tensors = _layout(value)
        out.append(torch.tensor(zlib.crc32(text.encode()), dtype=torch.int64, device=device))
        digests = [tensor_digest(t).to(device) for t in tensors]
        out.append(tensor_digest(torch.stack(digests)) if digests
                   else torch.zeros((), dtype=torch.int64, device=device))
    return torch.stack(out)


@torch._dynamo.disable   # a host-side check between calls, not part of a compiled graph
def check_inputs(slots: Sequence[str], args: tuple, kwargs: dict, group: str, rank: int,
                 failed: bool = False) -> None:
    """Gathers every rank's input fingerprint; raises `InputMismatchError` on every rank if
    any rank's inputs differ from the others' or could not be taken (`failed`)."""
    table = guarded_gather(input_fingerprint(slots, args, kwargs, failed,
                                             collective_device(group)), group, WHAT)
    flags = table[:, 0].tolist()
    if any(flags):
        if failed:
            return          # this rank raises its own InputError
        bad = [r for r, f in enumerate(flags) if f]
        raise InputMismatchError(
            f"fxtp: rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} could not take "
            f"its inputs (see that rank's InputError; this is rank {rank}): every rank must "
            "call the tensor-parallel model with the same inputs.")
    cols = differing(table[:, 1:])
    if cols:
        names = []
        for c in cols:
            name = slots[c // 2]
            if name not in [n for n, _ in names]:
                names.append((name, c))
        shown = ", ".join(f"{n} ({'layout' if c % 2 == 0 else 'values'}: "
                          f"{rank_groups(table[:, 1 + c].tolist())})" for n, c in names)
        raise InputMismatchError(
            f"fxtp: the ranks called the tensor-parallel model with different inputs: {shown}; "
            f"this is rank {rank}. Every rank must pass the same inputs (the graph sums partial "
            "results across the ranks): broadcast them from rank 0 "
            "(torch.distributed.broadcast) or give every rank the same data loader seed.")


def failed_input(slots: Sequence[str], group: str, rank: int) -> None:
    """This rank rejected its inputs: it still takes part in the gather, flagged."""
    check_inputs(slots, (), {}, group, rank, failed=True)
