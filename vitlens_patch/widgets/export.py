"""The explorer as one self-contained HTML file: the same linked views, precomputed, offline.

Every layer and every patch of each exported image is computed exactly beforehand (the layer curve,
the full ``trace_grid`` and the CAAP map; a patch's per-layer effect and CAAP value are read from
them), so the page needs no kernel: the layer slider, clicking a patch and switching among the
exported images run in a few lines of JavaScript. plotly.js is inlined (about 4.8 MB); nothing is
fetched from the network. Needs no anywidget.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from vitlens_patch.widgets.assets import explorer_css, explorer_script, plotly_js
from vitlens_patch.widgets.session import ExplorerSession, ExplorerSettings


def explorer_html(
    session: ExplorerSession, settings: ExplorerSettings, *, images: Sequence[int] | None = None,
    patch: int | None = None, layer: int | None = None, title: str = "vitlens_patch explorer", progress: bool = False,
) -> str:
    """The HTML page of the static explorer.

    Args:
        session: the model and images (results already cached are reused).
        settings: corruption, kind, window, score, target and CAAP range of every exported view.
        images: indices of the images to export (default ``settings.image``); the page switches
            among them.
        patch: the patch selected when the page opens (None: none).
        layer: the patch grid's layer when the page opens (default the middle layer).
        title: page title.
        progress: a progress bar over the images.

    Returns:
        The HTML document.
    """
    settings = session.check(settings)
    indices = [settings.image] if images is None else [int(i) for i in images]
    if not indices:
        raise ValueError("images must hold at least one image index, got none")
    patch = session.check_patch(patch)
    n_layers = session.model.cfg.n_layers
    layer = n_layers // 2 if layer is None else int(layer)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer must be in [0, {n_layers - 1}], got {layer}")
    views = {}
    for index in tqdm(indices, desc="explorer export", disable=not progress):
        image_settings = session.check(replace(settings, image=index))
        session.compute_all(image_settings, estimates=False)  # layers, exact grid and CAAP: every patch follows
        views[str(index)] = session.view(image_settings, patch)
    start, stop = session.caap_layers(settings)
    data = {
        "options": session.options(),
        "thumbnails": session.thumbnails(),
        "views": views,
        "state": {
            "image": indices[0] if settings.image not in indices else settings.image,
            "corruption": settings.corruption, "kind": settings.kind, "window": settings.window,
            "score": settings.score, "target": -1 if settings.target is None else settings.target,
            "layer": layer, "selected_patch": -1 if patch is None else patch,
            "caap_start": start, "caap_stop": stop, "request": 0,
        },
    }
    payload = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    intro = (
        "Causal tracing of the embedded views, precomputed exactly for every layer and patch. Pick an image "
        "in the strip, move the layer slider, click a patch in the grid or the CAAP map to see its effect "
        "per layer and its CAAP value; hover for values. Controls other than the layer are fixed to the "
        "exported settings (re-export from the widget for others)."
    )
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>body {{ margin: 1.5em; }} {explorer_css()}</style></head><body>",
        f"<h2 style=\"font-family: system-ui, sans-serif\">{html.escape(title)}</h2>",
        f"<p style=\"font-family: system-ui, sans-serif; max-width: 1100px\">{html.escape(intro)}</p>",
        '<div id="vitlens-explorer"></div>',
        f"<script>{plotly_js()}</script>",
        f"<script>{explorer_script()}</script>",
        f"<script>window.vitlensExplorer.renderStatic(document.getElementById('vitlens-explorer'), {payload});</script>",
        "</body></html>",
    ])


def write_explorer_html(
    session: ExplorerSession, settings: ExplorerSettings, path: str | Path, **options,
) -> Path:
    """Write :func:`explorer_html` to ``path`` (folders created); returns the resolved path."""
    path = Path(path)
    text = explorer_html(session, settings, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.resolve()
