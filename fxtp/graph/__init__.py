"""graph/: the FX helpers every stage uses, below all of them.

nodes.py (node args by path, tensor attributes by name, index runs), tensors.py (a graph's
tensors under every name, graph copies, meta tensors), devices.py (the devices baked into a
graph), ops.py (the public aten op catalogue: views, dropout, softmax, sdpa, ...).
"""
