"""Interactive views in Jupyter: the causal-tracing explorer (anywidget; the kernel computes,
JavaScript only draws) and its static, offline HTML export.

``explore`` and ``Explorer`` need the ``widget`` extra (anywidget); the session and the export do not.
"""

from __future__ import annotations

from vitlens_patch.lazy import lazy_exports

_PUBLIC = {  # module -> the public names it defines
    "vitlens_patch.widgets.explorer": ("explore", "Explorer"),
    "vitlens_patch.widgets.session": ("ExplorerSession", "ExplorerSettings", "ExplorerResult"),
    "vitlens_patch.widgets.export": ("explorer_html", "write_explorer_html"),
}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
__all__ = __dir__()
