"""Structural matchers over captured graphs (found from the graph, never from names)."""
from .linear import LinearMatch, find_linears, split_biases

__all__ = ["LinearMatch", "find_linears", "split_biases"]
