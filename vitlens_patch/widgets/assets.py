"""The explorer's front end: ``static/explorer.js`` and ``explorer.css`` (package data), plus
plotly.js from the installed plotly package (no CDN, works offline).

The same drawing code serves the widget (an ES module for anywidget, plotly.js evaluated inside it)
and the static export (a classic script after an inlined plotly.js).
"""

from __future__ import annotations

import functools
from pathlib import Path

STATIC = Path(__file__).with_name("static")
_EXPORT_LINE = "export default { render };"


@functools.cache
def plotly_js() -> str:
    """The plotly.min.js bundled with the plotly Python package (what ``plotly.offline`` inlines)."""
    import importlib.util

    origin = Path(importlib.util.find_spec("plotly").origin).parent
    return (origin / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


@functools.cache
def _explorer_js() -> str:
    source = (STATIC / "explorer.js").read_text(encoding="utf-8")
    if _EXPORT_LINE not in source:
        raise RuntimeError(f"static/explorer.js must end with {_EXPORT_LINE!r}")
    return source


def explorer_css() -> str:
    return (STATIC / "explorer.css").read_text(encoding="utf-8")


@functools.cache
def explorer_esm() -> str:
    """The widget's ES module: plotly.js (evaluated once per page, as a CommonJS module so it
    works with or without AMD loaders around) followed by the drawing code."""
    loader = (
        "const Plotly = globalThis.__vitlensPlotly || (globalThis.__vitlensPlotly = (() => {\n"
        "  const previous = globalThis.Plotly;\n"
        "  const module = { exports: {} };\n"
        "  (function (module, exports, define) {\n"
        f"{plotly_js()}\n"
        "  }).call(globalThis, module, module.exports, undefined);\n"
        "  if (previous === undefined) { delete globalThis.Plotly; } else { globalThis.Plotly = previous; }\n"
        "  return module.exports;\n"
        "})());\n"
    )
    return loader + _explorer_js()


def explorer_script() -> str:
    """The drawing code as a classic script (for the static export): it reads ``window.Plotly``
    and defines ``window.vitlensExplorer.renderStatic(element, data)``."""
    return "(function () {\nconst Plotly = window.Plotly;\n" + _explorer_js().replace(_EXPORT_LINE, "") + "\n})();\n"
