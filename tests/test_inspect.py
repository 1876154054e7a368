"""fxtp.explain / diff / draw in-process (world size 1 needs no process group); the multi-rank
content (collectives per layer, sliced shapes, the diff) is checked in test_multirank.py and
through the CLI in test_cli.py."""
from __future__ import annotations

import shutil

import pytest
import torch

import fxtp
from fxtp.inspection.draw import to_dot
from fxtp.testing.models import tiny_model


@pytest.fixture(scope="module")
def tp1():
    return fxtp.transform(tiny_model("llama"), 1)


def test_explain_refuses_a_module_fxtp_did_not_make():
    with pytest.raises(fxtp.FxtpError, match="not a graph made by fxtp.transform"):
        fxtp.explain(torch.nn.Linear(2, 2))


def test_explain_at_world_size_one_changes_nothing(tp1):
    ex = fxtp.explain(tp1)
    assert ex.all_reduces == {} and ex.world_size == 1
    assert all(not lay.sharded and not lay.constants for lay in ex.layers.values())
    with pytest.raises(fxtp.FxtpError, match="no layer 'model.layers.9'"):
        fxtp.explain(tp1, "model.layers.9")


def test_diff_at_world_size_one_is_empty(tp1):
    assert fxtp.diff(tp1, "model.layers.0") == ""


def test_to_dot_one_layer_by_default_or_all(tp1):
    one, every = to_dot(tp1), to_dot(tp1, "all")
    assert one.startswith('digraph "fxtp model.layers.0"') and "linear" in one
    assert "model_layers_1_self_attn_q_proj_weight" not in one.replace("dashed", "")
    assert every.count("->") > 2 * one.count("->")
    with pytest.raises(fxtp.FxtpError, match="no layer 'nope'"):
        to_dot(tp1, "nope")


def test_draw_svg_without_graphviz_is_a_named_error(tp1, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(fxtp.FxtpError, match="install the graphviz package"):
        fxtp.draw(tp1, str(tmp_path / "tp.svg"))
    path = fxtp.draw(tp1, str(tmp_path / "tp.dot"))                # .dot needs nothing
    assert open(path).read().startswith("digraph")


def test_inspection_errors_name_their_meaning(tp1, tmp_path, monkeypatch):
    """A missing layer and a missing renderer each have their own FxtpError subclass."""
    for call in (lambda: fxtp.explain(tp1, "model.layers.9"), lambda: to_dot(tp1, "nope"),
                 lambda: fxtp.diff(tp1, "nope")):
        with pytest.raises(fxtp.UnknownLayerError):
            call()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(fxtp.RenderError, match="Graphviz"):
        fxtp.draw(tp1, str(tmp_path / "tp.svg"))
