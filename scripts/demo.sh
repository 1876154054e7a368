#!/usr/bin/env bash
# The demo: a tiny random Llama made tensor-parallel on 2 gloo ranks (CPU); prints the plan and
# the equivalence check against the untouched model.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m fxtp demo "$@"
