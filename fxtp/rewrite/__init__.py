"""rewrite/: a plan applied to one rank's copy of the graph.

pipeline.py (`PASSES` in order, `rewrite`), context.py (the pass contract: `fn(ctx) -> piece`,
a lint after each), one module per pass (shard_params, shape_constants, local_slices, vocab,
collectives, grad_sync, cleanup), record.py (`TPInfo`, kept in `tp.meta["fxtp"]`), lora_fold.py
(LoRA folded into the local shards and back).
"""
