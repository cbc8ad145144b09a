"""The explorer in a real browser (system Chromium via Playwright, network blocked): the static
export (the demo report and the explorer page it links: tests/test_cli.py)."""

import json

import pytest

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
