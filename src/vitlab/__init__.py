"""vitlab: Vision Transformers on CIFAR, from download to ONNX Runtime.

The library knows nothing about DVC or the repository layout: functions take arrays, tensors, dataclasses and
paths. ``pipeline/`` and the ``vitlab`` CLI are thin callers of the same functions.
"""

import os

__version__ = "0.1.0"

# torch runs each operator on a team of OpenMP threads that meet at a barrier when it ends, and GNU OpenMP's
# default makes a thread that arrives first spin ~300,000 times before it sleeps. When another process shares
# a core, the thread there waits for its time slices while its sibling spins on the other core: training on
# 2 cores with one busy fell to a fifth of its speed (benchmarks/bench_under_load.py). PASSIVE makes waiting
# threads sleep at once, so the scheduler can run the late one on the freed core; results are unchanged (it
# decides only how threads wait). OpenMP reads this once, when torch loads it: vitlab must be imported first
# (every entry point does); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
