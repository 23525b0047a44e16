"""The training wing: the loop (`fit`, liteclip.train.loop), the optimiser and its schedule, the weight average,
distillation from a teacher, the locked tower's feature cache, preemption and the run directory.

Nothing but the command line imports it (tests/test_architecture.py keeps that so); a script trains with
`from liteclip.train import fit`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "fit":  # imported on first use: `import liteclip.train.optim` stays light
        from liteclip.train.loop import fit

        return fit
    raise AttributeError(f"module 'liteclip.train' has no attribute {name!r}")
