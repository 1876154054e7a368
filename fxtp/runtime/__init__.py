"""runtime/: what the rewritten graph calls and how the ranks talk; imports only graph/.

group.py (the process group, the world-size check), collectives.py (autograd-aware functional
collectives the graph calls by group name), agreement.py (timeout-guarded gathers of small
checksums), weight_check.py and input_check.py (the ranks' agreement checks), state.py
(`RuntimeState`: what a tensor-parallel graph changes as it is used).
"""
