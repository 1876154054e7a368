"""Rewrite passes: each takes the captured GraphModule and the solver's actions and does one job."""
from .cleanup import cleanup
from .collectives import insert_all_reduces, keep_constant_adds_on_rank0
from .grad_sync import insert_grad_syncs
from .local_slices import insert_local_slices
from .shape_constants import rewrite_shape_constants
from .shard_params import shard_linear_params
from .vocab import gather_vocab_outputs, mask_vocab_embeddings

__all__ = ["cleanup", "insert_grad_syncs", "insert_all_reduces", "keep_constant_adds_on_rank0", "insert_local_slices", "rewrite_shape_constants",
           "shard_linear_params", "gather_vocab_outputs", "mask_vocab_embeddings"]
