"""The command line (`python -m fxtp`): output and exit codes.

Every command runs once, all of them started together by one fixture (each pays for importing
torch and transformers; run one after the other they took four minutes of the suite), and the
tests read their results. Meanwhile the bad-input commands (refused before any model is built)
and the commands whose work is in ranks run in this process (`fxtp.cli.main`: the same exit
code and output; the ranks fork from a forkserver that has imported torch once).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_INPUT = {
    "unknown_model": (("plan", "no-such-model"), "unknown model 'no-such-model'"),
    "missing_dir": (("plan", "./missing/dir"), "no such directory"),
    "world_size_0": (("plan", "llama", "-n", "0"), "world size must be >= 1"),
    "bad_rank": (("explain", "llama", "--rank", "3"), "--rank 3 is not a rank of world size 2"),
    "verify_unknown": (("verify", "nope"), "unknown model 'nope'"),
}


def fxtp(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxtp", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def fxtp_in_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m fxtp ARGS` as `fxtp.cli.main` in this process (its exit code and output),
    for the commands refused before any model is built (each process costs seconds of imports)."""
    from fxtp.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(list(args))
        except SystemExit as e:       # argparse's own errors
            code = e.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def _config_dir(path, **config) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from transformers import AutoConfig

    tmp = tmp_path_factory.mktemp("cli")
    llama_dir = tmp / "llama_cfg"
    AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=64).save_pretrained(llama_dir)
    no_dot = tmp / "empty_path"
    no_dot.mkdir()
    commands = {
        "plan_gpt2": (("plan", "gpt2", "-n", "4"), None),
        "plan_json": (("plan", str(llama_dir), "-n", "2", "--json"), None),
        "unknown_arch": (("plan", _config_dir(tmp / "unknown", model_type="no_such_arch")), None),
        # a vision model: no token ids to build inputs from, so it cannot be captured
        "cannot_capture": (("plan", _config_dir(
            tmp / "vit", model_type="vit", hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, image_size=8, patch_size=4)), None),
        # world size 1 runs in the CLI's process (no spawn); the drawing of a sharded graph is
        # checked on the ranks of tests/test_multirank.py
        "draw": (("draw", "gpt2", "-n", "1", "-o", str(tmp / "tp.dot"), "--layer",
                  "transformer.h.1"), None),
        "svg_no_graphviz": (("draw", "llama", "-o", str(tmp / "tp.svg")),
                            dict(os.environ, PATH=str(no_dot))),       # no `dot` on the PATH
    }
    # in this process, while the others run: the commands refused before any model is built,
    # and those whose work is in ranks (which fork from this process's forkserver, imports done)
    in_process = {name: args for name, (args, _) in BAD_INPUT.items()}
    in_process.update(demo=("demo", "--examples", "3"),
                      explain=("explain", "llama", "-n", "2", "--rank", "1", "--diff"),
                      verify=("verify", "bloom", "-n", "2", "--examples", "2"))
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(fxtp, *args, env=env)
                   for name, (args, env) in commands.items()}
        out = {name: fxtp_in_process(*args) for name, args in in_process.items()}
        out.update({name: f.result() for name, f in futures.items()})
    out["tmp"] = tmp
    return out


def test_plan_of_a_builtin_model_with_progress(runs):
    r = runs["plan_gpt2"]
    assert r.returncode == 0, r.stderr
    assert "transformer.h.0.attn.c_attn" in r.stdout
    assert "all-reduces per layer (forward): 2" in r.stdout
    assert "parameter bytes per rank" in r.stdout
    # rich progress: a spinner and the elapsed time on a terminal, the finished line in logs
    assert "done building gpt2" in r.stderr
    assert "done capturing and planning for 4 ranks" in r.stderr


def test_plan_json_of_a_local_config_dir(runs):
    r = runs["plan_json"]
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["all_reduces_per_layer"] == {"model.layers.0": 2}


def test_config_of_an_unknown_architecture_is_one_line_and_exit_2(runs):
    r = runs["unknown_arch"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no_such_arch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_config_fxtp_cannot_capture_is_one_line_and_exit_2(runs):
    r = runs["cannot_capture"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fxtp: error:" in r.stderr and "capture" in r.stderr


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(runs, name):
    r = runs[name]
    assert r.returncode == 2
    assert BAD_INPUT[name][1] in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_runs_two_ranks_and_passes(runs):
    r = runs["demo"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equivalence check: PASSED" in r.stdout
    assert "rank 1:" in r.stdout and "model.layers.0.self_attn.q_proj" in r.stdout


def test_explain_with_diff_shows_collectives_and_changes(runs):
    r = runs["explain"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rank 1 of 2" in out
    assert out.count("2 all-reduce(s)") == 2                      # one line per layer
    assert "model.layers.0.self_attn.q_proj.weight: [64, 64] -> [32, 64]" in out
    assert "partial sum of row-parallel model.layers.0.mlp.down_proj" in out
    assert "+%all_reduce_sum" in out                              # the diff of layer 0


def test_draw_writes_a_dot_file_of_one_layer(runs):
    r = runs["draw"]
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "done transform, draw" in r.stderr
    text = (runs["tmp"] / "tp.dot").read_text()
    assert text.startswith('digraph "fxtp transformer.h.1"')
    assert "transformer.h.1.attn.c_attn.weight" in text and "all_reduce" not in text


def test_draw_svg_without_graphviz_names_the_package(runs):
    r = runs["svg_no_graphviz"]
    assert r.returncode == 2
    assert "graphviz" in r.stderr and "Traceback" not in r.stderr


def test_verify_command_exit_code_and_per_output_errors(runs):
    r = runs["verify"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equivalence check: PASSED" in r.stdout and "[logits " in r.stdout
