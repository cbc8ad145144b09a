"""The tutorials run top to bottom, offline, on the embedded model (few images: VITLENS_FAST=1), and
their HTML export (nbconvert, as ``jupyter nbconvert --to html --execute``) shows every figure in
a real browser with the network blocked."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from vitlens_patch.plots.notebook import PLOTLY_MIMETYPE

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(path.name for path in TUTORIALS.glob("*.ipynb"))
# what nbconvert's own page template loads from a CDN (require.js, MathJax): not the figures'
# business, and harmless offline, so the browser check allows exactly these (the widget manager too:
# the template loads it for a notebook that stored widget state, as the explorer tutorial does)
WIDGET_MANAGER_URL = HTMLExporter().widget_renderer_url or "https://unpkg.com/@jupyter-widgets/html-manager@*/dist/embed-amd.js"
TEMPLATE_URLS = (HTMLExporter().require_js_url, HTMLExporter().mathjax_url, WIDGET_MANAGER_URL)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_tutorial_executes_and_its_html_export_renders_every_figure_offline(
    name, tmp_path, monkeypatch, browser_page
):
    monkeypatch.setenv("VITLENS_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "tutorials are stored without outputs"
    )
    # run from an empty folder: the notebook may only use what the package ships
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    figures = [
        output for cell in code_cells for output in cell.outputs if PLOTLY_MIMETYPE in output.get("data", {})
    ]
    assert figures, "the tutorial shows plotly figures"
    # every figure has the offline HTML fallback; plotly.js travels once, with the first figure
    assert all("text/html" in output["data"] for output in figures)
    carriers = [output for output in figures if "window.PlotlyConfig" in output["data"]["text/html"]]
    assert carriers == figures[:1]

    body, _ = HTMLExporter().from_notebook_node(notebook)
    page_file = tmp_path / f"{Path(name).stem}.html"
    page_file.write_text(body, encoding="utf-8")
    size_mb = page_file.stat().st_size / 1e6
    assert size_mb < 5 + 0.5 * len(figures), f"{size_mb:.1f} MB for {len(figures)} figures"

    browser_page.open_file(page_file, timeout=60)
    assert browser_page.wait_for_figures(len(figures), timeout=60) == len(figures)
    page = browser_page.page
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") == len(figures)
    drawn = page.evaluate(
        "Array.from(document.querySelectorAll('.js-plotly-plot')).map((el) => el.querySelectorAll('.main-svg').length)"
    )
    assert all(count >= 1 for count in drawn), drawn
    assert "needs plotly.js" not in page.inner_text("body")
    browser_page.screenshot(f"tutorial-{Path(name).stem}")
    assert not browser_page.page_errors, browser_page.page_errors
    assert set(browser_page.external_requests) <= set(TEMPLATE_URLS), browser_page.external_requests
    failed_loads = [text for text in browser_page.console_errors if "Failed to load resource" not in text]
    assert not failed_loads, failed_loads
