#!/usr/bin/env bash
# The generation tests (capture of the decoding step with a static cache, tokens equal to
# model.generate, LoRA, meta capture) on the lowest transformers that pyproject.toml allows.
# That transformers goes into an overlay directory on PYTHONPATH, with the huggingface_hub and
# tokenizers its import-time version check asks for (transformers 5.15: hub >= 1.5, < 2 (which
# needs httpx), tokenizers >= 0.22, <= 0.23.0); everything else comes from .venv. Raise the
# pins here with the bound in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
low=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
overlay="${TMPDIR:-/tmp}/fxtp-transformers-$low"
if [ ! -f "$overlay/.complete" ]; then
  rm -rf "$overlay"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$overlay" \
    "transformers==$low" "huggingface_hub>=1.5,<2" "httpx>=0.23,<1" "httpcore>=1,<2" certifi \
    "tokenizers>=0.22,<=0.23.0"
  touch "$overlay/.complete"
fi
PYTHONPATH="$overlay" .venv/bin/python -c "
import transformers
from packaging.version import Version
assert Version(transformers.__version__) == Version('$low'), transformers.__version__
print('transformers', transformers.__version__, 'from', transformers.__file__)"
PYTHONPATH="$overlay" exec .venv/bin/python -m pytest -q tests/test_generate.py tests/test_generate_replay.py
