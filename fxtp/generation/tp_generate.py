"""`tp.generate(...)`: Hugging Face's `generate` on the result of `fxtp.transform`, with no
second object and no copy of the weights.

    tp = fxtp.transform(model, ws)                      # every rank
    out = tp.generate(ids, attention_mask=mask, max_new_tokens=32)    # == model.generate(...)

What `tp` keeps for it (`attach`, called at the end of `fxtp.transform`): a *skeleton* of the
model, a deep copy whose parameters are meta tensors of their full shapes (no values; the
copy's config and generation_config are the model's), so `tp` holds no reference to the full
weights and `del model` frees them. Buffers that `tp`'s own graph holds under the same name
(rotary `inv_freq`) are meta in the skeleton too and taken from `tp`; the model's other
buffers and plain tensor attributes (small computed state, not weights) are copied as they are.

The decode step (`decode_step.capture_step` + the plan and rewrite of `fxtp.generator`) is
captured from the skeleton at the first call, as fake tensors on `tp`'s device (no memory, but
the model's device checks answer as they will when the step runs: capture/on_device.py), then
*bound* to `tp`: every parameter
of the step is replaced by `tp`'s parameter object of the same name (the same tensor: same
data pointer, no copy; the plan must have given it the same local slice, checked, else
`GenerationError`), its buffers by `tp`'s where `tp` holds them, and its KV cache is made of
zeros on `tp`'s device. Because the tensors are shared, optimizer steps on `tp` are what the
next call decodes with; `fxtp.load(tp, ...)` (new tensors) and `tp.to(device)` (tensors and
graph devices move) are followed at the next call: the binding is checked by identity each
call (a walk over `tp`'s parameters) and redone when anything changed.

LoRA (a PEFT model): the step runs its graph without the LoRA branches while `tp`'s adapters
are folded into the shared base shards: `fxtp.fold_lora(tp)` for the call and
`fxtp.unfold_lora(tp)` after it (the base shards are copied back bit for bit; the saved copies
are freed again, so no second copy of the base weights outlives the call). During the call
`tp` itself is folded, so it computes the same outputs if called. A `tp` the user folded
stays folded and is decoded as it is.

The step, sized `max_len` x `max_batch`, is kept and reused by later calls that fit; a call
that does not fit builds it again, larger (sizes rounded up: see `TPGenerate.__call__`).
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import fx, nn

from .._transform import transform
from ..capture.export import model_device
from ..capture.linear import split_biases
from ..capture.lora import find_lora_branches
from ..capture.on_device import faked_on, unfake
from ..errors import (
    CacheOverflowError,
    FxtpError,
    GenerationError,
    MetaTensorError,
    PromptMismatchError,
)
from ..graph.tensors import meta_tensors
from ..modes import fold_lora, is_folded, unfold_lora
from ..planning.describe import build_plan
from ..planning.planner import model_name
from ..rewrite.lora_fold import without_branches
from ..rewrite.record import META_KEY
from ..runtime.agreement import differing, guarded_gather, rank_groups
from ..runtime.group import collective_device, named_group
from ..shared_tensors import SharedTensors
from .generator import (
    CudaGraph,
    Generator,
    _check_cuda_graph,
    _generation_model,
    generation_lengths,
)
from .step import cache_attrs, capture_step

MIN_LEN = 64            # the smallest cache length built from a request
SHOWN = 5
_building = 0           # > 0 while a step is transformed: that transform attaches nothing


def attach(tp: fx.GraphModule, model: nn.Module) -> None:
    """Gives `tp` (just made by `fxtp.transform(model, ...)`) its `generate`: a `TPGenerate`
    holding the model's skeleton, or, for a model that cannot generate (not a Hugging Face
    causal LM, or `fxtp.generator`'s own step graph), one that raises `GenerationError` saying
    why. Never raises itself: a model that cannot be copied gets the error at call time."""
    if _building:
        return
    reason = None
    try:
        _generation_model(model)
        if not tp.meta[META_KEY].plan.captured.hf:
            reason = ("this graph is the decode step of fxtp.generator (it takes ids, positions, "
                      "mask and cache slot); call the generator's generate")
    except GenerationError as e:
        reason = str(e).replace("fxtp.generator: ", "", 1)
    skel = None
    if reason is None:
        info = tp.meta[META_KEY]
        opaque = list(info.plan.opaque)
        if opaque:
            # the step is captured from the weightless copy: an opaque part's shapes need an
            # eager run with the weights, and its code stopped torch.export once already
            reason = (f"{model_name(model)} has parts torch.export cannot capture "
                      f"({', '.join(opaque[:3])}{', ...' if len(opaque) > 3 else ''}: called "
                      "as opaque parts in tp's graph), and fxtp cannot capture a decode step "
                      "with opaque parts yet; tp itself computes the model's outputs (a loop "
                      "of tp calls without a KV cache decodes, slowly)")
        elif info.skeleton is None:
            reason = f"{info.skeleton_error}; use fxtp.generator(model, ws)"
        else:
            skel = info.skeleton        # made by fxtp.transform (capture/skeleton.py)
    tp.generate = TPGenerate(tp, skel, reason)


def _round_len(n: int) -> int:
    """Cache lengths built from requests: powers of two, at least MIN_LEN."""
    return max(MIN_LEN, 1 << (n - 1).bit_length())


def _round_batch(b: int) -> int:
    return 1 << (b - 1).bit_length()


class TPGenerate:
    """`tp.generate(input_ids, attention_mask=None, *, max_len=None, max_batch=None,
    cuda_graph=None, compile=False, **generation_kwargs)`: see `__call__`.

    Attributes: `generator` (the `fxtp.Generator` of the current step, None before the first
    call or after `release()`), `builds` (steps built so far), `max_len`, `max_batch` (the
    current step's cache size), `skeleton` (the weightless model copy)."""

    def __init__(self, tp: fx.GraphModule, skel: Optional[nn.Module], reason: Optional[str]):
        # a weak reference: tp owns this object; a strong one would make a cycle that keeps tp
        # (and its device memory) alive until the garbage collector runs
        self._tp = weakref.ref(tp)
        self.skeleton = skel
        self.reason = reason
        self.generator: Optional[Generator] = None
        self.builds = 0
        self._tensors: Optional[SharedTensors] = None   # the step's tensors that are tp's
        self._lora = False                   # the step runs without branches: fold tp per call
        self._compiled: dict[str, Any] = {}
        self._compile_key: Optional[str] = None

    def __repr__(self) -> str:
        if self.reason:
            return f"<tp.generate: unavailable ({self.reason})>"
        size = (f"step max_len={self.max_len}, max_batch={self.max_batch}"
                if self.generator else "no step built yet")
        return f"<tp.generate: {size}, {self.builds} build(s)>"

    @property
    def max_len(self) -> Optional[int]:
        return self.generator.max_len if self.generator else None

    @property
    def max_batch(self) -> Optional[int]:
        return self.generator.max_batch if self.generator else None

    def release(self) -> None:
        """Drops the decode step and its KV cache (the next call builds one again)."""
        self.generator = None
        self._tensors, self._lora = None, False
        self._compiled.clear()
        self._compile_key = None

    # -- the call ---------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_len: Optional[int] = None, max_batch: Optional[int] = None,
                 cuda_graph: CudaGraph = None, compile: bool | dict = False,
                 generation_config: Any = None, logits_processor: Any = None,
                 stopping_criteria: Any = None, **kwargs) -> torch.Tensor:
        """Like `model.generate(input_ids, attention_mask=..., **kwargs)` (greedy or sampling,
        Hugging Face's arguments and generation config): prompt + new tokens, `[batch,
        length]`, on `tp`'s device, the same on every rank. Call it on every rank with the same
        prompts and options (checked: `PromptMismatchError`); world size 1 too. The defaults
        are the model's generation config as it was at transform time
        (`tp.generate.skeleton.generation_config`).

        The decode step (a static KV cache of `max_len` slots x `max_batch` rows, this rank's
        kv heads) is built at the first call (a capture: seconds) and reused by every later
        call that fits. Its size comes from the request, rounded up so that a growing series
        of requests rebuilds rarely: `max_batch` = the batch size rounded up to a power of
        two, `max_len` = prompt length + new tokens - 1 rounded up to a power of two (at least
        64). A call that does not fit (a larger batch, a longer prompt or more new tokens)
        builds the step again, at least as large as before in both sizes. Pass `max_len` /
        `max_batch` to choose the size instead: a step at least that large is reused, else one
        of exactly that size is built, and a request needing more raises
        `CacheOverflowError` / `GenerationError` rather than growing it. `release()` frees
        the step.

        `cuda_graph` (None: on CUDA devices, True, False, "emulate") and `compile` (False,
        True, or `torch.compile` options) are the options of `fxtp.generator`, and apply to
        this call: changing them between calls changes how the same step runs (compiled
        steps are kept per set of options, so switching back does not compile again).

        Weights are `tp`'s own tensors, shared with the step: what training, `fxtp.load` or
        `tp.to(device)` did to `tp` is what is decoded. LoRA adapters are folded into `tp`'s
        base shards for the call and unfolded after it (bit for bit). A decode step whose plan
        would slice a tensor differently from `tp` raises `GenerationError` (no fallback
        copy of the weights is made: use `fxtp.generator(model, ws)` for that)."""
        if self.reason is not None:
            raise GenerationError(f"tp.generate: {self.reason}")
        tp = self._tp()
        if tp is None:
            raise GenerationError("tp.generate: the tensor-parallel graph it belonged to is gone")
        info = tp.meta[META_KEY]
        unloaded = meta_tensors(tp)
        if unloaded:
            raise MetaTensorError(
                f"tp.generate: the tensor-parallel model holds {len(unloaded)} tensor(s) on the "
                f"meta device ({', '.join(unloaded[:SHOWN])}): it was built without weights. "
                "Fill them with fxtp.load(tp, checkpoint_dir, device=...) on every rank first.")
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or input_ids.shape[1] < 1):
            raise GenerationError("tp.generate: input_ids must be a [batch, length] tensor with "
                                  f"length >= 1, got {getattr(input_ids, 'shape', input_ids)!r}")
        for what, v in (("max_len", max_len), ("max_batch", max_batch)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise GenerationError(f"tp.generate: {what} must be a positive int, got {v!r}")
        _check_cuda_graph(cuda_graph)
        hf = _generation_model(self.skeleton)
        b, p = input_ids.shape
        gc = generation_lengths(hf, input_ids, generation_config, kwargs)
        need = max(gc.max_length - 1, p)
        gen = self.generator
        fits = (gen is not None and gen.max_len >= max(need, max_len or 0)
                and gen.max_batch >= max(b, max_batch or 0))
        group = named_group(info.group_name)
        if info.world_size > 1:     # first: a request refused below is refused on every rank
            self._agree(group, info.rank, [b, p, need, max_len or 0, max_batch or 0, int(fits),
                                           gen.max_len if gen else 0, gen.max_batch if gen else 0])
        if max_len is not None and need > max_len:
            raise CacheOverflowError(
                f"tp.generate: a prompt of {p} tokens plus {gc.max_length - p} new tokens needs "
                f"{need} cache slots, more than max_len={max_len}; pass a larger max_len, or "
                "none to size the cache from the request")
        if max_batch is not None and b > max_batch:
            raise GenerationError(f"tp.generate: {b} prompts but max_batch={max_batch}; pass a "
                                  "larger max_batch, or none to size the cache from the request")
        if not fits:
            new_len = max_len or max(_round_len(need), gen.max_len if gen else 0)
            new_batch = max_batch or max(_round_batch(b), gen.max_batch if gen else 0)
            self._build(tp, new_len, new_batch, group)
        gen = self.generator
        self._bind(tp)
        gen.cuda_graph = cuda_graph
        self._set_compile(gen, compile)
        fold_here = self._lora and not is_folded(tp)
        if fold_here:
            fold_lora(tp)
        try:
            return gen.generate(input_ids, attention_mask, generation_config=generation_config,
                                logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria, **kwargs)
        finally:
            if fold_here:
                unfold_lora(tp)
                info.state.lora_last_fold.originals.clear()    # no second copy of the base shards

    # -- building and binding the step -------------------------------------------------------
    def _build(self, tp: fx.GraphModule, max_len: int, max_batch: int,
               group: Optional[dist.ProcessGroup]) -> None:
        """Captures, plans and rewrites the decode step of the skeleton (faked on `tp`'s
        device, its tensors then meta again, as `fxtp.generator` takes a model built under
        `fxtp.init_empty()`), with `tp`'s plan
        overrides and vocab_parallel choice (not sequence parallelism: a decode step's one
        token cannot be split), and checks that it can run on `tp`'s tensors. The old step is
        dropped first (its cache freed before the new one is made)."""
        global _building
        self.release()
        info = tp.meta[META_KEY]
        skel = self.skeleton
        hf = _generation_model(skel)
        _building += 1
        try:
            with faked_on(skel, None, model_device(tp), active=True):
                captured = capture_step(skel, hf, max_batch, max_len)
            unfake(captured.gm, skel)
            split_biases(captured.gm)
            plan = build_plan(captured, info.world_size, model_name(skel), info.plan.overrides,
                              info.plan.vocab_parallel)
            # the step's weights are tp's (checked by tp's transform or load): no weight check
            step = transform(skel, info.world_size, plan=plan, group=group, check_weights=False)
        except FxtpError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. planning reads values a meta tensor lacks
            raise GenerationError(
                f"tp.generate: the decode step of {info.plan.model_name} could not be built "
                f"from its weightless skeleton ({type(e).__name__}: {e}); most likely its "
                "capture or plan reads tensor values (Falcon's index lists), which a meta copy "
                "does not have. fxtp.generator(model, ws) builds the step from the real "
                "model.") from e
        finally:
            _building -= 1
        step.eval()
        self._match(tp, step)
        step_info = step.meta[META_KEY]
        if find_lora_branches(step, step_info.plan.solution.linears):
            if not (is_folded(tp) or find_lora_branches(tp, info.plan.solution.linears)):
                raise GenerationError("tp.generate: the decode step has LoRA branches but tp has "
                                      "none; tp and its skeleton differ")
            without_branches(step, step_info.plan.solution.linears,
                                  f"the decode step of {step_info.plan.model_name}")
            self._lora = True
        self.generator = Generator(step, hf, captured, max_len, max_batch, group)
        self.builds += 1

    def _match(self, tp: fx.GraphModule, step: fx.GraphModule) -> None:
        """Records which of the step's tensors are `tp`'s and which are its own (its KV cache,
        buffers `tp` lacks): `SharedTensors.match`; `GenerationError` names what cannot be
        shared or has no value."""
        info = tp.meta[META_KEY]

        def refuse(problems: list[str]):
            raise GenerationError(
                f"tp.generate: the decode step of {info.plan.model_name} cannot run on tp's "
                f"tensors ({len(problems)} problem(s)): {'; '.join(problems[:SHOWN])}. It "
                "shares tp's tensors and makes no copy of the weights; fxtp.generator(model, ws) "
                "builds a generator with its own weights instead.")
        self._tensors = SharedTensors.match(tp, step, set(cache_attrs(step)), refuse)

    def _bind(self, tp: fx.GraphModule) -> None:
        """Points the step's shared slots at `tp`'s current tensors and moves its own (a KV
        cache on meta becomes zeros) to `tp`'s device: `SharedTensors.bind`."""
        def replaced(name: str, what: str):
            raise GenerationError(
                f"tp.generate: tp's {name} is {what}, the decode step was built for "
                f"{tuple(self._tensors.shapes[name])}; something replaced it with another "
                "shape. Call tp.generate.release() to rebuild.")
        self._tensors.bind(tp, replaced)

    def _set_compile(self, gen: Generator, compile: bool | dict) -> None:
        key = None if not compile else repr(sorted((compile if isinstance(compile, dict)
                                                    else {}).items()))
        if key == self._compile_key:
            return
        if key is None:
            gen._step = gen.tp
        elif key in self._compiled:
            gen._step = self._compiled[key]
        else:
            gen.compile(**dict(compile if isinstance(compile, dict) else {}))
            self._compiled[key] = gen._step
        gen._replay.reset()
        self._compile_key = key

    @staticmethod
    def _agree(group: Optional[dist.ProcessGroup], rank: int, values: list[int]) -> None:
        """One guarded gather (`agreement.guarded_gather`: a lost rank raises `RankLostError`,
        never hangs): every rank asks for the same sizes and holds the same step, so all build
        (a collective) or none does."""
        table = guarded_gather(torch.tensor(values, dtype=torch.int64,
                                            device=collective_device(group)),
                               group, "the size check of tp.generate")
        cols = differing(table)
        if cols:
            what = ["batch size", "prompt length", "cache length needed", "max_len", "max_batch",
                    "whether the step fits", "built max_len", "built max_batch"]
            diff = [f"{what[c]} ({rank_groups(table[:, c].tolist())})" for c in cols]
            raise PromptMismatchError(
                f"tp.generate: the ranks were given different requests or hold different steps "
                f"({', '.join(diff)} differ; this is rank {rank}). Every rank must call "
                "tp.generate with the same prompts and options (broadcast them from rank 0); "
                "after an error on some ranks only, call tp.generate.release() on every rank.")
