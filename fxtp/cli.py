"""`python -m fxtp` / `fxtp`: plan, explain, draw or verify a model, or run the demo (tiny
Llama on 2 gloo ranks)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from ._transform import transform
from .errors import CliError, FxtpError
from .inspection.draw import draw, renderer
from .inspection.explain import diff, explain
from .planning.planner import plan_model
from .testing.checks import verify
from .testing.families import FAMILIES, family_model
from .testing.models import TINY, tiny_model
from .testing.ranks import run_ranks


def _load_model(spec: str):
    """A tiny built-in model by name, or a local Hugging Face config/checkpoint directory."""
    if spec in TINY:
        return tiny_model(spec)
    if spec in FAMILIES:
        return family_model(spec)
    if os.path.isdir(spec):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        try:
            cfg = AutoConfig.from_pretrained(spec, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CliError(f"{spec}: not a Hugging Face config directory transformers can "
                            f"read: {first}") from e
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        for cls in (AutoModelForCausalLM, AutoModel):
            try:
                if has_weights:
                    return cls.from_pretrained(spec, local_files_only=True).eval()
                return cls.from_config(cfg).eval()
            except (ValueError, KeyError):
                continue
        raise CliError(f"{spec}: no causal-LM or base model class for model_type "
                        f"{cfg.model_type!r}")
    if os.path.sep in spec or spec.startswith("."):
        raise CliError(f"{spec}: no such directory")
    raise CliError(f"unknown model {spec!r}: use one of {sorted(set(TINY) | set(FAMILIES))} "
                    "or a local HF config/checkpoint directory")


@contextmanager
def _step(description: str) -> Iterator[None]:
    """A rich progress line on stderr for a step that takes seconds (capture, spawning ranks):
    a spinner and the elapsed time on a terminal, the finished line otherwise (logs, CI)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(finished_text="done"), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=None)
        try:
            yield
        except BaseException:
            progress.update(task, visible=False)   # the error is the one line shown
            raise
        progress.update(task, total=1, completed=1)


def _model(spec: str):
    with _step(f"building {spec}"):
        return _load_model(spec)


def _world_size(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"world size must be >= 1, got {n}")
    return n


def cmd_plan(args: argparse.Namespace) -> int:
    model = _model(args.model)
    with _step(f"capturing and planning for {args.world_size} ranks"):
        plan = plan_model(model, args.world_size, sequence_parallel=args.sequence_parallel)
    print(plan.to_json() if args.json else plan)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    print(f"fxtp demo: a tiny random-weight Llama (GQA: 4 heads, 2 kv heads), "
          f"{args.world_size} gloo ranks on CPU\n")
    model = tiny_model("llama")
    with _step("capturing and planning"):
        plan = plan_model(model, args.world_size)
    print(plan)
    print(f"spawning {args.world_size} ranks; each transforms the model and compares it with the "
          f"untouched one on {args.examples} hypothesis-drawn inputs ...")
    return _verify(model, args)


def _verify(model, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with _step(f"{args.world_size} gloo ranks: transform, {args.examples} examples each"):
        reports = verify(model, args.world_size, max_examples=args.examples, timeout=args.timeout,
                         sequence_parallel=getattr(args, "sequence_parallel", False))
    return _report(reports, time.perf_counter() - t0)


def _report(reports: list, elapsed: float) -> int:
    """Prints each rank's equivalence report; 0 when every output is within 1e-4, else 1."""
    ok = True
    for r in reports:
        worst = max(r["max_error"].values())
        ok &= worst <= 1e-4
        per_output = ", ".join(f"{k} {v:.2e}" for k, v in r["max_error"].items())
        print(f"  rank {r['rank']}: {r['examples']} examples, max |tp - model| / (1 + |model|) = "
              f"{worst:.2e} [{per_output}] (worst input {r['worst_input']}), {r['all_reduces']} "
              f"all-reduces" + (f" and {r['sequence_collectives']} sequence collectives"
                                if r.get("sequence_collectives") else "")
              + f" in the graph, local linear params {r['param_fraction']:.3f} of full")
    print(f"equivalence check: {'PASSED' if ok else 'FAILED'} (tolerance 1e-4, {elapsed:.1f}s)")
    return 0 if ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    model = _model(args.model)
    print(f"spawning {args.world_size} gloo ranks; each compares fxtp.transform(model) with the "
          f"model on {args.examples} hypothesis-drawn inputs ...")
    return _verify(model, args)


def _inspect_rank(rank: int, world_size: int, spec: str, what: str, layer: Optional[str],
                  path: Optional[str], show: int, sequence_parallel: bool = False) -> Optional[str]:
    """Runs in each spawned rank: transform, then explain/diff/draw on rank `show` only."""
    tp = transform(_load_model(spec), world_size, sequence_parallel=sequence_parallel)
    if rank != show:
        return None
    if what == "draw":
        return draw(tp, path, layer)
    text = str(explain(tp, layer))
    if what == "diff":
        text += "\n\n" + diff(tp, layer)
    return text


def _inspect(args: argparse.Namespace, what: str, path: Optional[str] = None) -> int:
    if not 0 <= args.rank < args.world_size:
        raise CliError(f"--rank {args.rank} is not a rank of world size {args.world_size}")
    _model(args.model)               # a bad name or path fails here, before any spawn
    if args.world_size == 1:         # no collective: no process group, no spawn
        with _step(f"transform, {what}"):
            out = _inspect_rank(0, 1, args.model, what, args.layer, path, 0,
                                args.sequence_parallel)
    else:
        with _step(f"{args.world_size} gloo ranks: transform, {what} rank {args.rank}"):
            out = run_ranks(_inspect_rank, args.world_size, args.model, what, args.layer, path,
                            args.rank, args.sequence_parallel, timeout=args.timeout)[args.rank]
    print(out if what != "draw" else f"wrote {out} (rank {args.rank} of {args.world_size})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    return _inspect(args, "diff" if args.diff else "explain")


def cmd_draw(args: argparse.Namespace) -> int:
    renderer(args.output)            # Graphviz missing for .svg/.png: say so before spawning
    return _inspect(args, "draw", os.path.abspath(args.output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the sharding plan of a model")
    p.add_argument("model", help="tiny built-in model (llama, gpt2, bert) or a local HF directory")
    p.add_argument("-n", "--world-size", type=_world_size, default=2)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _sequence_arg(p)
    p.set_defaults(func=cmd_plan)
    d = sub.add_parser("demo", help="tiny Llama on N gloo ranks: plan + equivalence check")
    d.add_argument("-n", "--world-size", type=_world_size, default=2)
    d.add_argument("--examples", type=int, default=10)
    d.add_argument("--timeout", type=float, default=600.0)
    d.set_defaults(func=cmd_demo)
    v = sub.add_parser("verify", help="spawn N gloo ranks and check the TP model against the "
                                      "untouched one (exit 0 equal, 1 not)")
    _model_args(v)
    v.add_argument("--examples", type=int, default=10)
    v.set_defaults(func=cmd_verify)
    e = sub.add_parser("explain", help="per layer: sliced parameters, rewritten constants, "
                                       "collectives (spawns N gloo ranks, prints one)")
    _model_args(e)
    _rank_args(e)
    e.add_argument("--diff", action="store_true", help="also show the captured vs rewritten "
                                                       "graph of the layer as a diff")
    e.set_defaults(func=cmd_explain)
    g = sub.add_parser("draw", help="write one layer of a rank's rewritten graph (.dot, or "
                                    ".svg/.png with Graphviz)")
    _model_args(g)
    _rank_args(g)
    g.add_argument("-o", "--output", default="tp.dot", help="output file (default tp.dot)")
    g.set_defaults(func=cmd_draw)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="tiny built-in model (llama, gpt2, bert, ...) or a local HF "
                                 "directory")
    p.add_argument("-n", "--world-size", type=_world_size, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    _sequence_arg(p)


def _sequence_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence-parallel", action="store_true",
                   help="norms and residual adds hold 1/N of the tokens per rank (Megatron-SP)")


def _rank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, default=0, help="the rank whose graph to show")
    p.add_argument("--layer", default=None, help="one layer (e.g. model.layers.1; draw also "
                                                 "takes 'all'); default: every layer (explain), "
                                                 "the first (draw, --diff)")


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
