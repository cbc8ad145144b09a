"""The explorer's Python side: driven through its traits, it shows what direct calls of
trace_layers, trace_grid and caap return; requests supersede each other; bad input is shown and raised."""

import threading
from dataclasses import replace

import pytest
import torch

from vitlens_patch.attribution.caap import caap
from vitlens_patch.patching.corruptions import (
    corrupt_blur, corrupt_grayscale, corrupt_patches, corrupt_pixel_noise,
)
from vitlens_patch.patching.embedding_noise import embedding_noise
from vitlens_patch.patching.tracing import trace_grid, trace_layers
from vitlens_patch.widgets import explore
from vitlens_patch.widgets.session import ExplorerSession, ExplorerSettings, Stage, central_patches



def direct_corruption(model, clean, name, images):
    """The documented corruption of each explorer setting, built from the public functions."""
    config = model.data_config
    return {
        "grayscale": lambda: corrupt_grayscale(clean, config),
        "blur": lambda: corrupt_blur(clean, config, sigma=2.0),
        "pixel_noise": lambda: corrupt_pixel_noise(clean, config, std=0.1, seed=0),
        "patches": lambda: corrupt_patches(clean, config, central_patches(model.cfg.grid_size), patch_size=8),
        "embedding_noise": lambda: embedding_noise(model, level="s3", reference=images, seed=0),
    }[name]()


@pytest.fixture
def widget(tiny_model, tiny_images):
    widget = explore(tiny_model, tiny_images)
    widget.wait(60)
    return widget


@pytest.mark.parametrize("corruption", ["grayscale", "blur", "pixel_noise", "patches", "embedding_noise"])
def test_views_equal_direct_calls(widget, tiny_model, tiny_images, corruption):
    widget.image = 2
    widget.corruption = corruption
    widget.kind = "mlp"
    widget.window = 1
    widget.score = "logit"
    widget.target = 4
    widget.caap_layers = (1, 2)
    widget.selected_patch = 5  # a click on patch 5
    result = widget.wait(60)
    assert result.complete and result.patch_exact and result.caap_exact

    clean = tiny_images[2:3]
    corrupted = direct_corruption(tiny_model, clean, corruption, tiny_images)
    options = dict(kind="mlp", window=1, score="logit", target=4, progress=False)
    layers = trace_layers(tiny_model, clean, corrupted, **options)
    grid = trace_grid(tiny_model, clean, corrupted, **options)
    caap_map = caap(tiny_model, clean, target=4, layers=(1, 2), score="logit", progress=False)[0]

    assert result.layers.dims == ("image", "layer")
    torch.testing.assert_close(result.layers.effects, layers.effects)
    torch.testing.assert_close(result.layers.clean_score, layers.clean_score)
    torch.testing.assert_close(result.layers.corrupted_score, layers.corrupted_score)
    assert result.grid.dims == grid.dims and result.grid.coords == grid.coords
    torch.testing.assert_close(result.grid.effects, grid.effects, atol=1e-6, rtol=1e-5)
    assert bool(result.grid.exact.all())
    torch.testing.assert_close(result.caap_map, caap_map)
    token = tiny_model.cfg.n_prefix_tokens + 5
    torch.testing.assert_close(result.patch_effects, grid.effects[0, :, token], atol=1e-6, rtol=1e-5)
    assert result.caap_value == pytest.approx(float(caap_map.reshape(-1)[5]))
    # the JSON the browser draws holds the same numbers
    view = widget.view
    assert view["settings"]["image"] == 2 and view["pending"] == []
    assert view["layers"]["effects"] == pytest.approx(layers.effects[0].tolist())
    assert view["grid"]["effects"][1] == pytest.approx(grid.effects[0, 1, 1:].tolist(), abs=1e-6)
    assert view["patch"]["index"] == 5 and view["patch"]["caap"] == pytest.approx(result.caap_value)


def test_default_target_is_the_prediction_and_estimates_are_attribution_calls(tiny_model, tiny_images):
    session = ExplorerSession(tiny_model, tiny_images)
    settings = ExplorerSettings(image=1, window=1)
    predicted = int(tiny_model(tiny_images[1:2]).argmax())
    assert session.target(settings) == predicted
    corrupted = corrupt_grayscale(tiny_images[1:2], tiny_model.data_config)
    estimate = session.compute(Stage("grid_estimate", settings.trace_key))
    direct = trace_grid(tiny_model, tiny_images[1:2], corrupted, kind="attn", window=settings.window, score="prob",
                        target=predicted, method="attribution", progress=False)
    torch.testing.assert_close(estimate.effects, direct.effects)
    caap_estimate = session.compute(Stage("caap_estimate", settings.caap_key))
    torch.testing.assert_close(caap_estimate, caap(tiny_model, tiny_images[1:2], target=predicted, score="prob",
                                                   method="attribution", progress=False)[0])


def test_going_back_is_instant_from_the_cache(widget):
    first = widget.view
    widget.image = 1
    widget.wait(60)
    widget.image = 0  # every stage cached: drawn in the setter, no work queued
    assert not widget.busy
    assert widget.view["settings"] == first["settings"] and widget.view["pending"] == []
    assert widget.view["grid"] == first["grid"]


def test_a_newer_request_supersedes_a_running_one(tiny_model, tiny_images):
    gate, entered = threading.Event(), threading.Event()

    def hold_first_worker_block(module, args):
        if threading.current_thread().name == "vitlens-explorer" and not gate.is_set():
            entered.set()
            gate.wait(30)

    handle = tiny_model.blocks[0].register_forward_pre_hook(hold_first_worker_block)
    try:
        widget = explore(tiny_model, tiny_images)  # image 0: the worker stops inside its first stage
        assert entered.wait(30) and widget.busy
        first_request = widget.request
        widget.image = 1  # the newer request
        assert widget.request == first_request + 1
        gate.set()
        result = widget.wait(60)
    finally:
        handle.remove()
    assert result.settings.image == 1 and result.complete
    session, first = widget.session, replace(widget.settings, image=0)
    # image 0's running stage stopped at the next block and was never cached; image 0 got no later stage
    assert not session.is_cached(Stage("layers", first.trace_key))
    assert session.missing(first) == session.stages(first)
    assert session.is_cached(Stage("layers", widget.settings.trace_key))
    assert not any(hook for block in tiny_model.blocks for hook in block._forward_pre_hooks.values())


def test_wrong_image_size_is_a_clear_error(tiny_model, tiny_images, widget):
    with pytest.raises(ValueError, match=r"images must be normalised model input of shape \[image, 3, 32, 32\].*\(2, 3, 31, 31\)"):
        explore(tiny_model, torch.randn(2, 3, 31, 31))
    with pytest.raises(ValueError, match=r"images must be normalised model input of shape \[image, 3, 32, 32\]"):
        widget.set_images(torch.randn(2, 3, 64, 64))
    assert "images must be normalised model input" in widget.error
    widget.set_images(tiny_images[:2])  # good images clear the error
    assert widget.error == "" and len(widget.thumbnails) == 2


def test_unknown_corruption_is_shown_and_raised(widget):
    message = r"corruption must be one of \('grayscale', 'blur', 'pixel_noise', 'patches', 'embedding_noise'\), got 'sepia'"
    with pytest.raises(ValueError, match=message):
        widget.corruption = "sepia"
    assert "got 'sepia'" in widget.error
    assert widget.corruption == "grayscale" and widget.view["settings"]["corruption"] == "grayscale"
    with pytest.raises(ValueError, match=r"window must be an int in \[1, 2\].*got 7"):
        widget.window = 7
    with pytest.raises(ValueError, match=r"layers must be a block range .* got \(2, 1\)"):
        widget.caap_layers = (2, 1)
    assert widget.caap_layers == (0, 2)
    widget.corruption = "blur"  # a good value clears the error
    assert widget.error == ""


def test_bad_value_from_the_browser_is_shown_not_raised(widget):
    widget.set_state({"corruption": "sepia"})  # what a comm message from the front end does
    assert "got 'sepia'" in widget.error and widget.corruption == "grayscale"


def test_bad_initial_setting_raises(tiny_model, tiny_images):
    with pytest.raises(ValueError, match="corruption must be one of"):
        explore(tiny_model, tiny_images, corruption="sepia")
    with pytest.raises(ValueError, match="settings must be among"):
        explore(tiny_model, tiny_images, colour="red")


def test_computation_errors_are_shown_and_raised_by_wait(widget, monkeypatch):
    def broken(stage):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(widget.session, "compute", broken)
    widget.kind = "resid"
    with pytest.raises(RuntimeError, match="out of memory"):
        widget.wait(60)
    assert widget.error == "RuntimeError: out of memory" and not widget.busy


def test_labelled_images_give_thumbnails_with_true_and_predicted_class(tiny_model):
    from vitlens_patch.data.folder import LabelledImages

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sample = LabelledImages(images, torch.tensor([3, 7]), tuple(f"class{i}" for i in range(10)))
    widget = explore(tiny_model, sample)
    assert [thumb["true"] for thumb in widget.thumbnails] == ["class3", "class7"]
    assert all(thumb["src"].startswith("data:image/png;base64,") and thumb["pred"].startswith("class")
               for thumb in widget.thumbnails)
    assert widget.options["class_names"][3] == "class3"
    widget.wait(60)


def test_front_end_gets_plotly_from_the_kernel_and_fetches_nothing(widget, monkeypatch):
    from vitlens_patch.widgets.assets import STATIC, plotly_js

    drawing = (STATIC / "explorer.js").read_text()
    assert widget._esm == drawing and "http" not in drawing and "import " not in drawing
    sent = []
    monkeypatch.setattr(widget, "send", lambda content, buffers=None: sent.append((content, buffers)))
    widget._on_message(widget, {"type": "plotly.js"}, [])  # what the front end sends on first render
    assert sent == [({"type": "plotly.js"}, [plotly_js().encode()])] and b"plotly.js v" in sent[0][1][0]
