# Creates (once) and activates the project's own virtual environment in .venv.
# The project's own environment pins torch 2.13.0 (its CPU wheel installs in seconds; an unpinned
# torch may pull a multi-GB CUDA build). pyproject.toml only gives ranges, so a GPU user keeps
# the torch build they have.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import fxtp, pytest, pytest_timeout" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
fi
