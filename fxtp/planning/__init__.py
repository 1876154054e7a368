"""planning/: a solved graph -> `Plan`, the decisions as data.

planner.py (`fxtp.plan`: capture or probe, solve, describe), repeats.py (a deep model planned
from a probe of its repeated layers), describe.py (`Solution` -> `Plan` entries and reasons),
overrides.py (a user's `module -> replicate | shard`), plan.py (`Plan`, `PlanEntry`, JSON, the
table; `PlanSource`, what a plan was made from).
"""
