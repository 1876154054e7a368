"""The world-2 half of the API fuzzing (issue 15, item 7): one spawn of 2 gloo ranks
(`fuzz_workers.run_all`) draws the same bad cases on both ranks (derandomized hypothesis) for
transform (world sizes, plans of another model/config/world size), calls of the graph, broken
checkpoints into a loaded graph, random fold/unfold/train/generate sequences of a LoRA graph,
generator arguments, and hand-edited saved plans re-derived at world 2. Every refusal is an
FxtpError of the expected class naming the input, and leaves every tensor, the plan and the fold
state as they were; good calls after the refusals still give the model's answers."""
from __future__ import annotations

import pytest

from . import world2_workers
from .spawned import per_rank, spawn_fixture

WS = 2
TOL = 1e-4
SECTIONS = ("transform", "calls", "load", "lora", "generator", "saved_plans")
results = spawn_fixture(world2_workers.run_all, WS, world2_workers.write_checkpoints,
                        part="fuzz")      # one spawn with the checks
section = per_rank


@pytest.mark.parametrize("name", SECTIONS)
def test_every_bad_case_is_a_named_fxtp_error_that_changes_nothing(results, name):
    per_rank = section(results, name)
    for rank, r in enumerate(per_rank):
        assert not r["problems"], f"rank {rank}:\n" + "\n".join(r["problems"][:10])
        assert r["tried"] >= 8, r
    # both ranks drew the same cases and saw the same errors
    assert per_rank[0]["tried"] == per_rank[1]["tried"]
    assert per_rank[0]["errors"] == per_rank[1]["errors"]


def test_good_calls_after_the_refusals_still_give_the_models_answers(results):
    for rank in range(WS):
        t = results[rank]["transform"]["checks"]
        # a plan of one instance applied to another: the other's weights, not the first's
        assert t["other_instance_error"] <= TOL < t["first_instance_gap"], t
        assert results[rank]["calls"]["checks"]["after_error"] <= TOL
        load = results[rank]["load"]["checks"]
        assert load["good_load_error"] <= TOL and load["good_load_bytes"] > 0
        lora = results[rank]["lora"]["checks"]
        assert lora["max_error"] <= TOL and not lora["wrong_state"], lora
        assert results[rank]["generator"]["checks"]["tokens_equal_after_errors"]
        plans = results[rank]["saved_plans"]["checks"]
        assert plans["accepted_max_error"] <= TOL, plans


def test_zz_cases_tried(results):
    print(f"\nfuzz cases tried per rank at world size {WS} (each drawn on both ranks):")
    total = 0
    for name in SECTIONS:
        r = results[0][name]
        total += r["tried"]
        print(f"  {name}: {r['tried']} in {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU)  "
              f"{r['errors']}")
    print(f"  total: {total} (setup {results[0]['setup_seconds']:.1f} s, "
          f"{results[0]['setup_cpu']:.1f} s CPU since the fork)")
    assert total >= 150
