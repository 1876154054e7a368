"""One spawn of 2 gloo ranks for the agreement checks (tests/test_checks.py) and the world-2
API fuzzing (tests/test_fuzz_ranks.py): each rank pays its first captures' warm-up once.
The checks run last: their final case ends with rank 1 leaving the group."""
from __future__ import annotations

import os
from typing import Any

from . import check_workers, fuzz_workers


def write_checkpoints(root: str) -> dict[str, Any]:
    return {"fuzz": fuzz_workers.write_checkpoints(os.path.join(root, "fuzz")),
            "checks": check_workers.write_checkpoints(os.path.join(root, "checks"))}


def run_all(rank: int, ws: int, dirs: dict[str, Any]) -> dict[str, Any]:
    return {"fuzz": fuzz_workers.run_all(rank, ws, dirs["fuzz"]),
            "checks": check_workers.run_all(rank, ws, dirs["checks"])}
