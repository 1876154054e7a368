"""Runs a function on several gloo ranks over 127.0.0.1, with a timeout so that a hang fails.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import socket
import tempfile
import traceback
from typing import Any, Callable, Optional

import torch

from ..errors import FxtpError


class RankFailure(FxtpError):
    """A rank raised, died or did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once by the forkserver, so that a rank starts as a fork of it: a spawned rank spent
# 4-9 s of CPU importing these again (measured on this 2-core machine: run_ranks(2) of a tiny
# Llama transform took 13.4 s spawned, 4.4 s forked)
PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.modeling_utils", "fxtp"]


def _rank_context():
    """The multiprocessing context ranks start in: a forkserver with PRELOAD imported (a clean
    single-threaded process, unlike forking the caller), else spawn (Windows)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_main(fn: Callable, rank: int, world_size: int, store: str, args: tuple, out: Any,
               env: dict, cwd: str) -> None:
    import torch.distributed as dist

    # the caller's environment and directory of now, as a spawned rank would have them, not
    # the forkserver's from when it started
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size)
        result = fn(rank, world_size, *args)
        out.put((rank, True, result))
    except FxtpError as e:  # a deliberate error: the parent re-raises it as it is
        out.put((rank, False, (type(e), str(e), traceback.format_exc())))
    except BaseException:  # report everything, the parent decides
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0) -> list[Any]:
    """Runs fn(rank, world_size, *args) in `world_size` gloo processes; returns their results."""
    ctx = _rank_context()
    out = ctx.Queue()
    # the ranks meet in a file of their own, not on a TCP port: a free port picked here could
    # be taken by another group starting at the same moment (the suite spawns ranks from two
    # threads), whose ranks would then join this group's store
    store_dir = tempfile.mkdtemp(prefix="fxtp-ranks-")
    store = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, r, world_size, store, args, out, dict(os.environ), os.getcwd()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deliberate: Optional[FxtpError] = None
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailure(f"ranks {sorted(set(range(world_size)) - set(results))} did not "
                                  f"finish within {timeout:.0f}s (a hung collective?)")
            try:
                rank, ok, value = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                # a rank that already reported may still crash while tearing down its group
                dead = [i for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and i not in results]
                if dead and out.empty():
                    raise RankFailure(f"rank(s) {dead} died with exit codes "
                                      f"{[procs[i].exitcode for i in dead]}")
                continue
            if ok:
                results[rank] = value
            elif isinstance(value, tuple):   # an FxtpError: raised again below, as it is
                kind, message, _ = value
                deliberate = kind(f"rank {rank}: {message}")
                errors.append(message)
                break
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if deliberate is not None:
        raise deliberate
    if errors:
        raise RankFailure("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
