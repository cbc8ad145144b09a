"""The offline notebook renderer: plotly mimetype plus an HTML fallback carrying plotly.js once."""

import copy

import plotly.graph_objects as go
import plotly.io as pio

from vitlens_patch.plots.notebook import (
    PLOTLY_MIMETYPE,
    RENDERER,
    OfflineNotebookRenderer,
    register_renderer,
    use_offline_renderer,
)


def figure(title: str) -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[2, 0, 1]), layout_title_text=title)


def test_bundle_has_the_mimetype_and_html_with_plotlyjs_once_per_session():
    renderer = OfflineNotebookRenderer()
    first = renderer.to_mimebundle(figure("first").to_dict())
    # plotly hands each figure a shallow copy of the renderer: the session is shared
    second = copy.copy(renderer).to_mimebundle(figure("second </script>").to_dict())
    for bundle in (first, second):
        assert set(bundle) == {PLOTLY_MIMETYPE, "text/html"}
        assert bundle[PLOTLY_MIMETYPE]["data"][0]["type"] == "scatter"
    assert "window.PlotlyConfig" in first["text/html"] and len(first["text/html"]) > 1_000_000
    assert "window.PlotlyConfig" not in second["text/html"] and len(second["text/html"]) < 20_000
    assert "</script><b>" not in second["text/html"] and renderer.library_sent


def test_default_is_switched_only_from_plotlys_jupyter_default(monkeypatch):
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    previous = pio.renderers.default
    try:
        register_renderer()
        assert RENDERER in pio.renderers
        pio.renderers.default = "plotly_mimetype"
        assert use_offline_renderer() and pio.renderers.default == RENDERER
        pio.renderers.default = "notebook_connected"  # an explicit choice is kept
        assert not use_offline_renderer() and pio.renderers.default == "notebook_connected"
        monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")
        pio.renderers.default = "plotly_mimetype"
        assert not use_offline_renderer()
        assert use_offline_renderer(force=True)
    finally:
        pio.renderers.default = previous


def test_fallback_renders_offline_under_an_amd_loader_and_out_of_order(browser_page, tmp_path):
    """A page with require.js's ``define`` (nbconvert's template online, classic Notebook) and a
    figure placed before the one carrying plotly.js (cells re-run out of order) still draws both."""
    renderer = OfflineNotebookRenderer()
    carrier = renderer.to_mimebundle(figure("carries plotly.js").to_dict())["text/html"]
    later = renderer.to_mimebundle(figure("drawn later").to_dict())["text/html"]
    amd = "<script>window.define = function () {}; window.define.amd = {};</script>"
    (tmp_path / "page.html").write_text(f"<html><head>{amd}</head><body>{later}{carrier}</body></html>")
    browser_page.open_file(tmp_path / "page.html")
    assert browser_page.wait_for_figures(2) == 2
    assert browser_page.page.evaluate("typeof window.define.amd") == "object"  # the loader is back
    browser_page.assert_clean()


def test_fallback_without_plotlyjs_says_how_to_get_it(browser_page, tmp_path):
    renderer = OfflineNotebookRenderer()
    renderer.to_mimebundle(figure("the carrier, cleared").to_dict())
    orphan = renderer.to_mimebundle(figure("orphan").to_dict())["text/html"]
    (tmp_path / "orphan.html").write_text(f"<html><body>{orphan}</body></html>")
    browser_page.open_file(tmp_path / "orphan.html")
    browser_page.page.wait_for_selector("text=Restart & Run All")
    browser_page.assert_clean()
