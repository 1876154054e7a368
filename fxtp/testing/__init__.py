"""testing/: what fxtp's tests, `fxtp.verify` and the CLI share.

ranks.py (a function run on N gloo ranks, with a timeout), strategies.py (hypothesis strategies
of inputs), checks.py (equivalence and gradient checks, `fxtp.verify`), models.py and
families.py (tiny random configs of real architectures, never downloaded).
"""
