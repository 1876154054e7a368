#!/usr/bin/env bash
# The test suite (unit tests plus real multi-process gloo runs at world sizes 1, 2 and 4).
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m pytest -q "$@"
