"""The example scripts and the GPU bench run as a user runs them (here on the CPU). The three
commands start together (one fixture): each spends seconds importing torch and transformers,
and the sweep's ranks wait on each other, so side by side they take less wall time."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every section header of bench/gpu.py, printed even when the section is skipped
BENCH_SECTIONS = ["environment", "forward, world 1, eager", "decode, batch 1",
                  "meta build -> transform -> fxtp.load", "two ranks on one device over gloo",
                  "tensor parallel over NCCL (TP=2, 4)", "decode, batch 2",
                  "forward, world 1, torch.compile"]


def _commands() -> dict[str, tuple[list[str], dict]]:
    from fxtp.testing.ranks import free_port

    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    return {
        "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                      os.path.join(ROOT, "examples", "torchrun_llama.py"), "--backend", "gloo",
                      "--sequence-parallel"],
                     dict(os.environ)),
        "gpu_bench": ([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--device", "cpu",
                       "--quick", "--repeats", "1", "--warmup", "0", "--only", "forward",
                       "decode1", "meta"], one_thread),
        "sweep": ([sys.executable, os.path.join(ROOT, "bench", "sweep.py"), "--only",
                   "llama,gptj,mamba", "--kinds", "causal", "--examples", "1", "--timeout", "120"],
                  one_thread),
    }


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env=env)

    commands = _commands()
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {name: pool.submit(run, *c) for name, c in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def test_torchrun_example_two_processes(runs):
    r = runs["torchrun"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "OK" in r.stdout.splitlines()[-1]
    # with a left-padded row; the plain layout runs everywhere else in the suite
    assert "(gloo, cpu, fp32, sequence parallel)" in r.stdout
    assert "model.layers.0.self_attn.q_proj" in r.stdout
    assert "per layer (forward): 2 all_gather, 2 reduce_scatter" in r.stdout


def test_gpu_bench_cpu_smoke(runs):
    """bench/gpu.py's CPU path (tiny Llama): every section header, the eager and compiled
    figures and the meta load; the slower sections (gloo ranks, the larger decode batch,
    compiled forward) are named but left out here to keep this under ~30 s."""
    r = runs["gpu_bench"]
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for title in BENCH_SECTIONS:
        assert f"== {title} ==" in out, title
    failed = [line for line in out.splitlines() if line.startswith("  FAILED")]
    assert not failed, out
    assert "skipped: no CUDA" in out                      # the NCCL section
    for label in ("eager forward, with attention_mask: fxtp / model",
                  "batch 1 eager tokens: fxtp vs HF", "batch 1 compiled: fxtp generator",
                  "no recompile per token", "loaded graph vs the model that wrote the checkpoint",
                  "fxtp.save(tp) of the loaded graph"):
        assert label in out, label
    saved = next(line for line in out.splitlines() if "fxtp.save(tp) of the loaded graph" in line)
    assert "save_pretrained's: True   [goal equal: met]" in saved, saved
    tokens = next(line for line in out.splitlines() if "batch 1 eager tokens: fxtp vs HF" in line)
    assert "equal   [goal equal: met]" in tokens, tokens


def test_sweep_shrinks_any_config_and_prints_a_row_per_model(runs):
    """bench/sweep.py on three model types: the generic shrink rule makes them tiny (GPT-J's
    rotary width follows its head), each gets a row (Mamba's mixers are opaque parts) and the
    totals add up."""
    r = runs["sweep"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert rows["llama"].split()[2] == "pass", rows["llama"]
    assert rows["gptj"].split()[2] == "pass", rows["gptj"]
    assert rows["mamba"].split()[2] == "opaque", rows["mamba"]
    assert "opaque: backbone.layers.0.mixer, backbone.layers.1.mixer" in rows["mamba"]
    assert "3 model types at world 2" in r.stdout.splitlines()[-1]
    assert "2 pass, 1 opaque" in r.stdout.splitlines()[-1]
