"""saving/: `fxtp.save`, a tensor-parallel model back to a standard checkpoint directory.

layout.py (what is written, under which names, by which rank, into which file), writer.py (a
safetensors file written one tensor at a time), assemble.py (each tensor gathered from the
ranks' slices on the rank that writes it), save.py (the checks, the agreement steps and the
temporary directory renamed into place).
"""
