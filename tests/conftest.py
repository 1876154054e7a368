import os
import sys

# spawned ranks import tests.rank_workers; make the project root importable for them too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
