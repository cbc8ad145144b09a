"""The explorer's front end: ``static/explorer.js`` and ``explorer.css`` (package data), plus
plotly.js from the installed plotly package (no CDN, works offline).

The same drawing code serves the widget (an ES module for anywidget; plotly.js is sent by the kernel
on the front end's request, as a binary buffer) and the static export (a classic script after an
inlined plotly.js).
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


def explorer_esm() -> str:
    """The widget's ES module (the drawing code; it asks the kernel for plotly.js, see
    :func:`plotly_js_bytes`)."""
    return _explorer_js()


@functools.cache
def plotly_js_bytes() -> bytes:
    """plotly.min.js as UTF-8 bytes: the widget's answer to the front end's "plotly.js" message,
    sent as a binary buffer (an ES module of that size does not load through anywidget's ``_esm``)."""
    return plotly_js().encode("utf-8")


def explorer_script() -> str:
    """The drawing code as a classic script (for the static export): it reads ``window.Plotly``
    and defines ``window.vitlensExplorer.renderStatic(element, data)``."""
    return "(function () {\n" + _explorer_js().replace(_EXPORT_LINE, "") + "\n})();\n"
