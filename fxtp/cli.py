"""`python -m fxtp` / `fxtp`: plan a model, or run the demo (tiny Llama on 2 gloo ranks)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from .errors import FxtpError


def _load_model(spec: str):
    """A tiny built-in model by name, or a local Hugging Face config/checkpoint directory."""
    from .models import TINY, tiny_model

    if spec in TINY:
        return tiny_model(spec)
    if os.path.isdir(spec):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(spec, local_files_only=True)
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        for cls in (AutoModelForCausalLM, AutoModel):
            try:
                if has_weights:
                    return cls.from_pretrained(spec, local_files_only=True).eval()
                return cls.from_config(cfg).eval()
            except (ValueError, KeyError):
                continue
        raise FxtpError(f"{spec}: no causal-LM or base model class for model_type "
                        f"{cfg.model_type!r}")
    if os.path.sep in spec or spec.startswith("."):
        raise FxtpError(f"{spec}: no such directory")
    raise FxtpError(f"unknown model {spec!r}: use one of {sorted(TINY)} or a local HF "
                    "config/checkpoint directory")


def _world_size(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"world size must be >= 1, got {n}")
    return n


def cmd_plan(args: argparse.Namespace) -> int:
    from .transform import plan_model

    model = _load_model(args.model)
    plan = plan_model(model, args.world_size)
    print(plan.to_json() if args.json else plan)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .models import tiny_model
    from .transform import plan_model
    from .verify import verify

    print(f"fxtp demo: a tiny random-weight Llama (GQA: 4 heads, 2 kv heads), "
          f"{args.world_size} gloo ranks on CPU\n")
    model = tiny_model("llama")
    print(plan_model(model, args.world_size))
    print(f"spawning {args.world_size} ranks; each transforms the model and compares it with the "
          f"untouched one on {args.examples} hypothesis-drawn inputs ...")
    t0 = time.perf_counter()
    reports = verify(model, args.world_size, max_examples=args.examples, timeout=args.timeout)
    elapsed = time.perf_counter() - t0
    ok = True
    for r in reports:
        worst = max(r["max_error"].values())
        ok &= worst <= 1e-4
        print(f"  rank {r['rank']}: {r['examples']} examples, max |tp - model| / (1 + |model|) = "
              f"{worst:.2e} (worst input {r['worst_input']}), {r['all_reduces']} all-reduces in the "
              f"graph, local linear params {r['param_fraction']:.3f} of full")
    print(f"equivalence check: {'PASSED' if ok else 'FAILED'} (tolerance 1e-4, {elapsed:.1f}s)")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the sharding plan of a model")
    p.add_argument("model", help="tiny built-in model (llama, gpt2, bert) or a local HF directory")
    p.add_argument("-n", "--world-size", type=_world_size, default=2)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("demo", help="tiny Llama on N gloo ranks: plan + equivalence check")
    d.add_argument("-n", "--world-size", type=_world_size, default=2)
    d.add_argument("--examples", type=int, default=10)
    d.add_argument("--timeout", type=float, default=600.0)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FxtpError as e:
        print(f"fxtp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
