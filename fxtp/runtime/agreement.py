"""Ranks agreeing with each other: fingerprints of tensors, gathered with a timeout path.

A tensor-parallel graph is right only when every rank holds the same weights and takes the same
inputs. fxtp checks that by comparing small fingerprints (a few int64 per tensor) across the
ranks: `guarded_gather` is the one step that does it (weights at transform, the checkpoint at
load, inputs per call with `check_inputs=True`, the generator's prompts). It gathers every
rank's row rather than reducing, so that every rank sees the same table and raises the same
error together, and the error can name the ranks that differ.

A rank that died or hangs must give an error, never a hang. On gloo each gather is preceded by
a monitored barrier with the group's timeout, and every survivor raises `RankLostError` within
the timeout. The lost ranks are named from the barrier's report (a rank that hung) or from a
roll call in the group's store (a rank that died: its connection closed before the barrier
could report it).
NCCL has no monitored barrier: there a lost rank makes the gather wait for the group's timeout
(`init_process_group(timeout=...)`), after which NCCL's watchdog aborts the communicator and,
with `TORCH_NCCL_ASYNC_ERROR_HANDLING` at its default, the process; the rank is not named.
"""
from __future__ import annotations

import datetime
import json
import re
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import RankLostError
from .collectives import ALL_GATHER, WAIT
from .group import collective_device

_ROW = 256                     # elements summed into one int64 before position weighting
_BLOCK_ROWS = 4096             # rows summed per step: bounds the int64 working copy (8 MiB)
_MODULUS = (1 << 61) - 1       # int64 products and sums wrap (mod 2**64, in any order): the
                               # result depends on the bits only; kept positive at the end
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ---------------------------------------------------------------------------------------------
# fingerprints

def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 checksum of the bits of `t`, computed where `t` is (no host copy, no sync).

    The values are read as integers of their own width (bitwise: -0.0 and 0.0 differ, NaNs
    compare), weighted by their position in rows of `_ROW` elements and summed per row, the
    row sums weighted by the row's position (so any two swapped elements differ), all in
    wrapping int64 arithmetic, a block of rows at a time (the widened working copy stays
    small). A checksum, not a cryptographic hash: it tells apart weights drawn with
    another seed or read from another checkpoint, not an adversary."""
    flat = t.detach().reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.contiguous().view(_INT_OF_SIZE[flat.element_size()])
    n = bits.numel()
    rows = n // _ROW
    whole = bits[:rows * _ROW].view(rows, _ROW)
    # products in int32 (vectorised; int64 for 8-byte values), wrapping: odd multipliers make
    # x -> x * w a bijection, so no change of a value is lost
    work = torch.int64 if bits.element_size() == 8 else torch.int32
    columns = (_position_weights(2 * _ROW, bits.device)[_ROW:] | 1).to(work)
    # in blocks: the widened working copy stays small (a whole tensor would be 2-8x it)
    sums = [(whole[r:r + _BLOCK_ROWS].to(work) * columns).sum(dim=1, dtype=torch.int64)
            for r in range(0, rows, _BLOCK_ROWS)]
    if n > rows * _ROW:
        tail = bits[rows * _ROW:].to(work)
        sums.append((tail * columns[:tail.numel()]).sum(dtype=torch.int64).reshape(1))
    if not sums:
        return torch.zeros((), dtype=torch.int64, device=bits.device)
    row_sums = torch.cat(sums) if len(sums) > 1 else sums[0]
    weighted = (row_sums * _position_weights(row_sums.numel(), bits.device)).sum()
    return (weighted + n * 0x9E3779B9).remainder_(_MODULUS)    # the size too: zeros differ


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    """1 + (i * 2654435761 mod 1000003) for positions 0..n-1: distinct small multipliers
    (kept per device and grown as needed: computing them cost as much as the checksum)."""
    have = _WEIGHTS.get(device)
    if have is None or have.numel() < n:
        size = max(n, 2 * (have.numel() if have is not None else 0), 1024)
        have = _WEIGHTS[device] = (torch.arange(size, dtype=torch.int64, device=device)
                                   * 2654435761 % 1000003 + 1)
    return have[:n]


def combine(digests: torch.Tensor) -> torch.Tensor:
    """One checksum of a 1-D int64 tensor of checksums, order-sensitive."""
    if digests.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=digests.device)
    return tensor_digest(digests)


# ---------------------------------------------------------------------------------------------
# the guarded gather

def resolve(group: "dist.ProcessGroup | str | None") -> dist.ProcessGroup:
    """A process group from itself, its name, or None (the default group)."""
    if isinstance(group, str):
        return dist.distributed_c10d._resolve_process_group(group) if group else dist.group.WORLD
    return group if group is not None else dist.group.WORLD


def group_timeout(group: dist.ProcessGroup) -> datetime.timedelta:
    """The timeout the group was created with (`init_process_group(timeout=)`, `new_group`)."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except Exception:   # backends without options, or none registered for the CPU
        return dist.default_pg_timeout


def guarded_gather(values: torch.Tensor, group: "dist.ProcessGroup | str | None",
                   what: str) -> torch.Tensor:
    """Every rank's 1-D int64 `values`, as a `[world_size, n]` CPU tensor in rank order.

    Call it on every rank with the same `n`. `what` names the step in errors ("the weight
    check of fxtp.transform"). A rank that does not arrive within the group's timeout (dead,
    hung, or elsewhere) makes every rank that did arrive raise `RankLostError` naming it (gloo);
    the gather's own failure is a `RankLostError` too."""
    pg = resolve(group)
    world = dist.get_world_size(pg)
    rank = dist.get_rank(pg)
    timeout = group_timeout(pg)
    if "gloo" in str(dist.get_backend(pg)).lower():
        started = time.monotonic()
        roll = _RollCall.check_in(pg, rank, world)
        try:
            dist.monitored_barrier(group=pg, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as e:
            lost = _named_in(e)
            if lost is None and roll is not None:
                lost = roll.missing(started + timeout.total_seconds())
            raise RankLostError(_lost_message(e, lost, rank, what, timeout)) from e
    mine = values.to(device=collective_device(pg), dtype=torch.int64).reshape(-1)
    try:
        out = WAIT(ALL_GATHER(mine, world, pg.group_name))
    except RuntimeError as e:
        raise RankLostError(
            f"fxtp: {what} failed on rank {rank}: another rank left the process group during "
            f"it ({_first_line(e)}). Look at the other ranks' errors; a rank that died must "
            "be restarted with the others (torchrun restarts the whole group).") from e
    return out.view(world, -1).cpu()


def gather_objects(obj: object, group: "dist.ProcessGroup | str | None", what: str) -> list:
    """Every rank's JSON-able `obj`, in rank order, through two guarded gathers (the lengths,
    then the bytes padded to the longest): a lost rank is a `RankLostError`, as in
    `guarded_gather`. For small records (fxtp.save's slices and statuses), not tensors."""
    data = json.dumps(obj).encode()
    lengths = guarded_gather(torch.tensor([len(data)], dtype=torch.int64), group, what)
    width = (int(lengths.max()) + 7) // 8
    padded = torch.zeros(width * 8, dtype=torch.uint8)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    table = guarded_gather(padded.view(torch.int64), group, what)
    rows = table.contiguous().view(torch.uint8).view(table.shape[0], -1)
    return [json.loads(rows[r, :int(n)].numpy().tobytes()) for r, n in enumerate(lengths[:, 0])]


class _RollCall:
    """Who reached the current agreement step: each rank writes the step's number under its
    own key in the process group's store before the barrier (one small write). When the
    barrier fails without naming anyone (a peer's connection closed: it died), the ranks whose
    key is behind are the lost ones. The store lives outside the ranks under torchrun (its
    agent), on rank 0 with a tcp:// init method."""

    _steps: dict[str, int] = {}

    def __init__(self, store, prefix: str, world: int, step: int):
        self.store, self.prefix, self.world, self.step = store, prefix, world, step

    @classmethod
    def check_in(cls, pg: dist.ProcessGroup, rank: int, world: int) -> "Optional[_RollCall]":
        step = cls._steps[pg.group_name] = cls._steps.get(pg.group_name, 0) + 1
        prefix = f"fxtp/roll/{pg.group_name}/"
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set(f"{prefix}{rank}", str(step))
        except Exception:       # no store (or it is gone): the barrier's own message only
            return None
        return cls(store, prefix, world, step)

    def missing(self, deadline: float) -> Optional[list[int]]:
        """The ranks that have not reached this step by `deadline` (those that do later are
        only late); None when the store cannot be read."""
        while True:
            try:
                behind = [r for r in range(self.world)
                          if not self.store.check([f"{self.prefix}{r}"])
                          or int(self.store.get(f"{self.prefix}{r}")) < self.step]
            except Exception:
                return None
            if not behind or time.monotonic() >= deadline:
                return behind
            time.sleep(0.05)


def _named_in(e: RuntimeError) -> Optional[list[int]]:
    m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
    return [int(r) for r in m.group(1).replace(",", " ").split()] if m else None


def _lost_message(e: RuntimeError, lost: Optional[list[int]], rank: int, what: str,
                  timeout: datetime.timedelta) -> str:
    secs = f"{timeout.total_seconds():g} s"
    if lost:
        who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
        return (f"fxtp: {who} did not reach {what} within the group's timeout ({secs}; this is "
                f"rank {rank}): {'they' if len(lost) > 1 else 'it'} died, hung, or ran other "
                "code. Every rank must make the same fxtp calls in the same order; look at "
                f"{who}'s own error (torchrun restarts a group that lost a rank).")
    return (f"fxtp: rank {rank} lost contact with rank 0 during {what} (within the group's "
            f"timeout, {secs}): rank 0 died, or it found another rank missing and stopped "
            f"waiting ({_first_line(e)}). Look at rank 0's error: it names the lost rank.")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# reading a gathered table

def differing(table: torch.Tensor) -> list[int]:
    """Columns of a gathered `[world, n]` table whose values are not the same on every rank."""
    return (table != table[:1]).any(dim=0).nonzero().flatten().tolist()


def rank_groups(column: Sequence[int]) -> str:
    """'rank 0 | ranks 1, 2': the ranks grouped by the value they hold, largest group first."""
    by_value: dict[int, list[int]] = {}
    for r, v in enumerate(column):
        by_value.setdefault(int(v), []).append(r)
    groups = sorted(by_value.values(), key=lambda g: (-len(g), g))
    return " | ".join(f"rank{'s' if len(g) > 1 else ''} {', '.join(map(str, g))}" for g in groups)


def agree_on_digests(names: Sequence[str], digests: Optional[torch.Tensor],
                     group: "dist.ProcessGroup | str | None", what: str, ok: bool = True
                     ) -> tuple[bool, list[str], torch.Tensor]:
    """Compares named checksums across the ranks in one small gather when they agree:
    `[ok, count, combined checksum]` first, the per-name checksums only when those differ
    (every rank sees the same first table, so all take the same path). `ok=False`: this rank
    failed before it could compare (its checksums are ignored).

    Returns whether every rank was ok, the names that differ (in order; the name '<count>'
    when the ranks have different numbers of names: they built different models), and the
    table they differ in (`[world, n]`, empty when nothing differs)."""
    none = torch.zeros(0, 0, dtype=torch.int64, device="cpu")
    if digests is None or not ok:
        digests = torch.zeros(len(names), dtype=torch.int64, device="cpu")
    head = torch.tensor([int(ok), len(names), int(combine(digests))], dtype=torch.int64,
                        device="cpu")
    first = guarded_gather(head, group, what)
    if not all(first[:, 0].tolist()):
        return False, [], none
    if not differing(first[:, 1:]):
        return True, [], none
    if differing(first[:, 1:2]):
        return True, ["<count>"], first[:, 1:2]
    table = guarded_gather(digests, group, what)
    return True, [names[i] for i in differing(table)], table
