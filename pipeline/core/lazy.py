"""Modules imported on first use: what a job's driver only needs if it does the work itself.

FAISS's GPU build maps about 190 MB of CUDA libraries into every process that imports it. A driver
that hands the searches to Ray tasks never touches FAISS, so the modules it imports take FAISS from
here: ``from pipeline.core.lazy import faiss`` binds a module object that loads the real one at its
first attribute access (:class:`importlib.util.LazyLoader`).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name``, loaded when one of its attributes is first read (the already imported module if any)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


faiss = lazy_import("faiss")
