"""Tests that read one spawn of gloo ranks from many test functions: the spawn runs once per
module (a fixture), each test reads its case from every rank's results."""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

from fxtp.verify import run_ranks


def spawn_fixture(run_all: Callable, world_size: int,
                  write: Optional[Callable[[str], Any]] = None, timeout: float = 600):
    """A module-scoped fixture returning `run_all(rank, world_size[, write(tmp_dir)])` of every
    rank; `write` makes the ranks' input (checkpoints) in the test process, in a temporary
    directory."""
    @pytest.fixture(scope="module")
    def results(tmp_path_factory):
        args = (write(str(tmp_path_factory.mktemp("spawn"))),) if write is not None else ()
        return run_ranks(run_all, world_size, *args, timeout=timeout)

    return results


def per_rank(results: list[dict], name: str) -> list[Any]:
    """Case `name` of every rank, failing the test with a rank's traceback if it raised."""
    out = [r[name] for r in results]
    for r in out:
        assert "exception" not in r, r.get("exception")
    return out
