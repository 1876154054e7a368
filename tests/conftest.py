import os
import sys

import pytest

# spawned ranks import tests.rank_workers; make the project root importable for them too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# modules whose tests run in this process only (no ranks, no subprocesses): they run first, so
# that the background spawns (tests/spawned.py) have the second core meanwhile
SINGLE_PROCESS = {
    "test_device_dtype", "test_fuzz_api", "test_generate_replay", "test_inspect", "test_layers",
    "test_patterns_linear", "test_plan", "test_repeats", "test_rewrite_contract",
    "test_sharding_unit", "test_structures", "test_tp_generate",
}


@pytest.hookimpl(trylast=True)      # after -k/-m deselection
def pytest_collection_modifyitems(config, items):
    """Single-process modules first (file order kept otherwise); the long spawns of the
    collected tests (their modules' `start_spawns`: the families, multirank at world 4) start
    in the background now."""
    def module(item) -> str:
        return item.module.__name__.rsplit(".", 1)[-1]

    items.sort(key=lambda item: module(item) not in SINGLE_PROCESS)
    if config.option.collectonly:
        return
    world_sizes: dict = {}
    for item in items:
        start = getattr(item.module, "start_spawns", None)
        if start is not None:
            params = getattr(item, "callspec", None)
            ws = params.params.get("ws") if params else None
            world_sizes.setdefault(start, set()).add(ws or getattr(item.module, "COMPILED_AT", 0))
    for start, sizes in world_sizes.items():
        start(sizes)
