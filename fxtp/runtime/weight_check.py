"""The weight check of `fxtp.transform` and `fxtp.load`: every rank must hold the same weights.

Each rank slices its shard out of the full tensors it holds, assuming the others hold the same:
ranks that built their models with other seeds would each compute with pieces of different
models and return wrong numbers without an error. The rewrite reads every full tensor once (to
slice it, or to copy what it keeps whole); `WeightDigests.read` takes its checksum there, and
`check` compares them across the ranks in one small gather (`agreement.agree_on_digests`).

A model built on the meta device has nothing to compare at transform: `fxtp.load` compares the
checkpoint instead (`checkpoint_digest` of its layout plus the checksums of every tensor each
rank reads whole, which every rank reads).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import WeightMismatchError
from .agreement import agree_on_digests, rank_groups, tensor_digest

SHOWN = 5


@dataclass(frozen=True)
class WeightCheck:
    """What the check compared: `tensors` checksums, `read_late` of them not taken during the
    rewrite's own reads (a second read of that tensor; expected 0), `meta` tensors skipped."""
    tensors: int
    read_late: int
    meta: int


class WeightDigests:
    """Checksums of the full tensors of a capture, taken as the rewrite reads them."""

    def __init__(self, full: dict[int, torch.Tensor]):
        self.full = full
        self.digests: dict[int, torch.Tensor] = {}

    def read(self, t: torch.Tensor) -> None:
        if id(t) in self.full and id(t) not in self.digests and t.device.type != "meta":
            self.digests[id(t)] = tensor_digest(t)

    def check(self, named: dict[str, torch.Tensor], group: str) -> WeightCheck:
        """Compares the checksums of every real tensor in `named` (the capture's tensors by
        every name) across the ranks; raises `WeightMismatchError` on every rank if any
        differs."""
        names, late, meta = [], 0, 0
        seen: set[int] = set()
        for name, t in sorted(named.items()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.device.type == "meta":
                meta += 1
                continue
            if id(t) not in self.digests:
                late += 1
                self.digests[id(t)] = tensor_digest(t)
            names.append((name, id(t)))
        values = (torch.stack([self.digests[i].to(_common_device(self.digests.values()))
                               for _, i in names]) if names else None)
        _, differ, table = agree_on_digests([n for n, _ in names], values, group,
                                            "the weight check of fxtp.transform")
        if differ:
            raise WeightMismatchError(mismatch_message(
                "fxtp.transform", differ, table, [n for n, _ in names], len(names),
                "fxtp shards each tensor assuming that every rank holds the same full tensor. "
                "Build the model the same way on every rank: seed before building it "
                "(torch.manual_seed(0) before from_config), or load the same checkpoint (or "
                "build it under fxtp.init_empty() and fill it with fxtp.load). "
                "check_weights=False skips this check."))
        return WeightCheck(tensors=len(names), read_late=late, meta=meta)


def _common_device(digests: Iterable[torch.Tensor]) -> torch.device:
    for d in digests:
        return d.device
    return torch.device("cpu")


def mismatch_message(where: str, differ: list[str], table: torch.Tensor, names: list[str],
                     count: int, advice: str) -> str:
    """'<where>: the ranks hold different weights: k of n tensors differ: a (rank 0 | rank 1),
    ...' (or different numbers of tensors), then `advice`."""
    if differ == ["<count>"]:
        return (f"{where}: the ranks built different models: they hold "
                f"{rank_groups(table[:, 0].tolist())} tensors ({_counts(table)}). {advice}")
    column = {n: i for i, n in enumerate(names)}
    shown = [f"{n} ({rank_groups(table[:, column[n]].tolist())})" for n in differ[:SHOWN]]
    more = f", ... and {len(differ) - SHOWN} more" if len(differ) > SHOWN else ""
    return (f"{where}: the ranks hold different weights: {len(differ)} of {count} tensors "
            f"differ: {', '.join(shown)}{more}. {advice}")


def _counts(table: torch.Tensor) -> str:
    return ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(table[:, 0].tolist()))


def checkpoint_digest(entries: Iterable[tuple[str, tuple, str]]) -> torch.Tensor:
    """A checksum of a checkpoint's layout: the (name, shape, dtype) of the tensors read."""
    text = "\n".join(f"{n}:{list(s)}:{d}" for n, s, d in sorted(entries))
    return torch.tensor(zlib.crc32(text.encode()), dtype=torch.int64, device="cpu")
