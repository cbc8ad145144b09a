"""The explorer in a real browser (system Chromium via Playwright, network blocked): the static
export (the demo report and the explorer page it links: tests/test_cli.py) and the live widget in
JupyterLab on the embedded model."""

import json

import nbformat
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.browser import jupyter_lab
from vitlens_patch.widgets import explore

EXPLORER = ".vitlens-explorer"
MAP_CELL = """([view, patch]) => {
    const gd = document.querySelector(`.vitlens-explorer [data-view=${view}]`);
    const layout = gd._fullLayout, gridW = layout.xaxis.range[1] + 0.5 | 0;
    const box = gd.getBoundingClientRect();
    return {x: box.left + layout.xaxis._offset + layout.xaxis.l2p(patch % gridW),
            y: box.top + layout.yaxis._offset + layout.yaxis.l2p(Math.floor(patch / gridW))};
}"""
HEATMAP_DRAWN = """(view) => {
    const gd = document.querySelector(`.vitlens-explorer [data-view=${view}]`);
    return !!gd && !!gd._fullData && gd._fullData.some((trace) => trace.type === 'heatmap')
        && !!gd.querySelector('.hm image, .heatmaplayer image');
}"""
PATCH_CURVE = "() => Array.from(document.querySelector('.vitlens-explorer [data-view=patch]').data[0].y)"


def click_patch(page, view: str, patch: int) -> None:
    """A real mouse click on ``patch``'s cell of the ``view`` map (plotly's own click handling)."""
    point = page.evaluate(MAP_CELL, [view, patch])
    page.mouse.click(point["x"], point["y"])


def test_static_export_renders_offline_and_links_its_views(browser_page, tmp_path, tiny_model, tiny_images):
    widget = explore(tiny_model, tiny_images, window=1)
    path = widget.to_html(tmp_path / "explorer.html", images="all")
    text = path.read_text()
    assert "plotly.js v" in text and "<script src=" not in text
    page = browser_page.open_file(path)
    assert browser_page.wait_for_figures(3, selector=f"{EXPLORER} .js-plotly-plot") == 3
    page.wait_for_function(HEATMAP_DRAWN, arg="grid", timeout=30_000)
    click_patch(page, "grid", 6)
    page.wait_for_function(
        "() => document.querySelector('.vitlens-explorer [data-view=patch]').getAttribute('data-patch') === '6'"
    )
    assert browser_page.wait_for_figures(4, selector=f"{EXPLORER} .js-plotly-plot") == 4
    # the patch curve is the exported grid's column of patch 6 (token 7)
    grid = widget.result.grid
    assert page.evaluate(PATCH_CURVE) == pytest.approx(grid.effects[0, :, 7].tolist(), abs=1e-6)
    # the layer slider and the image strip switch views without a kernel
    page.locator(f"{EXPLORER} [data-control=layer]").fill("0")
    page.wait_for_function("() => document.querySelector('.vitlens-explorer [data-view=grid]').getAttribute('data-layer') === '0'")
    page.click(f"{EXPLORER} [data-image='2']")
    page.wait_for_function("() => document.querySelector('.vitlens-explorer .vitlens-settings').textContent.startsWith('image 2')")
    browser_page.screenshot("explorer-static")
    browser_page.assert_clean()
    data = json.loads(text.split("renderStatic(document.getElementById('vitlens-explorer'), ")[1].split(");</script>")[0])
    assert sorted(data["views"]) == ["0", "1", "2"] and all(view["pending"] == [] for view in data["views"].values())


# the notebook of the live test: the embedded model on three sample images, the widget displayed
LIVE_CELL = """\
import vitlens_patch as vp

model = vp.cifar10_vit()
sample = vp.pretrained.sample_images(n_per_class=1)
widget = vp.explore(model, sample.images[:3], sample.labels[:3], window=3)
widget"""
PATCH_VIEW = "() => document.querySelector('.vitlens-explorer [data-view=patch]').getAttribute('data-patch')"


def test_live_explorer_in_jupyterlab(browser_page, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LIVE_CELL)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "explorer.ipynb")
    with jupyter_lab(root, tmp_path / "home") as server:
        page = server.run_notebook(browser_page, "explorer.ipynb")
        try:
            page.wait_for_selector(EXPLORER, timeout=60_000)
        except PlaywrightTimeout:
            shot = browser_page.screenshot("explorer-live-jupyterlab-timeout")
            output = page.evaluate("() => Array.from(document.querySelectorAll('.jp-OutputArea-output'), (o) => o.innerText)")
            pytest.fail(f"no explorer within 60 s; cell output {output}, console errors {browser_page.console_errors}, "
                        f"screenshot {shot}, server log {tmp_path / 'home' / 'server.log'}")
        assert browser_page.wait_for_figures(3, selector=f"{EXPLORER} .js-plotly-plot", timeout=60_000) >= 3
        page.wait_for_function(HEATMAP_DRAWN, arg="grid", timeout=60_000)
        assert page.evaluate(PATCH_VIEW) == ""
        request = int(page.get_attribute(EXPLORER, "data-request"))
        page.locator(f"{EXPLORER} [data-view=grid]").scroll_into_view_if_needed()
        click_patch(page, "grid", 6)
        # the patch view shows patch 6's curve over every layer, and the kernel answered the click
        # with a new request's view (data-request: the kernel's request number of the drawn view)
        page.wait_for_function(f"() => ({PATCH_VIEW})() === '6'", timeout=30_000)
        page.wait_for_function(
            f"() => Number(document.querySelector('{EXPLORER}').getAttribute('data-request')) > {request}", timeout=30_000
        )
        n_layers = page.evaluate("() => document.querySelector('.vitlens-explorer [data-view=curve]').data[0].x.length")
        curve = page.evaluate(PATCH_CURVE)
        assert len(curve) == n_layers and all(isinstance(value, float) for value in curve)
        assert browser_page.wait_for_figures(4, selector=f"{EXPLORER} .js-plotly-plot") == 4
        browser_page.screenshot("explorer-live-jupyterlab")
        # JupyterLab's own first session (see JupyterServer.start_kernel) is dropped for the
        # running one; disposing its kernel connection cancels that connection's pending subshell
        # probe, an unhandled rejection of JupyterLab's, not of the explorer
        browser_page.assert_clean(ignore_page=[r"^Error: Canceled future for create_subshell_request message before replies were done$"])
