"""HTML reports: self-contained pages with sections, tables and plotly figures."""

import re
from html.parser import HTMLParser

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.model import HookedViT
from vitlens_patch.recipes import grayscale_study
from vitlens_patch.report import (
    Section,
    build_report,
    grayscale_study_section,
    plot_accuracy_by_class,
    plot_class_curves,
)

VOID_TAGS = {"meta", "br", "img", "hr", "input", "link"}


class TagChecker(HTMLParser):
    """Counts figures and checks that every opened tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.figures, self.sections = [], [], 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.figures += "plotly-graph-div" in (attrs.get("class") or "")
        self.sections += tag == "section"
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def check_html(page: str) -> TagChecker:
    checker = TagChecker()
    # script bodies (the 4.5 MB plotly library) are opaque to the tag structure and slow to parse
    checker.feed(re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", page, flags=re.S))
    checker.close()
    assert not checker.errors and not checker.stack
    return checker


@pytest.fixture(scope="module")
def studies():
    model = HookedViT.from_timm(tiny_timm_vit(depth=2))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    data = LabelledImages(images, torch.tensor([0, 1, 2, 0, 1, 2]), ("cat", "dog", "emu"))
    return [grayscale_study(model, data, window=window, progress=False) for window in (1, 2)]


def test_report_is_valid_self_contained_html():
    figures = [go.Figure(go.Scatter(x=[0, 1], y=[1, 2])), go.Figure(go.Bar(x=["a"], y=[3]))]
    sections = [
        Section("First <b>section</b>", "One paragraph with `code`.\n\nA second paragraph.", figures=figures[:1]),
        Section("Second", tables=[pd.DataFrame({"layer": [0, 1], "mean": [0.123456, 0.5]})], figures=figures[1:]),
    ]
    page = build_report(sections, title="A & B", intro="Intro text.")
    assert page.startswith("<!DOCTYPE html>")
    checker = check_html(page)
    assert checker.figures == 2 and checker.sections == 2
    assert page.count("plotly.js v") == 1  # the library is inlined once, not fetched
    assert "<script src=" not in page and 'src="http' not in page
    assert "<title>A &amp; B</title>" in page and "First &lt;b&gt;section&lt;/b&gt;" in page
    assert "<p>One paragraph with <code>code</code>.</p>\n<p>A second paragraph.</p>" in page
    assert "<td>0.1235</td>" in page and 'href="#section-1"' in page


@pytest.mark.usefixtures("without_type_checks")
def test_report_rejects_anything_but_sections():
    with pytest.raises(ValueError, match="sections must hold Section objects, got str"):
        build_report(["not a section"])


def test_grayscale_section_shows_curves_classes_and_accuracy(studies):
    section = grayscale_study_section(studies)
    assert [len(section.tables), len(section.figures)] == [2, 3]
    accuracy, means = section.tables
    assert accuracy["class"].tolist() == ["cat", "dog", "emu", "all"]
    assert list(means.columns) == ["layer", "mean effect (attn window 1)", "mean effect (attn window 2)"]
    torch.testing.assert_close(
        torch.tensor(means.iloc[:, 2].to_numpy()), studies[1].trace.mean().mean.double()
    )
    assert f"{studies[0].colour_accuracy:.1%} on colour images" in section.text
    check_html(build_report([section]))


def test_class_curves_have_one_panel_per_class(studies):
    figure = plot_class_curves(studies, ["w1", "w2"], columns=2)
    assert len(figure.data) == 2 * 3
    assert [note.text for note in figure.layout.annotations] == ["cat", "dog", "emu"]
    dog = studies[1].per_class().query("`class` == 'dog'")
    assert list(figure.data[4].y) == pytest.approx(dog["mean"].tolist())
    with pytest.raises(ValueError, match="labels must name each of the results"):
        plot_class_curves(studies, ["only one"])


def test_accuracy_bars_match_the_table(studies):
    figure = plot_accuracy_by_class(studies[0])
    table = studies[0].accuracy()
    assert list(figure.data[0].y) == pytest.approx(table["colour_accuracy"].tolist())
    assert list(figure.data[1].y) == pytest.approx(table["grayscale_accuracy"].tolist())
