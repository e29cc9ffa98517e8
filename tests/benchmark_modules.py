"""Load a script under benchmarks/ or tools/ as a module (neither is a package: their scripts run by path)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path) -> ModuleType:
    if str(path.parent) not in sys.path:  # as when it runs: its folder's scripts import one another
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> ModuleType:
    return load_script(BENCHMARKS / f"{name}.py")
