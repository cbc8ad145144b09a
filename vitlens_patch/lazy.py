"""Lazy public names for a package ``__init__``: a name's module is imported on first access.

Below every layer and importing only :mod:`importlib`, so the root package, ``plots`` and
``widgets`` use it without loading torch on import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]], submodules: Mapping[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__`` (named in the AttributeError).
        exports: module -> the public names it defines (``getattr(module, name)`` on access).
        submodules: public name -> a module returned whole on access.

    Returns:
        ``(__getattr__, __dir__)``; ``__dir__()`` lists the exported names and ``submodules``,
        sorted (the package's ``__all__``).
    """
    names = {name: module for module, module_names in exports.items() for name in module_names}
    submodules = dict(submodules or {})
    public = sorted([*names, *submodules])

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if name in submodules:
            return importlib.import_module(submodules[name])
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return list(public)

    return __getattr__, __dir__
