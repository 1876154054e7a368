"""torch.compile checks that run inside the spawned gloo ranks: `fullgraph=True` (a graph break
is an error), every compiled frame counted by a counting backend, and the compiled results
compared with the eager TP graph's on the same inputs."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from fxtp.testing.checks import flatten_tensors

# sizes >= 2: dynamo specialises size-1 dims by design (0/1 specialisation)
SIZES = ((2, 7), (3, 5), (4, 11))


def compile_counts(tp: torch.nn.Module, calls: Sequence[Callable[[torch.nn.Module], list]],
                   backend: str = "eager", compile: bool = True) -> dict[str, Any]:
    """Runs each call on `torch.compile(tp, fullgraph=True, dynamic=True)` and on `tp` itself.

    Returns the frames compiled so far after each call (constant after the first: no recompile
    on new shapes) and the largest difference between compiled and eager results. `backend`
    "aot_eager" traces the backward graph as well. `compile=False` (a rank whose graph another
    rank compiles: the same graph, other shards) runs every call twice eagerly instead, so
    that the ranks' collectives stay in step, and returns nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if not compile:
        for call in calls:
            call(tp)
            call(tp)
        return {}
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(tp, fullgraph=True, dynamic=True, backend=counter)
    counts, error = [], 0.0
    for call in calls:
        got, want = call(compiled), call(tp)
        for g, w in zip(got, want, strict=True):
            error = max(error, float((g.double() - w.double()).abs().max()))
        counts.append(counter.frame_count)
    torch._dynamo.reset()
    return {"compilations": counts, "compile_error": error}


def forward_calls(make_inputs: Callable[[int, int], dict]) -> list[Callable]:
    """One no-grad forward per size; each returns the output's tensors."""
    def call(b: int, s: int) -> Callable:
        inputs = make_inputs(b, s)

        def run(m: torch.nn.Module) -> list:
            with torch.no_grad():
                return [t for _, t in flatten_tensors(m(**inputs))]
        return run
    return [call(b, s) for b, s in SIZES]


def backward_calls(vocab: int) -> list[Callable]:
    """One forward + cross-entropy backward per size; each returns the loss and every
    parameter's gradient (a backward graph compiled once must serve every size)."""
    def call(b: int, s: int) -> Callable:
        ids = (torch.arange(b * s).view(b, s) * 7) % vocab

        def run(m: torch.nn.Module) -> list:
            params = [p for p in m.parameters() if p.requires_grad]
            for p in params:
                p.grad = None
            logits = m(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
            loss.backward()
            return [loss.detach()] + [p.grad.clone() for p in params]
        return run
    return [call(b, s) for b, s in SIZES]


def hf_ids(model: torch.nn.Module) -> Callable[[int, int], dict]:
    """Deterministic inputs for a Hugging Face model of any signature (decoder ids for T5)."""
    from fxtp.capture.export import hf_example_inputs

    def make(b: int, s: int) -> dict:
        torch.manual_seed(b * 100 + s)
        return hf_example_inputs(model, b, s)
    return make
