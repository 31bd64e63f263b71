"""Import a script of bench/ as a module (bench/ is not a package), for tests of its functions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as module `<name>_bench` (registered in sys.modules, so its pickled objects resolve)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"{name}_bench", mod)
    spec.loader.exec_module(mod)
    return mod
