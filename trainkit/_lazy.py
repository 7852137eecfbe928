"""Lazy re-exports for package ``__init__`` modules.

Subpackages re-export names whose modules import torch; resolving them on first use
keeps ``import trainkit`` and ``trainkit --help`` light. One helper, so every package
resolves, caches and reports a missing name the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str],
                 namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``where[name]`` (a module path) on first use.

    The resolved value is cached in ``namespace`` (the package's ``globals()``), so later
    lookups do not come back here.
    """

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
