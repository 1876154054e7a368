"""solve/: decides which linears are column- or row-parallel by propagating placements through
the captured graph.

solver.py (the fixed-point loop, `solve`) -> propagate.py (one pass) -> registry.py (per-op
rules: rules_shape, rules_slicing, rules_compute, rules_einsum for sharded values, rules_partial for
partial sums; align.py, splits.py, shapes.py, lowrank.py are their helpers) -> records.py (Reason,
Actions, Solution: what the other stages read). placements.py: Replicate / Partial / DimShard.
"""
