"""Each checkpoint tensor assembled from every rank's slice on the rank that writes it, one
tensor at a time, so that no rank ever holds more than its shard and about one full tensor.

What rank r holds of a tensor is `TPInfo.param_slices` (dim, runs of global indices): several
runs for fused qkv chunks, uneven for uneven shards, overlapping between ranks for replicated kv
heads. The ranks exchange these records once (`gather_objects`), then every rank computes the
same *pieces* of every tensor: which rank's local indices fill which global indices, each index
taken from exactly one rank, and a gap (an index no rank holds) is an error before any write.

The tensors go in rounds: in round k every rank receives the slices of the k-th tensor it
writes from the ranks that hold pieces of it, and sends its own slices of the k-th tensors of
the others, all in one `batch_isend_irecv` (NCCL's grouped point-to-point, which cannot deadlock
on the order of sends and receives). Then it writes the tensor: a piece along dim 0 is one
contiguous range of the file; along another dim the tensor is written in blocks of rows
(`_BLOCK_BYTES`) assembled from the pieces, so no assembled copy of a whole tensor is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import fx

from ..errors import RankLostError, SaveError
from ..graph.nodes import get_tensor_attr
from ..runtime.group import collective_device
from .layout import Entry, Layout
from .writer import TensorFile

Slices = dict[str, tuple[int, tuple[tuple[int, int], ...]]]
_BLOCK_BYTES = 32 << 20         # rows written at a time for a tensor split along dim > 0


@dataclass(frozen=True)
class Piece:
    rank: int
    local: int      # first index along `dim` in that rank's local tensor
    start: int      # first global index
    length: int


def pieces(name: str, dim: int, size: int, held: list[Optional[tuple[tuple[int, int], ...]]]
           ) -> list[Piece]:
    """Global indices 0..size-1 along `dim`, each from one rank's local slice (the longest run
    covering it, then the lowest rank): `held[r]` is rank r's runs (None: holds none)."""
    runs = []
    for r, rs in enumerate(held):
        pos = 0
        for a, n in rs or ():
            runs.append((a, n, r, pos))
            pos += n
    out, cur = [], 0
    while cur < size:
        covering = [(a + n, -r, a, r, pos) for a, n, r, pos in runs if a <= cur < a + n]
        if not covering:
            raise SaveError(f"fxtp.save: no rank holds indices {cur}.. of {name} along dim {dim}: "
                            "the ranks' slices do not cover the tensor (ranks transformed with "
                            "different plans?). Nothing was written.")
        end, _, a, r, pos = max(covering)
        out.append(Piece(r, pos + cur - a, cur, end - cur))
        cur = end
    return out


class Assembler:
    """Sends, receives and writes the tensors of `layout` on this rank (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, layout: Layout, slices: list[Slices], rank: int,
                 group: "dist.ProcessGroup | None", merge: dict[str, Callable[[], torch.Tensor]]):
        self.gm, self.layout, self.slices, self.rank, self.group = gm, layout, slices, rank, group
        self.merge = merge
        self.world = len(slices)
        self.device = collective_device(group) if group is not None else torch.device("cpu")
        self.owned: list[list[tuple[Entry, int]]] = [[] for _ in range(self.world)]
        for i, f in enumerate(layout.files):
            self.owned[f.owner] += [(e, i) for e in f.entries]
        self.plans: dict[str, tuple[int, list[Piece]]] = {}
        for f in layout.files:
            for e in f.entries:
                self.plans[e.name] = self._plan(e)
        self.bytes_written = 0
        self.peak_staged = 0        # the most bytes this rank held for one tensor beyond its shard
        self.largest = 0            # the largest tensor this rank wrote

    def _plan(self, e: Entry) -> tuple[int, list[Piece]]:
        held = [s.get(e.source) for s in self.slices]
        if all(h is None for h in held) or e.value is not None:
            return -1, []                         # whole on every rank
        if any(h is None for h in held) or len({h[0] for h in held}) != 1:
            raise SaveError(f"fxtp.save: the ranks slice {e.source} differently (some keep it "
                            "whole, or along other dims): they were transformed with different "
                            "plans. Nothing was written.")
        dim = held[0][0]
        return dim, pieces(e.source, dim, e.shape[dim], [h[1] for h in held])

    def _local(self, e: Entry) -> torch.Tensor:
        if e.value is not None:
            return e.value
        if e.source in self.merge:
            return self.merge[e.source]()
        return get_tensor_attr(self.gm, e.source).detach()

    def _senders(self, e: Entry) -> list[int]:
        dim, ps = self.plans[e.name]
        return sorted({p.rank for p in ps}) if dim >= 0 else []

    def run(self, files: dict[int, TensorFile], failed: Callable[[BaseException], None]) -> None:
        """Every round in order. `files`: this rank's open files by index in `layout.files`.
        An error writing a file goes to `failed` and the rank keeps exchanging (its peers
        would wait for it otherwise); an error of the exchange itself raises."""
        broken = False
        for k in range(max((len(o) for o in self.owned), default=0)):
            mine = self.owned[self.rank][k] if k < len(self.owned[self.rank]) else None
            received = self._exchange(k, mine)
            if mine is None or broken:
                continue
            e, i = mine
            try:
                self._write(e, files[i], received)
            except (OSError, RuntimeError, ValueError) as err:
                broken = True
                failed(err)

    def _exchange(self, k: int, mine: Optional[tuple[Entry, int]]) -> dict[int, torch.Tensor]:
        ops, received, sent, peers = [], {}, [], set()
        if mine is not None:
            e = mine[0]
            dim = self.plans[e.name][0]
            for r in self._senders(e):
                if r != self.rank:
                    shape = list(e.shape)
                    shape[dim] = sum(n for _, n in self.slices[r][e.source][1])
                    buf = torch.empty(shape, dtype=e.dtype, device=self.device)
                    received[r] = buf
                    peers.add(r)
                    ops.append(dist.P2POp(dist.irecv, buf, self._global(r), self.group))
        for owner in range(self.world):
            if owner == self.rank or k >= len(self.owned[owner]):
                continue
            e = self.owned[owner][k][0]
            if self.rank in self._senders(e):
                t = self._local(e).to(self.device).contiguous()
                sent.append(t)
                peers.add(owner)
                ops.append(dist.P2POp(dist.isend, t, self._global(owner), self.group))
        if ops:
            try:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                who = ", ".join(map(str, sorted(peers)))
                raise RankLostError(
                    f"fxtp.save: rank {self.rank} lost contact with rank(s) {who} while "
                    f"exchanging the slices of the checkpoint's tensors ({type(err).__name__}: "
                    f"{first}): {'they' if len(peers) > 1 else 'it'} died, hung or failed. "
                    "Look at that rank's error; nothing was saved at the path.") from err
        return {r: t.cpu() for r, t in received.items()}

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def _write(self, e: Entry, f: TensorFile, received: dict[int, torch.Tensor]) -> None:
        dim, ps = self.plans[e.name]
        held = self._local(e).detach()
        own = held.cpu()
        # bytes held for this tensor beyond the shard: the slices received, a host copy of a
        # device tensor, a merged shard, the block being assembled
        staged = sum(t.numel() * t.element_size() for t in received.values())
        if own.data_ptr() != held.data_ptr() or e.source in self.merge:
            staged += own.numel() * own.element_size()
        self.largest = max(self.largest, e.nbytes)
        if dim < 0:
            self.bytes_written += f.write(e.name, 0, own)
            self.peak_staged = max(self.peak_staged, staged)
            return
        source = dict(received)
        source[self.rank] = own
        outer = math.prod(e.shape[:dim])
        inner = math.prod(e.shape[dim + 1:])
        size, item = e.shape[dim], e.dtype.itemsize
        if outer == 1:          # every piece is one contiguous range of the file
            for p in ps:
                part = source[p.rank].reshape(-1)[p.local * inner:(p.local + p.length) * inner]
                self.bytes_written += f.write(e.name, p.start * inner * item, part)
            self.peak_staged = max(self.peak_staged, staged)
            return
        rows = max(1, _BLOCK_BYTES // max(1, size * inner * item))
        views = {r: t.reshape(outer, -1, inner) for r, t in source.items()}
        for o in range(0, outer, rows):
            n = min(rows, outer - o)
            block = torch.empty(n, size, inner, dtype=e.dtype)
            for p in ps:
                block[:, p.start:p.start + p.length] = \
                    views[p.rank][o:o + n, p.local:p.local + p.length]
            self.bytes_written += f.write(e.name, o * size * inner * item, block)
            self.peak_staged = max(self.peak_staged, staged + block.numel() * item)
