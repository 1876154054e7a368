"""Tests that read one spawn of gloo ranks from many test functions: the spawn runs once per
module (a fixture), each test reads its case from every rank's results."""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

from fxtp.testing.ranks import run_ranks

_SPAWNED: dict = {}     # (run_all, world size) -> every rank's results, for the session


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
