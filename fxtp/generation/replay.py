"""Decode steps from static buffers, replayed as CUDA graphs: the generator's per-token path.

A decode step (S = 1) of a batch of `b` rows runs on the static inputs of a batch bucket
(`ids [n, 1]`, `positions [n, 1]`, `mask [n, max_len]`, `start []`, `n` the smallest bucket
>= b: powers of two up to `max_batch`, and `max_batch`). Each token copies the new ids in,
advances the positions and `start` in place (no host value, no host-to-device copy), runs the
step and reads the logits of the first `b` rows out of a static output. Three ways to run:

- `"graph"` (CUDA): the step is captured once per bucket as a `torch.cuda.CUDAGraph` (after
  warm-up runs on a side stream, which also compile a `torch.compile`d step) and every token is
  one `graph.replay()`: no Python, no recompile, no retrace per token. The capture is made at
  the first decode step of a bucket, from that step's real inputs: the warm-up runs write the
  same k/v into the same cache slot as the replay that follows, so nothing is disturbed.
- `"emulate"`: the same buffers, warm-up, capture bookkeeping and static output, with the
  "replay" a call of the step on the static buffers: what CPU tests exercise.
- `"eager"`: the step called on the buffers of exactly `b` rows (no bucket padding).

A captured graph holds the addresses of the weights and the cache; `Replay.check` compares
them per `generate` call and drops the graphs when a load, `.to()` or refold moved anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Step = Callable[..., torch.Tensor]
MODES = ("eager", "emulate", "graph")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes with their own static buffers (and CUDA graph): 1, 2, 4, ... and max_batch."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return out + [max_batch]


@dataclass
class _Bucket:
    ids: torch.Tensor             # [n, 1]
    pos: torch.Tensor             # [n, 1]
    mask: torch.Tensor            # [n, max_len]
    start: torch.Tensor           # [] long
    out: Optional[torch.Tensor] = None     # static logits [n, 1, vocab] once captured
    graph: Optional["torch.cuda.CUDAGraph"] = None
    captured: bool = False
    warmups: int = 0              # step runs spent on warm-up (tests read it)


@dataclass
class Replay:
    """Static-buffer decode steps for one generator; `mode` in MODES."""

    mode: str
    max_batch: int
    max_len: int
    warmup: int = 2
    _buckets: dict = field(default_factory=dict)
    _sig: tuple = ()
    _pool: object = None
    captures: int = 0             # graphs captured since the last reset (tests read it)

    def bucket_of(self, b: int) -> int:
        if self.mode == "eager":
            return b
        return next(n for n in buckets(self.max_batch) if n >= b)

    def reset(self) -> None:
        """Drops every buffer and graph (weights or cache moved, step recompiled)."""
        self._buckets.clear()
        self._sig = ()
        self._pool = None
        self.captures = 0

    def check(self, tensors: list[torch.Tensor]) -> None:
        """Drops the graphs when a weight or cache tensor changed address or device since they
        were captured (a load, `.to()`, `load_weights` that swapped tensors)."""
        sig = tuple((t.device, t.data_ptr(), tuple(t.shape)) for t in tensors)
        if sig != self._sig:
            self.reset()
            self._sig = sig

    def begin(self, b: int, mask: torch.Tensor, last_pos: torch.Tensor, start: int,
              device: torch.device) -> _Bucket:
        """Fills a bucket's static inputs for the decode steps after a prefill of `b` rows:
        their whole mask (`mask [b, max_len]`), positions of the prefill's last tokens
        (`last_pos [b]`) and the slot of the first decode token (`start`). Rows past `b` are
        dummy rows (mask of ones, positions from 0) writing cache rows nobody reads."""
        n = self.bucket_of(b)
        bk = self._buckets.get(n)
        if bk is None:
            bk = self._buckets[n] = _Bucket(
                ids=torch.zeros(n, 1, dtype=torch.long, device=device),
                pos=torch.zeros(n, 1, dtype=torch.long, device=device),
                mask=torch.ones(n, self.max_len, dtype=torch.long, device=device),
                start=torch.zeros((), dtype=torch.long, device=device))
        bk.mask[:b].copy_(mask)
        bk.mask[b:].fill_(1)
        bk.pos[:b, 0].copy_(last_pos)
        bk.pos[b:].zero_()
        bk.ids.zero_()
        bk.start.fill_(start)
        return bk

    def step(self, bk: _Bucket, b: int, tokens: torch.Tensor, run: Step) -> torch.Tensor:
        """One decode token: copy the new tokens in, advance positions, run (or replay) the step
        on the static inputs, advance `start`. Returns the logits of the `b` real rows,
        `[b, vocab]`, a view of the static output: read it before the next step."""
        bk.ids[:b, 0].copy_(tokens)
        bk.pos.add_(1)
        args = (bk.ids, bk.pos, bk.mask, bk.start)
        if self.mode == "eager":
            out = run(*args)
        else:
            if not bk.captured:
                self._capture(bk, run, args)
            if self.mode == "graph":
                bk.graph.replay()
            else:
                bk.out.copy_(run(*args))
            out = bk.out
        bk.start.add_(1)
        return out[:b, -1]

    def _capture(self, bk: _Bucket, run: Step, args: tuple) -> None:
        """Warm-up runs (on a side stream on CUDA: allocator and NCCL state, torch.compile's
        first call), then the capture. Every run before the replay computes the same step from
        the same inputs, so its cache writes are the replay's own."""
        if self.mode == "emulate":
            for _ in range(self.warmup):
                bk.out = run(*args).clone()
                bk.warmups += 1
            bk.captured = True
            self.captures += 1
            return
        dev = args[0].device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run(*args)
                bk.warmups += 1
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._pool is None:
            # one memory pool for every bucket: only one bucket runs at a time, and each
            # bucket's static output is read before another bucket replays
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread keeps querying events during the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            bk.out = run(*args)
        bk.graph, bk.captured = graph, True
        self.captures += 1
