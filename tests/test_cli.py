"""The command line, through a real subprocess: output and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fxtp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxtp", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_plan_of_a_builtin_model():
    r = fxtp("plan", "gpt2", "-n", "4")
    assert r.returncode == 0, r.stderr
    assert "transformer.h.0.attn.c_attn" in r.stdout
    assert "all-reduces per layer (forward): 2" in r.stdout


def test_plan_json_of_a_local_config_dir(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=64).save_pretrained(tmp_path)
    r = fxtp("plan", str(tmp_path), "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["all_reduces_per_layer"] == {"model.layers.0": 2}


@pytest.mark.parametrize("args, message", [
    (("plan", "no-such-model"), "unknown model 'no-such-model'"),
    (("plan", "./missing/dir"), "no such directory"),
    (("plan", "llama", "-n", "0"), "world size must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = fxtp(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_runs_two_ranks_and_passes():
    r = fxtp("demo", "--examples", "3", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equivalence check: PASSED" in r.stdout
    assert "rank 1:" in r.stdout and "model.layers.0.self_attn.q_proj" in r.stdout
