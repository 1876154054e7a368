"""Where the multi-rank tests spend their time: runs one spawn and prints each case's seconds.

    .venv/bin/python -m tests.case_times multirank 4     # tests/test_multirank.py's cases at world 4
    .venv/bin/python -m tests.case_times families 2      # tests/test_families.py's at world 2
"""
from __future__ import annotations

import sys
import time

from fxtp.testing.ranks import run_ranks

from .rank_workers import SECONDS, run_all


def main() -> None:
    which, ws = sys.argv[1], int(sys.argv[2])
    start = time.perf_counter()
    if which == "multirank":
        ranks = run_ranks(run_all, ws, timeout=1200)
    else:
        from .test_families import spawn

        ranks = spawn(ws)
    total = time.perf_counter() - start
    slowest = {name: max(r[SECONDS][name] for r in ranks) for name in ranks[0][SECONDS]}
    for name, s in sorted(slowest.items(), key=lambda kv: -kv[1]):
        print(f"{s:7.1f} s  {name}")
    print(f"{sum(slowest.values()):7.1f} s  cases (slowest rank each); {total:.1f} s with the spawn")


if __name__ == "__main__":
    main()
