"""Tests that read one spawn of gloo ranks from many test functions: the spawn runs once per
module (a fixture), each test reads its case from every rank's results.

The longest spawns may start early, in the background (`start_early`, called by conftest.py
when their tests are collected): they then run beside the tests that use one process only,
which leave the second core idle (conftest.py runs those first), and their tests wait for the
result (`early_result`)."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional

import pytest

from fxtp.testing.ranks import run_ranks

_SPAWNED: dict = {}     # (run_all, world size) -> every rank's results, for the session
_EARLY: dict[Any, Future] = {}      # key -> a spawn started in the background
_QUEUE: "queue.Queue[tuple[Future, Callable[[], Any]]]" = queue.Queue()


def _run_queued() -> None:
    while True:
        future, spawn = _QUEUE.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(spawn())
            except BaseException as e:      # the tests that read it raise it
                future.set_exception(e)


def start_early(key: Any, spawn: Callable[[], Any]) -> None:
    """Queues `spawn()` (a `run_ranks` call) to run in the background, one at a time, on a
    daemon thread (a session that ends first does not wait for it)."""
    if key not in _EARLY:
        if not _EARLY:
            threading.Thread(target=_run_queued, name="early-spawns", daemon=True).start()
        _EARLY[key] = Future()
        _QUEUE.put((_EARLY[key], spawn))


def early_result(key: Any, spawn: Callable[[], Any]) -> Any:
    """The result of the spawn started early under `key` (waiting for it), else `spawn()`."""
    future = _EARLY.get(key)
    return future.result() if future is not None else spawn()


def spawn_fixture(run_all: Callable, world_size: int,
                  write: Optional[Callable[[str], Any]] = None, part: Optional[str] = None,
                  timeout: float = 600):
    """A module-scoped fixture returning `run_all(rank, world_size[, write(tmp_dir)])` of every
    rank (its `part` when given); `write` makes the ranks' input (checkpoints) in the test
    process, in a temporary directory. Modules naming the same `run_all` share one spawn."""
    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        key = (run_all.__module__, run_all.__qualname__, world_size)
        if key not in _SPAWNED:
            args = (write(str(tmp_path_factory.mktemp("spawn"))),) if write is not None else ()
            _SPAWNED[key] = run_ranks(run_all, world_size, *args, timeout=timeout)
        return [r[part] for r in _SPAWNED[key]] if part else _SPAWNED[key]

    return results


def per_rank(results: list[dict], name: str) -> list[Any]:
    """Case `name` of every rank, failing the test with a rank's traceback if it raised."""
    out = [r[name] for r in results]
    for r in out:
        assert "exception" not in r, r.get("exception")
    return out
