"""Self-contained HTML reports: titled sections of short explanations, tables and plotly figures.

    sections = [Section("Layer curve", "What restoring each window does.", figures=[figure])]
    Path("report.html").write_text(build_report(sections, title="My study"))

The plotly library is inlined once, at the first figure, so the file opens offline in any browser.
:func:`grayscale_study_section` turns grayscale-study results into a ready-made section.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS
from plotly.subplots import make_subplots

from vitlens_patch.plots.tracing import plot_layer_curve
from vitlens_patch.recipes.grayscale_study import GrayscaleStudyResult

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: 0.3em; }
h2 { margin-top: 2.2em; border-bottom: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 0.3em; border-radius: 3px; }
table.report { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
table.report th, table.report td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
table.report th { background: #f6f6f6; }
nav li { margin: 0.1em 0; }
.figure { margin: 1em 0; }
"""


@dataclass(frozen=True)
class Section:
    """One titled part of a report.

    Attributes:
        title: the section heading.
        text: a short explanation in plain text (escaped); blank lines separate paragraphs and
            text between backquotes is shown as code.
        tables: data frames shown as HTML tables (floats with 4 significant digits), after the text.
        figures: plotly figures, after the tables.
        links: (text, address) pairs shown as a list of links after the text (e.g. a companion
            page written beside the report).
    """

    title: str
    text: str = ""
    tables: Sequence[pd.DataFrame] = field(default_factory=tuple)
    figures: Sequence[go.Figure] = field(default_factory=tuple)
    links: Sequence[tuple[str, str]] = field(default_factory=tuple)


def _paragraphs(text: str) -> str:
    """Plain text -> escaped ``<p>`` paragraphs; `code` spans between backquotes."""
    blocks = [block.strip() for block in text.strip().split("\n\n") if block.strip()]
    rendered = []
    for block in blocks:
        parts = html.escape(" ".join(block.split())).split("`")
        # odd-numbered parts sat between backquotes
        rendered.append("<p>" + "".join(
            f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts)
        ) + "</p>")
    return "\n".join(rendered)


def build_report(sections: Sequence[Section], *, title: str = "vitlens_patch report", intro: str = "") -> str:
    """A complete, self-contained HTML page: title, intro, table of contents, then each section.

    Args:
        sections: the report's sections, in order.
        title: page title and top heading.
        intro: plain-text introduction under the title (formatted as :attr:`Section.text`).

    Returns:
        The HTML document as a string; the plotly library is inlined once (about 4.5 MB), so the
        page needs no network.
    """
    sections = list(sections)
    for section in sections:
        if not isinstance(section, Section):
            raise ValueError(f"sections must hold Section objects, got {type(section).__name__}")
    body = [f"<h1>{html.escape(title)}</h1>", _paragraphs(intro)]
    if len(sections) > 1:
        links = "".join(
            f'<li><a href="#section-{i}">{html.escape(section.title)}</a></li>'
            for i, section in enumerate(sections)
        )
        body.append(f"<nav><ul>{links}</ul></nav>")
    plotly_inlined = False
    for i, section in enumerate(sections):
        body.append(f'<section id="section-{i}"><h2>{html.escape(section.title)}</h2>')
        body.append(_paragraphs(section.text))
        if section.links:
            body.append("<ul>" + "".join(
                f'<li><a href="{html.escape(address)}">{html.escape(text)}</a></li>' for text, address in section.links
            ) + "</ul>")
        for table in section.tables:
            body.append(table.to_html(index=False, classes="report", border=0, float_format="{:.4g}".format))
        for figure in section.figures:
            body.append('<div class="figure">' + figure.to_html(
                full_html=False, include_plotlyjs=not plotly_inlined, default_height="480px",
                config={"displaylogo": False},
            ) + "</div>")
            plotly_inlined = True
        body.append("</section>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        *body,
        "</body></html>",
    ])


def plot_accuracy_by_class(
    result: GrayscaleStudyResult, *, title: str = "Accuracy on colour vs grayscale images (95% Wilson CI)"
) -> go.Figure:
    """Grouped bars: accuracy on colour and on grayscale images, per class and overall, with the
    Wilson intervals of :meth:`GrayscaleStudyResult.accuracy` as error bars."""
    table = result.accuracy()
    bars = []
    for kind in ("colour", "grayscale"):
        accuracy, lower, upper = (table[f"{kind}_{column}"] for column in ("accuracy", "lower", "upper"))
        bars.append(go.Bar(
            x=table["class"], y=accuracy, name=kind,
            error_y={"type": "data", "symmetric": False, "array": upper - accuracy, "arrayminus": accuracy - lower},
            customdata=table[["n_images", f"{kind}_lower", f"{kind}_upper"]].to_numpy(),
            hovertemplate=(
                "%{x}: %{y:.1%} of %{customdata[0]} images<br>95% CI [%{customdata[1]:.1%}, "
                f"%{{customdata[2]:.1%}}]<extra>{kind}</extra>"
            ),
        ))
    figure = go.Figure(bars)
    figure.update_layout(
        title=title, barmode="group", yaxis_title="accuracy", yaxis_tickformat=".0%",
        yaxis_range=[0, 1], template="plotly_white",
    )
    return figure


def plot_class_curves(
    results: Sequence[GrayscaleStudyResult],
    labels: Sequence[str],
    *,
    columns: int = 5,
    title: str = "Mean indirect effect by layer, per class",
) -> go.Figure:
    """Small multiples, one panel per class: each result's mean effect per layer (as in
    :func:`~vitlens_patch.plots.tracing.plot_layer_curve`, without bands, to stay readable)."""
    results = list(results)
    if not results or len(labels) != len(results):
        raise ValueError(
            f"labels must name each of the results (at least one), got {len(labels)} labels for "
            f"{len(results)} results"
        )
    classes = sorted(set(results[0].labels.tolist()))
    n_rows = -(-len(classes) // columns)
    figure = make_subplots(
        rows=n_rows, cols=min(columns, len(classes)), shared_yaxes=True,
        subplot_titles=[results[0].class_name(label) for label in classes],
        horizontal_spacing=0.03, vertical_spacing=0.12,
    )
    for index, (result, label) in enumerate(zip(results, labels)):
        table = result.per_class()
        colour = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
        for panel, class_label in enumerate(classes):
            rows = table[table["label"] == class_label]
            row, col = divmod(panel, columns)
            figure.add_trace(go.Scatter(
                x=rows["layer"], y=rows["mean"], mode="lines+markers", name=label, legendgroup=label,
                showlegend=panel == 0, line={"color": colour}, marker={"size": 4},
                customdata=rows[["lower", "upper", "n_images"]].to_numpy(),
                hovertemplate=(
                    "layer %{x}<br>effect %{y:.4g}<br>95% CI [%{customdata[0]:.4g}, "
                    f"%{{customdata[1]:.4g}}]<br>images %{{customdata[2]}}<extra>{label}</extra>"
                ),
            ), row=row + 1, col=col + 1)
    figure.update_layout(title=title, template="plotly_white", height=260 * n_rows + 120)
    return figure


def grayscale_study_section(
    results: Sequence[GrayscaleStudyResult],
    labels: Sequence[str] | None = None,
    *,
    title: str = "Grayscale study",
    text: str | None = None,
) -> Section:
    """A report section for one or several grayscale studies of the same images (e.g. windows 3
    and 1): per-layer curves with 95% confidence bands, per-class curves, the accuracy table and
    bars (from the first result), and the per-layer means.

    Args:
        results: GrayscaleStudyResults on the same images.
        labels: legend name per result; default ``"<kind> window <w>"``.
        text: the explanation; default a description of the study and its numbers.
    """
    results = list(results)
    if not results:
        raise ValueError("results must hold at least one GrayscaleStudyResult, got none")
    if labels is None:
        labels = [f"{r.settings['kind']} window {r.settings['window']}" for r in results]
    first = results[0]
    if text is None:
        text = (
            f"Each of the {first.n_images} images is run in colour (clean) and in grayscale "
            "(corrupted). For every centre layer, the clean sub-layer outputs of a window of layers "
            "around it are restored into the grayscale run; the indirect effect is the rise in the "
            "softmax probability of the true class. Curves are means over images with 95% "
            "Student-t confidence bands; accuracies have 95% Wilson intervals. Accuracy: "
            f"{first.colour_accuracy:.1%} on colour images, "
            f"{first.grayscale_accuracy:.1%} on grayscale images."
        )
    means = pd.concat(
        [r.layer_means().assign(study=label) for r, label in zip(results, labels)], ignore_index=True
    )
    wide = means.pivot(index="layer", columns="study", values="mean")[list(labels)].reset_index()
    wide.columns = ["layer", *[f"mean effect ({label})" for label in labels]]
    return Section(
        title=title,
        text=text,
        tables=[first.accuracy(), wide],
        figures=[
            plot_layer_curve([r.trace for r in results], labels=list(labels),
                             title="Mean indirect effect by layer (95% CI)"),
            plot_class_curves(results, labels),
            plot_accuracy_by_class(first),
        ],
    )
