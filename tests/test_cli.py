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


def test_slow_steps_show_progress_on_stderr():
    r = fxtp("plan", "llama", "-n", "2")
    assert r.returncode == 0, r.stderr
    # rich progress: a spinner and the elapsed time on a terminal, the finished line in logs
    assert "done building llama" in r.stderr
    assert "done capturing and planning for 2 ranks" in r.stderr
    assert "parameter bytes per rank" in r.stdout


def test_plan_json_of_a_local_config_dir(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=64).save_pretrained(tmp_path)
    r = fxtp("plan", str(tmp_path), "-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["all_reduces_per_layer"] == {"model.layers.0": 2}


def _config_dir(tmp_path, **config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_config_of_an_unknown_architecture_is_one_line_and_exit_2(tmp_path):
    r = fxtp("plan", _config_dir(tmp_path, model_type="no_such_arch"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no_such_arch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_config_fxtp_cannot_capture_is_one_line_and_exit_2(tmp_path):
    # a vision model: no token ids to build inputs from, so it cannot be captured
    r = fxtp("plan", _config_dir(tmp_path, model_type="vit", hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, image_size=8, patch_size=4))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fxtp: error:" in r.stderr and "capture" in r.stderr


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


def test_explain_with_diff_shows_collectives_and_changes():
    r = fxtp("explain", "llama", "-n", "2", "--rank", "1", "--diff")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rank 1 of 2" in out
    assert out.count("2 all-reduce(s)") == 2                      # one line per layer
    assert "model.layers.0.self_attn.q_proj.weight: [64, 64] -> [32, 64]" in out
    assert "partial sum of row-parallel model.layers.0.mlp.down_proj" in out
    assert "+%all_reduce_sum" in out                              # the diff of layer 0


def test_draw_writes_a_dot_file_of_one_layer(tmp_path):
    # world size 1 runs in the CLI's process (no spawn); the drawing of a sharded graph is
    # checked on the ranks of tests/test_multirank.py
    path = tmp_path / "tp.dot"
    r = fxtp("draw", "gpt2", "-n", "1", "-o", str(path), "--layer", "transformer.h.1")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "done transform, draw" in r.stderr
    text = path.read_text()
    assert text.startswith('digraph "fxtp transformer.h.1"')
    assert "transformer.h.1.attn.c_attn.weight" in text and "all_reduce" not in text


def test_draw_svg_without_graphviz_names_the_package(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))                    # no `dot` on the PATH
    r = subprocess.run([sys.executable, "-m", "fxtp", "draw", "llama", "-o",
                        str(tmp_path / "tp.svg")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2
    assert "graphviz" in r.stderr and "Traceback" not in r.stderr


def test_verify_command_exit_code_and_per_output_errors():
    r = fxtp("verify", "bloom", "-n", "2", "--examples", "2", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equivalence check: PASSED" in r.stdout and "[logits " in r.stdout


@pytest.mark.parametrize("args, message", [
    (("explain", "llama", "--rank", "3"), "--rank 3 is not a rank of world size 2"),
    (("verify", "nope"), "unknown model 'nope'"),
])
def test_inspect_bad_input_is_one_line_and_exit_2(args, message):
    r = fxtp(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
