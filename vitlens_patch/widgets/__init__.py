"""Interactive views in Jupyter: the causal-tracing explorer (anywidget; the kernel computes,
JavaScript only draws) and its static, offline HTML export.

``explore`` and ``Explorer`` need the ``widget`` extra (anywidget); the session and the export do not.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "explore": "vitlens_patch.widgets.explorer",
    "Explorer": "vitlens_patch.widgets.explorer",
    "ExplorerSession": "vitlens_patch.widgets.session",
    "ExplorerSettings": "vitlens_patch.widgets.session",
    "ExplorerResult": "vitlens_patch.widgets.session",
    "explorer_html": "vitlens_patch.widgets.export",
    "write_explorer_html": "vitlens_patch.widgets.export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vitlens_patch.widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
