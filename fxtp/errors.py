"""fxtp's errors: one base class so callers can catch everything fxtp raises on purpose.

Every message names the node or module involved and says what to do about it.
"""
from __future__ import annotations


class FxtpError(Exception):
    """Base class of every error fxtp raises deliberately."""


class NotTransformedError(FxtpError):
    """A function that takes the result of fxtp.transform (fold_lora, unfold_lora, for_training,
    for_generation, explain, diff) was given something else (the model itself, a Generator)."""


class CaptureError(FxtpError):
    """The model could not be captured as an FX graph."""


class ProcessGroupError(FxtpError):
    """torch.distributed is not initialised, or its group disagrees with the request."""


class WorldSizeMismatchError(ProcessGroupError):
    """`world_size` differs from the size of the process group."""


class RankLostError(ProcessGroupError):
    """A rank did not take part in one of fxtp's own agreement steps (weight, input, prompt or
    checkpoint checks) within the group's timeout: it died, hung, or called something else."""


class WeightMismatchError(FxtpError):
    """The ranks hold different weights (another seed, another checkpoint) for a parameter or
    buffer that must be identical on every rank before it is sharded."""


class NotDivisibleError(FxtpError):
    """A sharded dimension (heads, kv heads, features) is not divisible by the world size."""


class PlanOverrideError(FxtpError):
    """A user override names a module that does not exist or asks for something impossible."""


class WorldSizeError(PlanOverrideError, ProcessGroupError):
    """`world_size` is not an int >= 1. One class wherever it is given (fxtp.plan, Plan.replan,
    fxtp.transform, fxtp.generator): a subclass of both errors those calls raise otherwise."""


class ShardingError(FxtpError):
    """No consistent sharding was found: the propagation did not settle, or a tied tensor would
    need two different slices. A plan override that keeps the module replicated avoids it."""


class RewriteError(FxtpError):
    """A rewrite pass left the graph malformed (a bug in fxtp): the message names the pass."""


class InputError(FxtpError):
    """The transformed module was called with inputs it was not captured for, or fxtp was not
    given the inputs (or input strategy) it needs for a model that is not from Hugging Face."""


class InputMismatchError(InputError):
    """`check_inputs=True`: the ranks called the tensor-parallel model with different inputs."""


class DropoutError(FxtpError):
    """Training was asked of a graph captured with dropout, which the graph has baked in as off."""


class NoLoraError(FxtpError):
    """fold_lora was asked of a graph without LoRA branches."""


class LoraFoldError(FxtpError):
    """fold_lora found LoRA branches whose base weight cannot take them folded in (not 2-D)."""


class LoraStateError(FxtpError):
    """fold_lora on a folded graph, unfold_lora on an unfolded one, or training while folded."""


class GenerationError(FxtpError):
    """Tensor-parallel generation was asked of a model or with arguments it cannot serve."""


class CacheOverflowError(GenerationError):
    """Generation would write past the end of the static KV cache (`max_len`)."""


class PromptMismatchError(GenerationError):
    """The ranks were given different prompts or generation arguments."""


class CheckpointError(FxtpError):
    """A checkpoint does not fit the tensor-parallel model (missing tensors, other shapes or
    dtypes, another architecture) or cannot be read (a truncated file); nothing was loaded."""


class SaveError(FxtpError):
    """fxtp.save could not write the checkpoint: the directory holds other files, a rank could
    not write its part, or the ranks do not see the same filesystem. Nothing is left at the
    path (the old directory, with overwrite=True, stays as it was)."""


class MetaTensorError(FxtpError):
    """The tensor-parallel model still holds meta tensors (built on the meta device, not loaded)."""


class DtypeError(FxtpError):
    """A dtype other than the one the graph was captured in (load(dtype=), tp.to(dtype))."""


class UnknownLayerError(FxtpError):
    """explain, diff or draw was asked for a layer the tensor-parallel graph does not have."""


class RenderError(FxtpError):
    """fxtp.draw could not render the requested format (Graphviz missing or failing)."""


class CliError(FxtpError):
    """A command-line argument names a model, directory or rank that does not exist."""
