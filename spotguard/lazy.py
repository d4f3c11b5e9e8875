"""Names a package exports but imports only when first used (PEP 562 ``__getattr__``).

The trainer hooks and the drill export classes that need torch; importing the package for its
light half (``spotguard ckpt`` needs only the store; ``spotguard agent`` only the drill's
options) must not load it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``where[name]`` (a module) when ``name`` is asked."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
