"""inspection/: what the rewrite did, for people: `fxtp.explain`, `fxtp.diff` (explain.py) and
`fxtp.draw` (draw.py)."""
