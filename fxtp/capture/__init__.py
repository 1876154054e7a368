"""capture/: model -> graph, and the structural matchers that read it.

export.py (torch.export with dynamic batch and sequence -> `Captured`), no_ops.py (ops eager
code skips), linear.py (linears by structure; bias split and fuse), lora.py (LoRA branches),
inputs.py (the input specs a capture fixes, checked at every call).
"""
