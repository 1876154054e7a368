"""A safetensors file written one tensor at a time.

The header (names, dtypes, shapes, byte offsets) is known before any value, so it is written
first and each tensor's bytes go to their offset as the writing rank assembles them: the rank
never holds the file's tensors together. safetensors' own `save_file` takes them all at once (a
dict in memory), which is what a rank writing its share of a 70B model cannot afford. The format
is the same (the tests read every file back with safetensors and transformers): an 8-byte
little-endian header length, the JSON header padded with spaces to 8 bytes, then the data, in
the order safetensors itself uses (larger dtypes first, then by name).
"""
from __future__ import annotations

import json
import os
import struct

import torch

from .._load import DTYPES
from .layout import Entry

NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_WRITE = 1 << 30            # bytes per pwrite call (Linux writes at most ~2 GiB per call)


class TensorFile:
    """`write(name, offset, data)` puts the bytes of `data` (a CPU tensor) at `offset` bytes
    into tensor `name`'s data; `close()` syncs the file to disk."""

    def __init__(self, path: str, entries: list[Entry]):
        unknown = sorted({str(e.dtype) for e in entries if e.dtype not in NAMES})
        if unknown:
            raise TypeError(f"safetensors has no dtype for {', '.join(unknown)}")
        header: dict = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        pos = 0
        for e in sorted(entries, key=lambda e: (-e.dtype.itemsize, e.name)):
            header[e.name] = {"dtype": NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [pos, pos + e.nbytes]}
            self.offsets[e.name] = pos
            pos += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.base = 8 + len(text)
        self.size = self.base + pos
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(struct.pack("<Q", len(text)) + text, 0)
        except BaseException:
            self.close(sync=False)
            raise

    def write(self, name: str, offset: int, data: torch.Tensor) -> int:
        """Writes `data`'s bytes; returns how many."""
        flat = data.detach().reshape(-1)
        if flat.numel() == 0:
            return 0
        raw = memoryview(flat.contiguous().view(torch.uint8).numpy())
        self._pwrite(raw, self.base + self.offsets[name] + offset)
        return len(raw)

    def _pwrite(self, data, at: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:done + _MAX_WRITE], at + done)

    def close(self, sync: bool = True) -> None:
        if self.fd < 0:
            return
        try:
            if sync:
                os.ftruncate(self.fd, self.size)     # a trailing empty tensor: still its size
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
