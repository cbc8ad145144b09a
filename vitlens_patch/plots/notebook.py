"""Figures that render in live Jupyter *and* in exported or statically rendered notebooks, offline.

Plotly's Jupyter default (the ``plotly_mimetype`` renderer) gives an output only a live front end
with plotly's extension draws: ``jupyter nbconvert --to html`` and static viewers show nothing
there. The ``"vitlens_offline"`` renderer registered here gives every figure two representations:

- ``application/vnd.plotly.v1+json``, which JupyterLab, Notebook 7 and VS Code draw as before;
- ``text/html``, which nbconvert's HTML export (and any viewer running the page's scripts) uses:
  a ``<div>`` and a script drawing the figure with plotly.js. plotly.js itself (about 4.8 MB) is
  inlined once per kernel session, in the first figure's HTML, so an exported notebook opens
  offline and grows by one copy of the library, not one per figure. A later figure draws as soon
  as plotly.js is on the page (immediately, or once the page has loaded when the copy comes
  after it); if the output holding the library was cleared, the figure says how to get it back.

Inside a Jupyter kernel, ``import vitlens_patch`` makes this renderer the default when plotly chose
its Jupyter default (``plotly_mimetype``) and ``PLOTLY_RENDERER`` is not set; choosing any other
renderer (``plotly.io.renderers.default = "notebook"``) afterwards wins. Outside a kernel nothing
changes.
"""

from __future__ import annotations

import os
import uuid

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer, PlotlyRenderer

RENDERER = "vitlens_offline"
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"

# The figure's script: draw now if plotly.js is on the page, else when the page has loaded (the
# library's copy may come later in an exported file); else say what is missing.
_DRAW = """<div id="{id}" class="plotly-graph-div vitlens-figure" style="height:{height}px; width:100%;"></div>
<script type="text/javascript">
(function () {{
  var figure = {figure};
  var draw = function () {{
    var element = document.getElementById("{id}");
    if (!element) return;
    if (!window.Plotly) {{
      element.textContent = "This figure needs plotly.js, which the first figure of the notebook "
        + "carries: re-run the notebook from the top (Restart & Run All) before exporting it.";
      return;
    }}
    window.Plotly.newPlot(element, figure.data, figure.layout, figure.config);
  }};
  if (window.Plotly) {{ draw(); }}
  else if (document.readyState === "complete") {{ draw(); }}
  else {{ window.addEventListener("load", draw); }}
}})();
</script>"""

# plotly.js as a plain global: a page with an AMD loader (require.js: nbconvert's template, classic
# Notebook) would otherwise register it as an anonymous module and leave window.Plotly undefined.
_LIBRARY = """<script type="text/javascript">window.PlotlyConfig = {{MathJaxConfig: "local"}};
window.__vitlensDefine = window.define; window.define = undefined;</script>
<script type="text/javascript">{plotlyjs}</script>
<script type="text/javascript">window.define = window.__vitlensDefine; delete window.__vitlensDefine;</script>"""


class OfflineNotebookRenderer(MimetypeRenderer):
    """The plotly mimetype plus an offline HTML fallback carrying plotly.js once per session.

    Args:
        config: plotly.js config of every figure (default: no plotly logo).
        default_height: figure height in pixels when its layout sets none.
    """

    def __init__(self, config: dict | None = None, default_height: int = 525):
        self.config = {"displaylogo": False} if config is None else dict(config)
        self.default_height = default_height
        # a dict, shared by the shallow copies plotly makes of a renderer for each figure
        self._session = {"library_sent": False}

    @property
    def library_sent(self) -> bool:
        """Whether a figure of this session already carried plotly.js."""
        return self._session["library_sent"]

    def to_mimebundle(self, fig_dict: dict) -> dict:
        bundle = PlotlyRenderer(config=self.config).to_mimebundle(dict(fig_dict))
        figure = bundle[PLOTLY_MIMETYPE]
        height = figure.get("layout", {}).get("height") or self.default_height
        script = _DRAW.format(
            id=f"vitlens-{uuid.uuid4().hex}", height=int(height),
            figure=pio.to_json(
                {"data": figure.get("data", []), "layout": figure.get("layout", {}),
                 "config": {"responsive": True, **figure.get("config", {})}},
                validate=False,
            ),
        )
        if not self._session["library_sent"]:
            from plotly.offline import get_plotlyjs

            script = _LIBRARY.format(plotlyjs=get_plotlyjs()) + "\n" + script
            self._session["library_sent"] = True
        return {PLOTLY_MIMETYPE: figure, "text/html": script}


def register_renderer() -> OfflineNotebookRenderer:
    """Register :class:`OfflineNotebookRenderer` as plotly renderer ``"vitlens_offline"`` (once)."""
    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = OfflineNotebookRenderer()
    return pio.renderers[RENDERER]


def use_offline_renderer(*, force: bool = False) -> bool:
    """Make ``"vitlens_offline"`` plotly's default renderer; return whether it now is.

    Without ``force``, only when plotly picked its Jupyter default (``plotly_mimetype``) and the
    user set no ``PLOTLY_RENDERER``: an explicit choice is kept.
    """
    register_renderer()
    if force or (pio.renderers.default == "plotly_mimetype" and not os.environ.get("PLOTLY_RENDERER")):
        pio.renderers.default = RENDERER
    return pio.renderers.default == RENDERER


def _in_jupyter_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def activate_in_notebooks() -> None:
    """Called by ``import vitlens_patch`` inside a Jupyter kernel: see the module docstring."""
    if _in_jupyter_kernel():
        use_offline_renderer()


__all__ = ["OfflineNotebookRenderer", "RENDERER", "activate_in_notebooks", "register_renderer", "use_offline_renderer"]

