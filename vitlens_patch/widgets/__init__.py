"""Interactive views in Jupyter: the causal-tracing explorer (anywidget; the kernel computes,
JavaScript only draws) and its static, offline HTML export.

``explore`` and ``Explorer`` need the ``widget`` extra (anywidget); the session and the export do not.
"""

from __future__ import annotations

from vitlens_patch.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
