"""generation/: tensor-parallel decoding with a sharded static KV cache.

step.py (the decode step captured over a static cache), generator.py (`fxtp.generator`, driving
Hugging Face's generation helpers), replay.py (decode steps from static buffers: CUDA graphs),
tp_generate.py (`tp.generate` on the result of `fxtp.transform`).
"""
