"""Bad inputs for the public API, drawn by hypothesis, and what every refusal must satisfy.

Shared by the in-process fuzz tests (world 1) and the gloo ranks of `fuzz_workers.py` (world 2):
a strategy draws one bad call as plain data (`BadCall`), `attempt` makes it and records the
outcome, `Snapshot` records every tensor (bitwise), the plan's decisions and the LoRA fold
state before the call so that a refusal is seen to change nothing.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

import fxtp
from fxtp.graph.tensors import tensor_attrs
from fxtp.testing.models import tiny_model

VOCAB = 128        # the tiny models' vocabulary


def fuzz_settings(n: int) -> settings:
    """Derandomized (every rank draws the same cases, runs repeat), no database, no deadline,
    no shrinking phase: a failing case is reported as drawn."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------------------------------------
# outcome of one call

@dataclass
class Outcome:
    case: str
    error: Optional[str] = None         # the exception's class name; None: the call succeeded
    is_fxtp: bool = False               # an FxtpError subclass
    message: str = ""
    classes: tuple = ()                 # the error's class and its bases, by name
    named: bool = True                  # the message names the thing drawn
    unchanged: bool = True              # nothing changed (tensors, plan, fold state, model)
    changes: list = field(default_factory=list)

    def problems(self, expected: tuple = (fxtp.FxtpError,)) -> list[str]:
        out = []
        names = {c.__name__ for c in expected}
        if self.error is None:
            out.append("accepted")
        elif not self.is_fxtp:
            out.append(f"not an FxtpError: {self.error}")
        elif not names & set(self.classes):
            out.append(f"{self.error}, expected {sorted(names)}")
        if not self.named:
            out.append("message does not name the input")
        if not self.unchanged:
            out.append(f"changed {self.changes[:3]}")
        return [f"{self.case}: {p} ({self.message[:300]!r})" for p in out]


def attempt(case: str, fn: Callable[[], Any], words: tuple = (),
            before: "Optional[Snapshot]" = None) -> Outcome:
    """Calls fn; records the error and whether its message names one of `words` (any, case
    insensitive), and whether `before` still holds afterwards."""
    out = Outcome(case)
    try:
        fn()
    except Exception as e:          # noqa: BLE001 - everything is recorded, the test judges
        out.error, out.is_fxtp, out.message = type(e).__name__, isinstance(e, fxtp.FxtpError), str(e)
        out.classes = tuple(c.__name__ for c in type(e).__mro__)
        low = out.message.lower()
        out.named = not words or any(str(w).lower() in low for w in words)
    if before is not None:
        out.changes = before.differences()
        out.unchanged = not out.changes
    return out


# ---------------------------------------------------------------------------------------------
# state that a refusal must leave alone

class Snapshot:
    """Every tensor the graph (and the user's model) holds, cloned, with its identity; the
    plan's JSON; the LoRA fold state; the training flag."""

    def __init__(self, tp: Any = None, model: Any = None, plan: Any = None,
                 extra: Optional[dict] = None):
        self.objs = (tp, model, plan)
        self.tensors: dict[str, tuple[int, torch.Tensor]] = {}
        if tp is not None:
            gm = tp if isinstance(tp, torch.fx.GraphModule) else tp.tp
            for name, t in tensor_attrs(gm).items():
                self.tensors["tp." + name] = (id(t), t.detach().clone())
            info = gm.meta["fxtp"]
            self.fold = info.state.lora_fold is not None
            self.training = gm.training
            self.tp_plan = info.plan.to_json()
        if model is not None:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                self.tensors["model." + name] = (id(t), t.detach().clone())
        self.plan = plan.to_json() if plan is not None else None
        self.extra = {k: v.detach().clone() for k, v in (extra or {}).items()}
        self.extra_src = extra or {}

    def differences(self) -> list[str]:
        tp, model, plan = self.objs
        now: dict[str, torch.Tensor] = {}
        out = []
        if tp is not None:
            gm = tp if isinstance(tp, torch.fx.GraphModule) else tp.tp
            now.update({"tp." + n: t for n, t in tensor_attrs(gm).items()})
            info = gm.meta["fxtp"]
            if (info.state.lora_fold is not None) != self.fold:
                out.append("fold state")
            if gm.training != self.training:
                out.append("training flag")
            if info.plan.to_json() != self.tp_plan:
                out.append("tp's plan")
        if model is not None:
            now.update({"model." + n: t for n, t in [*model.named_parameters(),
                                                      *model.named_buffers()]})
        if set(now) != set(self.tensors):
            out.append(f"tensor names {sorted(set(now) ^ set(self.tensors))[:3]}")
        for name, (ident, old) in self.tensors.items():
            t = now.get(name)
            if t is None:
                continue
            if id(t) != ident:
                out.append(f"{name} replaced")
            elif t.shape != old.shape or t.dtype != old.dtype or t.device != old.device \
                    or (t.device.type != "meta" and not torch.equal(t.detach(), old)):
                out.append(f"{name} values")
        if plan is not None and plan.to_json() != self.plan:
            out.append("plan decisions")
        for k, old in self.extra.items():
            if not torch.equal(self.extra_src[k], old):
                out.append(f"{k} values")
        return out


# ---------------------------------------------------------------------------------------------
# strategies

names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                 st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
                 st.dictionaries(names, st.integers(), max_size=2))


@st.composite
def bad_calls(draw, hf_names=("input_ids", "attention_mask", "use_cache")) -> tuple:
    """(description, args, kwargs, words the refusal must name) of a call of a tiny HF causal
    LM's tensor-parallel graph that it was not captured for."""
    b, s = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    kind = draw(st.sampled_from(["ids_dtype", "ids_rank", "empty", "mask_shape", "mask_rank",
                                 "not_tensor", "unknown_kwarg", "positional", "use_cache",
                                 "device", "mask_dtype_rank"]))
    kw: dict[str, Any] = {"input_ids": ids}
    args: tuple = ()
    words: tuple = ()
    if kind == "ids_dtype":
        dt = draw(st.sampled_from([torch.float16, torch.float32, torch.float64, torch.bool,
                                   torch.bfloat16, torch.uint8, torch.int8, torch.int16,
                                   torch.complex64]))
        kw["input_ids"] = ids.to(dt)
        words = ("input_ids",)
        kind += f" {dt}"
    elif kind == "ids_rank":
        rank = draw(st.sampled_from([0, 1, 3, 4]))
        shape = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
        kw["input_ids"] = torch.randint(0, VOCAB, shape, generator=g)
        words = ("input_ids",)
        kind += f" {list(shape)}"
    elif kind == "empty":
        dim = draw(st.integers(0, 1))
        kw["input_ids"] = ids[:0] if dim == 0 else ids[:, :0]
        if draw(st.booleans()):
            kw["attention_mask"] = torch.ones_like(kw["input_ids"])
        words = ("input_ids", "attention_mask")
        kind += f" dim {dim}"
    elif kind == "mask_shape":
        db, ds = draw(st.sampled_from([(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (2, -1)]))
        if b + db < 1 or s + ds < 1:
            db, ds = 0, 1
        kw["attention_mask"] = torch.ones(b + db, s + ds, dtype=torch.long)
        words = ("attention_mask",)
        kind += f" {[b + db, s + ds]} vs {[b, s]}"
    elif kind == "mask_rank":
        shape = draw(st.sampled_from([(b,), (b, s, 1), (b, 1, s, s), ()]))
        kw["attention_mask"] = torch.ones(shape, dtype=torch.long)
        words = ("attention_mask",)
        kind += f" {list(shape)}"
    elif kind == "mask_dtype_rank":     # a float mask of the wrong rank
        kw["attention_mask"] = torch.ones(b, s, 1)
        words = ("attention_mask",)
    elif kind == "not_tensor":
        which = draw(st.sampled_from(["input_ids", "attention_mask"]))
        value = draw(st.one_of(st.just(ids.tolist()), junk.filter(lambda v: v is not None
                                                                  or which == "input_ids")))
        kw[which] = value
        words = (which,)
        kind += f" {which}={type(value).__name__}"
    elif kind == "unknown_kwarg":
        extra = draw(st.dictionaries(names.filter(lambda n: n not in hf_names),
                                     st.one_of(junk, st.just(ids)), min_size=1, max_size=3))
        kw.update(extra)
        words = tuple(extra)
        kind += f" {sorted(extra)}"
    elif kind == "positional":
        args = tuple(draw(st.lists(st.just(ids), min_size=1, max_size=3)))
        if draw(st.booleans()):
            kw = {}
        words = ("positional",)
        kind += f" {len(args)}"
    elif kind == "use_cache":
        value = draw(st.one_of(st.just(True), st.none(), st.just("no"), st.just(ids)))
        kw["use_cache"] = value
        words = ("use_cache",)
        kind += f" {type(value).__name__}"
    elif kind == "device":
        kw["input_ids"] = ids.to("meta")
        words = ("input_ids",)
    return kind, args, kw, words


@st.composite
def bad_world_sizes(draw, valid: int = 1) -> Any:
    """A world size that is not `valid`: non-positive, non-integral, another type."""
    return draw(st.one_of(st.integers(-4, 0), st.integers(1, 64).filter(lambda n: n != valid),
                          st.floats(allow_nan=True).filter(lambda f: f != valid),
                          st.text(max_size=3), st.none(), st.booleans(),
                          st.lists(st.integers(1, 2), max_size=2)))


def overrides_for(modules: list[str]):
    """Override dicts with at least one entry that must be refused: an unknown module (a real
    path mutated, a random path, a real path plus a suffix), a value other than
    'replicate'/'shard', a key that is not a string; or something that is not a dict."""
    mutated = st.builds(lambda m, i, c: (m[:i] + c + m[i + 1:]) if m else c,
                        st.sampled_from(modules), st.integers(0, 30),
                        st.sampled_from(list("xyz._0189")))
    unknown = st.one_of(mutated.filter(lambda m: m not in modules), st.just(""),
                        names.filter(lambda m: m not in modules),
                        st.builds(lambda m, s: f"{m}.{s}", st.sampled_from(modules), names)
                        .filter(lambda m: m not in modules))
    bad_value = st.one_of(st.sampled_from(["column", "row", "Replicate", "SHARD", "", "vocab"]),
                          st.none(), st.integers(), st.lists(st.just("replicate"), max_size=2),
                          st.booleans())
    good = st.tuples(st.sampled_from(modules), st.just("replicate"))
    one_bad = st.one_of(
        st.tuples(unknown, st.sampled_from(["replicate", "shard"])).map(lambda kv: (kv, kv[0])),
        st.tuples(st.sampled_from(modules), bad_value).map(lambda kv: (kv, kv[1])),
        st.tuples(st.one_of(st.integers(), st.none(), st.tuples(st.integers())),
                  st.just("replicate")).map(lambda kv: (kv, kv[0])))

    @st.composite
    def draw_overrides(draw):
        if draw(st.integers(0, 9)) == 0:     # not a dict at all
            value = draw(st.one_of(st.text(max_size=5), st.lists(good, max_size=2),
                                   st.integers(), st.just(("model.norm", "replicate"))))
            return value, ("dict",)
        (key, value), named = draw(one_bad)
        pairs = [p for p in draw(st.lists(good, max_size=2)) if p[0] != key]
        at = draw(st.integers(0, len(pairs)))
        pairs.insert(at, (key, value))
        return dict(pairs), (repr(named), str(named))
    return draw_overrides()


def json_edits(text: str):
    """A saved plan's JSON broken by hand: cut at a drawn offset, a key removed or given a value
    of another type, the whole document replaced, bytes flipped."""
    import json

    data = json.loads(text)

    @st.composite
    def edit(draw):
        kind = draw(st.sampled_from(["cut", "drop", "retype", "replace", "flip", "entry"]))
        if kind == "cut":
            at = draw(st.integers(0, len(text) - 2))
            return f"cut at {at}", text[:at]
        if kind == "drop":
            k = draw(st.sampled_from(["model", "world_size", "entries", "all_reduces_per_layer",
                                      "all_reduce_sites", "replicated", "not_divisible"]))
            d = dict(data)
            del d[k]
            return f"drop {k}", json.dumps(d)
        if kind == "retype":
            k = draw(st.sampled_from(["world_size", "entries", "replicated", "not_divisible",
                                      "local_param_bytes", "all_reduce_sites"]))
            v = draw(st.one_of(st.just("x"), st.just([1]), st.just(3), st.just({"a": 1}),
                               st.just(None), st.just([{}])))
            if k == "world_size" and v == 3:
                v = "three"
            d = dict(data)
            d[k] = v
            return f"{k}={v!r}", json.dumps(d)
        if kind == "replace":
            v = draw(st.one_of(st.just("[]"), st.just("null"), st.just("3"), st.just('"plan"'),
                               st.just("{}"), st.just("")))
            return f"document {v!r}", v
        if kind == "entry":
            d = json.loads(text)
            e = d["entries"][draw(st.integers(0, len(d["entries"]) - 1))]
            k = draw(st.sampled_from(["module", "parameter", "extra", "local_numels",
                                      "full_numel"]))
            if k == "extra":
                e["extra"] = 1
            elif k == "local_numels":
                e[k] = 5
            else:
                e.pop(k)
            return f"entry {k}", json.dumps(d)
        at = draw(st.integers(0, len(text) - 1))
        ch = draw(st.sampled_from(list('{}[]":,')))
        return f"flip {at} to {ch}", text[:at] + ch + text[at + 1:]
    return edit()


def wrong_shape(t: torch.Tensor, how: int) -> torch.Tensor:
    """`t` of another shape: a row more or less, flattened, a dim added."""
    how = how % 4
    if how == 0:
        return torch.cat([t, t[:1]], 0)
    if how == 1 and t.shape[0] > 1:
        return t[1:].clone()
    if how == 2 and t.dim() > 1:
        return t.reshape(-1).clone()
    return t.unsqueeze(0).clone()


# ---------------------------------------------------------------------------------------------
# models: one layer (the calling conventions, plans and checkpoints do not depend on depth;
# a one-layer capture costs about two thirds of a two-layer one)

def small_llama(seed: int = 0, **overrides):
    return tiny_model("llama", seed, **{"num_hidden_layers": 1, **overrides})


def small_lora(seed: int = 0):
    """small_llama with PEFT LoRA adapters on every linear of the layer, random B matrices (so
    folding changes the weights) and no dropout."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"])
    model = get_peft_model(small_llama(seed), cfg).eval()
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
