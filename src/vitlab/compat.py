"""Make a CUDA build of torchvision importable beside a CPU build of torch.

The torchvision wheel on PyPI is compiled against CUDA torch. Beside a CPU-only torch its C++ extension does
not load, and ``import torchvision`` fails with ``operator torchvision::nms does not exist`` while it
registers fake kernels for its ops. Declaring the two op schemas it looks up lets the import finish; the
transforms and datasets vitlab uses never call those ops.

The shim only acts after a real import has failed with exactly that error, so on a matching torch/torchvision
pair (a user's CUDA machine) it changes nothing. Always import torchvision through ``import_torchvision()``.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_OP_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _declare_missing_ops() -> None:
    for qualname, schema in _OP_SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(qualname, "")
        except RuntimeError:
            torch.library.define(qualname, schema)


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring its missing op schemas first if its C++ extension cannot load."""
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _declare_missing_ops()
        import torchvision
    return torchvision
