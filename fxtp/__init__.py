"""fxtp: tensor parallelism for any PyTorch / Hugging Face model by rewriting its FX graph.

    tp = fxtp.transform(model, world_size)     # inside an initialised process group
    print(fxtp.plan(model, world_size))        # the decisions, no process group needed
"""
from ._load import LoadReport, init_empty, load
from ._transform import transform
from .errors import (
    CacheOverflowError,
    CaptureError,
    CheckpointError,
    CliError,
    DropoutError,
    DtypeError,
    FxtpError,
    GenerationError,
    InputError,
    InputMismatchError,
    LoraFoldError,
    LoraStateError,
    MetaTensorError,
    NoLoraError,
    NotDivisibleError,
    NotTransformedError,
    PlanOverrideError,
    ProcessGroupError,
    PromptMismatchError,
    RankLostError,
    RenderError,
    RewriteError,
    SaveError,
    ShardingError,
    UnknownLayerError,
    WeightMismatchError,
    WorldSizeError,
    WorldSizeMismatchError,
)
from .generation.generator import Generator, generator
from .inspection.draw import draw
from .inspection.explain import Explanation, diff, explain
from .modes import fold_lora, for_generation, for_training, unfold_lora
from .planning.plan import Plan, PlanEntry
from .planning.planner import plan_model as plan
from .rewrite.record import META_KEY, TPInfo
from .saving.save import SaveReport, save
from .saving.state import load_state, save_state
from .testing.checks import verify

__all__ = [
    "transform", "plan", "verify", "generator", "Generator", "explain", "diff", "draw", "Explanation", "for_training", "for_generation", "fold_lora",
    "unfold_lora", "Plan", "PlanEntry", "TPInfo", "META_KEY",
    "FxtpError", "CaptureError", "DropoutError", "NoLoraError", "LoraStateError", "InputError", "NotDivisibleError", "PlanOverrideError",
    "ProcessGroupError", "WorldSizeMismatchError", "GenerationError", "CacheOverflowError",
    "PromptMismatchError", "load", "init_empty", "LoadReport", "CheckpointError",
    "MetaTensorError", "DtypeError", "NotTransformedError", "WeightMismatchError", "InputMismatchError", "RankLostError",
    "WorldSizeError", "ShardingError", "LoraFoldError", "UnknownLayerError", "RenderError", "CliError",
    "RewriteError", "save", "SaveReport", "SaveError", "save_state", "load_state",
]
__version__ = "0.1.0"
