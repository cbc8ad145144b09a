"""The real-browser helper (tests/browser.py) itself: it sees figures, errors and CDN requests."""

import plotly.graph_objects as go
import pytest

from tests.browser import serve_directory
from vitlens_patch.report import Section, build_report


def test_offline_report_renders_its_figures(browser_page, tmp_path):
    figures = [go.Figure(go.Scatter(x=[0, 1], y=[1, 2])), go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))]
    (tmp_path / "report.html").write_text(build_report([Section("Figures", figures=figures)]))
    browser_page.open_file(tmp_path / "report.html")
    assert browser_page.wait_for_figures(2) == 2
    assert browser_page.screenshot("browser-helper-report").stat().st_size > 1000
    browser_page.assert_clean()


def test_errors_and_external_requests_are_caught(browser_page, tmp_path):
    (tmp_path / "index.html").write_text(
        "<html><body><script src='https://cdn.example.com/lib.js'></script>"
        "<script>console.error('logged error'); undefinedFunction();</script></body></html>"
    )
    with serve_directory(tmp_path) as url:
        browser_page.goto(url + "index.html")
    assert browser_page.external_requests == ["https://cdn.example.com/lib.js"]
    assert any("logged error" in text for text in browser_page.console_errors)
    assert any("undefinedFunction" in text for text in browser_page.page_errors)
    with pytest.raises(AssertionError, match="page errors"):
        browser_page.assert_clean()


def test_missing_figures_fail_with_the_page_errors(browser_page, tmp_path):
    (tmp_path / "empty.html").write_text("<html><body><div class='js-plotly-plot'></div></body></html>")
    browser_page.open_file(tmp_path / "empty.html")
    with pytest.raises(pytest.fail.Exception, match="0 of 1 plotly figures"):
        browser_page.wait_for_figures(1, timeout=0.5)

