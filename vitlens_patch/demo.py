"""The offline demo report: the embedded CIFAR-10 ViT and sample images, traced, studied and explained.

``vitlens-patch demo`` (:mod:`vitlens_patch.cli`) calls :func:`run_demo`; :func:`demo_sections` gives
the sections for a report of one's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.attribution import attribute_all
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.evaluation import EvaluationSet, evaluate
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_grayscale
from vitlens_patch.patching.tracing import trace_grid, trace_layers
from vitlens_patch.plots.attribution import plot_attribution_grid, plot_method_comparison
from vitlens_patch.plots.tracing import plot_layer_curve, plot_patch_grid, plot_position_heatmap
from vitlens_patch.pretrained import cifar10_vit, load_metadata, sample_images
from vitlens_patch.recipes.grayscale_study import grayscale_study
from vitlens_patch.report import Section, build_report, grayscale_study_section
from vitlens_patch.widgets.export import write_explorer_html
from vitlens_patch.widgets.session import ExplorerSession, ExplorerSettings

DEMO_REPORT = "vitlens_patch_demo.html"
DEMO_METHODS = ("caap", "rollout", "chefer", "gradcam", "occlusion", "random")

# (model, sample images) -> extra report sections, appended after the built-in demo sections.
SectionBuilder = Callable[[HookedViT, LabelledImages], Sequence[Section]]


def _image_grid(
    pixels: Float[Tensor, "batch channel height width"], titles: Sequence[str], *, columns: int, title: str
) -> go.Figure:
    """Images [batch, channel, height, width] in [0, 1] as a grid of titled panels."""
    rgb = rearrange(pixels.clamp(0, 1).cpu() * 255, "image channel height width -> image height width channel")
    figure = px.imshow(rgb.round().byte().numpy(), facet_col=0, facet_col_wrap=columns)
    # facet titles read "facet_col=<i>"
    figure.for_each_annotation(lambda note: note.update(text=titles[int(note.text.split("=")[1])], font_size=11))
    figure.update_xaxes(showticklabels=False)
    figure.update_yaxes(showticklabels=False)
    n_rows = -(-len(pixels) // columns)
    figure.update_layout(title=title, template="plotly_white", height=180 * n_rows + 100)
    return figure


def _model_card(model: HookedViT, sample: LabelledImages, metadata: dict) -> Section:
    cfg, data_config = model.cfg, model.data_config
    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    card = pd.DataFrame({
        "property": [
            "architecture", "layers", "d_model", "heads x d_head", "d_mlp", "input size", "patch size",
            "tokens", "parameters", "classes", "preprocessing",
        ],
        "value": [
            f"timm {metadata.get('timm_class', 'VisionTransformer')}", cfg.n_layers, cfg.d_model,
            f"{cfg.n_heads} x {cfg.d_head}", cfg.d_mlp, "x".join(map(str, cfg.img_size)),
            "x".join(map(str, cfg.patch_size)),
            f"{cfg.n_pos} (class token + {cfg.grid_size[0]}x{cfg.grid_size[1]} patches)",
            f"{n_parameters:,}", ", ".join(model.class_names or ()),
            f"resize ({data_config.interpolation}) to {data_config.input_size[1]}x"
            f"{data_config.input_size[2]}, mean {data_config.mean}, std {data_config.std}",
        ],
    })
    card["value"] = card["value"].astype(str)
    accuracy = metadata.get("accuracy")
    if accuracy:
        accuracy_text = (
            f"Test accuracy ({accuracy['n_images']} CIFAR-10 test images): {accuracy['full_frame']:.1%} "
            f"full frame, {accuracy['canvas']:.1%} on canvases, {accuracy['grayscale']:.1%} in grayscale."
        )
    else:
        accuracy_text = (
            "Test accuracy is not recorded with these weights: measure it with "
            "`python -m vitlens_patch.pretrained.evaluate_accuracy --data ../shared/data/cifar10/test.tar.gz`."
        )
    with torch.no_grad():
        predictions = model(model.preprocess(sample.images)).argmax(-1)
    firsts = [int(torch.nonzero(sample.labels == label)[0]) for label in sample.labels.unique().tolist()]
    names = model.class_names or sample.class_names
    titles = [f"{names[sample.labels[i]]} -> {names[predictions[i]]}" for i in firsts]
    pixels = model.data_config.to_pixels(sample.images[firsts])
    return Section(
        title="The embedded model",
        text=(
            "A plain timm Vision Transformer trained on CIFAR-10 (full-frame images and images pasted "
            "on noise canvases), converted to a HookedViT whose every activation is a TransformerLens "
            f"hook point. It ships inside the package with {len(sample)} CIFAR-10 test images "
            f"({len(sample) // len(sample.class_names)} per class), so this report is computed offline."
            f"\n\n{accuracy_text} Sample model accuracy on the embedded images: "
            f"{(predictions == sample.labels).double().mean().item():.0%}."
        ),
        tables=[card],
        figures=[_image_grid(pixels, titles, columns=5, title="One sample image per class: true -> predicted")],
    )


def _traced_image(model: HookedViT, images: Tensor, labels: Tensor) -> tuple[int, Tensor, Tensor]:
    """The image whose true class suffers most from losing colour, among those right in colour:
    (its index, true-class probability per image in colour, in grayscale)."""
    grayscale = corrupt_grayscale(images, model.data_config)
    with torch.no_grad():
        colour_prob = model(images).softmax(-1).gather(1, labels[:, None])[:, 0]
        gray_prob = model(grayscale).softmax(-1).gather(1, labels[:, None])[:, 0]
    drop = torch.where(colour_prob > 0.5, colour_prob - gray_prob, -torch.inf)
    if not torch.isfinite(drop).any():
        drop = colour_prob - gray_prob
    return int(drop.argmax()), colour_prob, gray_prob


def _single_image_trace(model: HookedViT, sample: LabelledImages, progress: bool) -> Section:
    images = model.preprocess(sample.images)
    grayscale = corrupt_grayscale(images, model.data_config)
    labels = sample.labels.to(model.device)
    index, colour_prob, gray_prob = _traced_image(model, images, labels)
    clean, corrupted, target = images[index : index + 1], grayscale[index : index + 1], labels[index : index + 1]
    names = model.class_names or sample.class_names
    traces = [
        trace_layers(model, clean, corrupted, kind="attn", window=window, target=target, progress=progress)
        for window in (3, 1)
    ]
    grid = trace_grid(model, clean, corrupted, target=target, progress=progress)
    pixels = model.data_config.denormalize(torch.cat([clean, corrupted])).clamp(0, 1).cpu()
    label = names[int(target)]
    return Section(
        title=f"Causal trace of one image (true class: {label})",
        text=(
            f"Clean run: the colour image (probability of '{label}' {colour_prob[index]:.1%}). Corrupted "
            f"run: the same image in grayscale ({gray_prob[index]:.1%}). Causal tracing restores clean "
            "activations into the corrupted run, one site at a time, and measures how much of the "
            "true-class probability comes back (the indirect effect).\n\n"
            "First, the attention outputs of a window of 3 layers around each layer, and of single "
            "layers (window 1). Then ROME's heatmap: the residual stream entering each layer, restored "
            f"at one token at a time (the class token, then the {model.cfg.n_patches} patches), also drawn "
            "over the image."
        ),
        figures=[
            _image_grid(pixels, [f"colour: p({label}) = {colour_prob[index]:.2f}",
                                 f"grayscale: p({label}) = {gray_prob[index]:.2f}"],
                        columns=2, title="Clean and corrupted input"),
            plot_layer_curve(traces, labels=["attn window 3", "attn window 1"], ci=False,
                             title="Restoring attention outputs, by layer (one image)"),
            plot_position_heatmap(grid, title="Restoring the residual stream at one token (one image)"),
            plot_patch_grid(grid, pixels[0], title="The same effects on the patch grid"),
        ],
    )


def _attribution_section(model: HookedViT, sample: LabelledImages, progress: bool) -> Section:
    n_classes = len(sample.class_names)
    data = EvaluationSet.from_cifar10(model, sample, n=min(2, len(sample) // n_classes) * n_classes, seed=0)
    shown = list(range(0, len(data), 4))
    maps = attribute_all(
        model, data.images[shown], list(DEMO_METHODS), target=data.labels[shown], progress=progress
    )
    result = evaluate(list(DEMO_METHODS), model, data, progress=progress)
    return Section(
        title="Which patches carry the class evidence: CAAP and the baselines",
        text=(
            "CAAP (Causal Attribution via Activation Patching): for each patch, the image's residual "
            "stream at that patch's token is inserted into a blurred copy of the image at every block "
            f"of the middle half of the network (blocks {model.cfg.n_layers // 4} to "
            f"{model.cfg.n_layers - model.cfg.n_layers // 4 - 1}); the rise of the true-class logit is "
            "the patch's attribution. Beside it: attention rollout, Chefer et al.'s gradient-weighted "
            "attention, Grad-CAM, patch occlusion and a random map. Red = evidence for the class.\n\n"
            f"Then a small evaluation on {len(data)} embedded images (deletion and insertion AUC on "
            "full-frame images; localization AUPR and the pointing game on the same images pasted "
            "on a noise canvas). With so few images the intervals are wide: "
            "`vitlens-patch evaluate --data ../shared/data/cifar10/test.tar.gz --n 500` runs the "
            f"full comparison.\n\n{result.interval_note()}"
        ),
        tables=[result.summary_table()],
        figures=[
            plot_attribution_grid(data.pixels(shown), maps, labels=data.labels[shown],
                                  class_names=model.class_names, title="Attribution maps (true class)"),
            plot_method_comparison(result.table()),
        ],
    )


def explorer_section(model: HookedViT, sample: LabelledImages, path: Path, *, progress: bool = True) -> Section:
    """Write the static explorer (:func:`~vitlens_patch.widgets.export.write_explorer_html`) of the
    traced image to ``path`` and return a section linking to it (by file name: keep them together)."""
    session = ExplorerSession(model, sample)
    index, _, _ = _traced_image(model, session.images, session.labels.to(model.device))
    settings = ExplorerSettings(image=index, corruption="grayscale", kind="attn", window=3, target=int(sample.labels[index]))
    write_explorer_html(session, settings, path, title="vitlens_patch explorer: the traced image", progress=progress)
    return Section(
        title="Explore the trace interactively",
        text=(
            "The causal trace above as linked views in one offline page: the layer curve (attention outputs, "
            "window 3), the patch grid at a layer chosen with a slider (restoring attention outputs at one token), "
            "and, for a clicked patch, its effect per layer and its CAAP value and map, every layer and patch "
            "precomputed exactly. In Jupyter, `vp.explore(model, images)` gives the same views live, for any "
            "image, corruption, window, score and target."
        ),
        links=[(f"Open the explorer ({path.name})", path.name)],
    )


def demo_sections(
    model: HookedViT, sample: LabelledImages, *, metadata: dict | None = None, progress: bool = True
) -> list[Section]:
    """The built-in demo: model card, a causal trace of one image, a grayscale study on ``sample``.

    Args:
        model: the HookedViT (the embedded CIFAR-10 ViT in ``vitlens-patch demo``).
        sample: labelled images (uint8) for the trace and the study.
        metadata: the weights' JSON (:func:`~vitlens_patch.pretrained.load_metadata`), for the card.
        progress: show progress bars.
    """
    studies = [
        grayscale_study(model, sample, kind="attn", window=window, progress=progress)
        for window in (3, 1)
    ]
    study_text = (
        f"The study of the trace above, averaged over the {len(sample)} embedded images "
        f"({len(sample) // len(sample.class_names)} per class): colour = clean, grayscale = corrupted, "
        "restoring attention outputs over a window of 3 layers, and of single layers, around each "
        "layer; score = softmax probability of the true class. Bands are 95% confidence intervals. "
        f"Accuracy: {studies[0].colour_accuracy:.1%} on colour images, "
        f"{studies[0].grayscale_accuracy:.1%} on grayscale images.\n\n"
        "At dataset scale: `vitlens-patch study grayscale --data ../shared/data/cifar10/test.tar.gz "
        "--n 1000 --out grayscale.parquet` (resumable; shard with torchrun)."
    )
    return [
        _model_card(model, sample, metadata or {}),
        _single_image_trace(model, sample, progress),
        grayscale_study_section(studies, ["attn window 3", "attn window 1"],
                                title="Grayscale study on the embedded images", text=study_text),
        _attribution_section(model, sample, progress),
    ]


def run_demo(
    out: str | os.PathLike = DEMO_REPORT,
    *,
    n_per_class: int | None = None,
    extra_sections: Sequence[SectionBuilder] = (),
    progress: bool = True,
) -> Path:
    """Write the demo report (embedded model and images, offline) and return its path.

    Args:
        out: path of the HTML file.
        n_per_class: embedded images per class to use (default all 10).
        extra_sections: builders ``(model, sample) -> sections`` appended after the built-in ones.
        progress: show progress bars.
    """
    model = cifar10_vit()
    sample = sample_images(n_per_class)
    path = Path(out)
    sections = demo_sections(model, sample, metadata=load_metadata(), progress=progress)
    sections.insert(2, explorer_section(model, sample, path.with_name(f"{path.stem}_explorer.html"), progress=progress))
    for builder in extra_sections:
        sections.extend(builder(model, sample))
    intro = (
        "This report was computed offline by `vitlens-patch demo` on the CIFAR-10 ViT and the sample "
        "images shipped inside the vitlens_patch package. Figures are interactive: hover for values, "
        "drag to zoom, double-click to reset."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(sections, title="vitlens_patch demo", intro=intro), encoding="utf-8")
    return path.resolve()
