import pytest
import torch
from torch import nn

from tests.conftest import tiny_timm_vit
from vitlens_patch.metrics import (
    deletion_auc,
    insertion_auc,
    perturbation_curve,
    token_deletion_auc,
    token_deletion_curve,
)
from vitlens_patch.model import HookedViT
from vitlens_patch.model.preprocess import DataConfig
from vitlens_patch.images import gaussian_blur

# Rectangular 16x24 images with 8-pixel patches (grid 2x3) catch height/width mix-ups;
# ImageNet statistics catch a forgotten (de)normalisation.
HEIGHT, WIDTH, PATCH = 16, 24, 8
GRID = (HEIGHT // PATCH, WIDTH // PATCH)
DATA_CONFIG = DataConfig(
    input_size=(3, HEIGHT, WIDTH), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


class RegionModel(nn.Module):
    """Two classes; class 0's logit grows with the brightness of one patch, class 1's is 0."""

    def __init__(self, patch: int):
        super().__init__()
        self.data_config = DATA_CONFIG
        row, col = divmod(patch, GRID[1])
        self.region = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        self.region[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = True

    def forward(self, images):
        brightness = DATA_CONFIG.denormalize(images).mean(dim=1)[:, self.region].mean(dim=1)
        score = 8 * (brightness - 0.5)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


class LinearModel(nn.Module):
    """A random linear classifier on the flattened normalised image."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.data_config = DATA_CONFIG
        self.linear = nn.Linear(3 * HEIGHT * WIDTH, n_classes)

    def forward(self, images):
        return self.linear(images.flatten(1))


def probs_of(model, images, target):
    return model(images).softmax(dim=-1)[torch.arange(images.shape[0]), target]


@pytest.fixture
def images() -> torch.Tensor:
    pixels = torch.rand(3, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    return DATA_CONFIG.normalize(pixels)


@pytest.fixture
def white_images() -> torch.Tensor:
    return DATA_CONFIG.normalize(torch.ones(2, 3, HEIGHT, WIDTH))


@pytest.fixture
def patch_maps() -> torch.Tensor:
    """Distinct values per patch, so the removal order is unambiguous."""
    generator = torch.Generator().manual_seed(1)
    return torch.stack(
        [torch.randperm(6, generator=generator).float().view(GRID) for _ in range(3)]
    )


def replace_cells(images, baseline, maps, n_cells):
    """Each image with its ``n_cells`` highest-map cells taken from ``baseline``, by slicing."""
    out = images.clone()
    grid_h, grid_w = maps.shape[1:]
    cell_h, cell_w = HEIGHT // grid_h, WIDTH // grid_w
    for i in range(images.shape[0]):
        for cell in maps[i].flatten().argsort(descending=True)[:n_cells].tolist():
            row, col = divmod(cell, grid_w)
            rows = slice(row * cell_h, (row + 1) * cell_h)
            cols = slice(col * cell_w, (col + 1) * cell_w)
            out[i, :, rows, cols] = baseline[i, :, rows, cols]
    return out


# ------------------------------------------------------------------ deletion and insertion
def test_perfect_map_beats_inverted_map(white_images):
    model = RegionModel(patch=4)
    perfect = torch.zeros(2, *GRID)
    perfect[:, 1, 1] = 1.0  # patch 4 = row 1, col 1
    inverted = 1 - perfect
    kwargs = dict(target=0, n_steps=6, progress=False)
    assert (deletion_auc(model, white_images, perfect, **kwargs)
            < deletion_auc(model, white_images, inverted, **kwargs)).all()
    assert (insertion_auc(model, white_images, perfect, baseline="zeros", **kwargs)
            > insertion_auc(model, white_images, inverted, baseline="zeros", **kwargs)).all()


def test_perfect_map_deletion_curve_is_known(white_images):
    model = RegionModel(patch=4)
    perfect = torch.zeros(2, *GRID)
    perfect[:, 1, 1] = 1.0
    curve = perturbation_curve(
        model, white_images, perfect, 0, mode="deletion", baseline="zeros", n_steps=6,
        progress=False,
    )
    clean = probs_of(model, white_images, 0)
    black = probs_of(model, DATA_CONFIG.normalize(torch.zeros_like(white_images)), 0)
    # The only patch the model reads goes first: clean at 0, black from 1/6 on.
    expected = torch.stack([clean] + [black] * 6, dim=1)
    torch.testing.assert_close(curve.probs, expected)
    torch.testing.assert_close(curve.fractions, torch.arange(7) / 6)
    torch.testing.assert_close(curve.auc, (clean + black) / 12 + black * 5 / 6)


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
@pytest.mark.parametrize("grid", [GRID, (4, 3)])  # square 8x8 and tall 4x8 cells
def test_curve_matches_cells_replaced_by_slicing(images, mode, grid):
    model = LinearModel()
    baseline = DATA_CONFIG.normalize(torch.zeros_like(images))
    n_cells = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(1)
    maps = torch.stack([torch.randperm(n_cells, generator=generator).float().view(grid)
                        for _ in range(3)])
    target = torch.tensor([0, 3, 1])
    curve = perturbation_curve(
        model, images, maps, target, mode=mode, baseline="zeros", n_steps=n_cells, progress=False,
    )
    start, end = (images, baseline) if mode == "deletion" else (baseline, images)
    expected = torch.stack(
        [probs_of(model, replace_cells(start, end, maps, k), target) for k in range(n_cells + 1)],
        dim=1,
    )
    torch.testing.assert_close(curve.probs, expected)


def test_pixel_unit_matches_patch_unit_for_patch_maps(images, patch_maps):
    model = LinearModel()
    kwargs = dict(target=2, mode="deletion", baseline="blur", n_steps=6, progress=False)
    by_patch = perturbation_curve(model, images, patch_maps, unit="patch", **kwargs)
    by_pixel = perturbation_curve(model, images, patch_maps, unit="pixel", **kwargs)
    torch.testing.assert_close(by_pixel.probs, by_patch.probs)


def test_fractions_round_unit_counts(images, patch_maps):
    curve = perturbation_curve(
        LinearModel(), images, patch_maps, 0, mode="deletion", baseline="zeros", n_steps=4,
        progress=False,
    )
    # 6 patches in 4 steps: round(k * 6 / 4) = 0, 2, 3, 5, 6 (halves round up)
    torch.testing.assert_close(curve.fractions, torch.tensor([0, 2, 3, 5, 6]) / 6)


def test_blur_baseline_is_the_blurred_image(images, patch_maps):
    model = LinearModel()
    curve = perturbation_curve(
        model, images, patch_maps, 1, mode="insertion", baseline="blur", n_steps=3, progress=False,
    )
    pixels = DATA_CONFIG.denormalize(images)
    blurred = DATA_CONFIG.normalize(gaussian_blur(pixels, sigma=5.0, kernel_size=11))
    torch.testing.assert_close(curve.probs[:, 0], probs_of(model, blurred, 1))
    torch.testing.assert_close(curve.probs[:, -1], probs_of(model, images, 1))


def test_tensor_baseline_broadcasts(images, patch_maps):
    model = LinearModel()
    baseline = torch.randn(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    curve = perturbation_curve(
        model, images, patch_maps, 1, mode="deletion", baseline=baseline, n_steps=3,
        progress=False,
    )
    torch.testing.assert_close(curve.probs[:, -1], probs_of(model, baseline.expand_as(images), 1))


def test_default_baselines_follow_rise(images, patch_maps):
    model = LinearModel()
    kwargs = dict(target=1, n_steps=3, progress=False)
    for auc, mode, baseline in [(deletion_auc, "deletion", "zeros"),
                                (insertion_auc, "insertion", "blur")]:
        curve = perturbation_curve(
            model, images, patch_maps, mode=mode, baseline=baseline, **kwargs
        )
        torch.testing.assert_close(auc(model, images, patch_maps, **kwargs), curve.auc)


def test_chunking_and_target_forms_agree(images, patch_maps):
    model = LinearModel()
    predicted = model(images).argmax(dim=-1)
    kwargs = dict(n_steps=5, progress=False)
    reference = insertion_auc(model, images, patch_maps, predicted, batch_size=1000, **kwargs)
    torch.testing.assert_close(
        insertion_auc(model, images, patch_maps, None, batch_size=4, **kwargs), reference
    )
    torch.testing.assert_close(
        deletion_auc(model, images, patch_maps, 2, batch_size=5, **kwargs),
        deletion_auc(model, images, patch_maps, torch.tensor([2, 2, 2]), batch_size=100, **kwargs),
    )


def test_plain_callable_takes_data_config(images, patch_maps):
    model = LinearModel()
    kwargs = dict(target=0, n_steps=3, progress=False)
    torch.testing.assert_close(
        deletion_auc(model.forward, images, patch_maps, data_config=DATA_CONFIG, **kwargs),
        deletion_auc(model, images, patch_maps, **kwargs),
    )
    with pytest.raises(ValueError, match=r"baseline='zeros' \(black pixels\) needs the images' normalisation \(mean, std\): pass data_config="):
        deletion_auc(model.forward, images, patch_maps, **kwargs)


def test_pixel_maps_are_pooled_to_the_model_patch_grid(tiny_model, tiny_images):
    patch_maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    pixel_maps = patch_maps.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    kwargs = dict(target=0, n_steps=4, progress=False)
    torch.testing.assert_close(
        deletion_auc(tiny_model, tiny_images, pixel_maps, **kwargs),
        deletion_auc(tiny_model, tiny_images, patch_maps, **kwargs),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(maps=torch.full((3, *GRID), float("nan"))), r"maps must be finite, got NaN or inf in images \[0, 1, 2\]"),
        (dict(maps=torch.zeros(3, 3, 3)), r"maps of size \(3, 3\) do not tile images of size \(16, 24\)"),
        (dict(maps=torch.zeros(2, *GRID)), "maps has batch 2 but images has batch 3"),
        (dict(maps=torch.zeros(3, 6)), r"maps must be a tensor \[batch, grid_h, grid_w\]"),
        (dict(images=torch.zeros(3, HEIGHT, WIDTH)), r"images must be a float tensor \[batch, channel"),
        (dict(n_steps=0), "n_steps must be a positive int, got 0"),
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(baseline="gray"), r"baseline must be one of \('zeros', 'mean', 'blur'\) or a tensor of normalised model input, got 'gray'"),
        (dict(baseline=torch.zeros(2, 3, HEIGHT, WIDTH)), r"baseline tensor must broadcast to images \(3, 3, 16, 24\)"),
        (dict(unit="token"), "unit must be 'patch' or 'pixel', got 'token'"),
        (dict(mode="both"), "mode must be 'deletion' or 'insertion', got 'both'"),
        (dict(target=torch.tensor([5, 0, -1])), r"target must hold class indices in \[0, 4\], got \[-1, 5\]"),
        (dict(target=torch.tensor([0.0, 1.0, 2.0])), "target must be None, an int or an integer tensor"),
        (dict(target=torch.tensor([0, 1])), r"target must be .* integer tensor of shape \[batch\] = \[3\]"),
        (dict(maps=torch.zeros(3, HEIGHT, WIDTH)), "unit='patch' with pixel maps needs .*model.cfg.grid_size"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_inputs_raise(images, patch_maps, change, message):
    model = LinearModel()
    arguments = dict(images=images, maps=patch_maps, target=0, mode="deletion", baseline="zeros",
                     n_steps=4, unit="patch", batch_size=8)
    arguments.update(change)
    if "maps" in change and change["maps"].shape[1:] == (HEIGHT, WIDTH):
        model = model.forward  # a plain callable has no patch grid
    with pytest.raises(ValueError, match=message):
        perturbation_curve(model, progress=False, **arguments)


# --------------------------------------------------------------------------- token deletion
@pytest.mark.parametrize("order", ["most", "least"])
def test_token_deletion_matches_tokens_dropped_by_index(tiny_model, tiny_images, order):
    maps = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)).float()
                        for i in range(3)]).view(3, 4, 4)
    target = torch.tensor([1, 4, 7])
    curve = token_deletion_curve(
        tiny_model, tiny_images, maps, target, order=order, n_steps=16, progress=False,
    )
    expected = torch.empty(3, 17)
    for i in range(3):
        drop_order = maps[i].flatten().argsort(descending=order == "most").tolist()
        for k in range(17):
            keep = [0] + [1 + patch for patch in range(16) if patch not in drop_order[:k]]
            logits = tiny_model.run_with_hooks(
                tiny_images[i : i + 1],
                fwd_hooks=[("hook_full_embed", lambda tokens, hook: tokens[:, keep])],
            )
            expected[i, k] = logits.softmax(dim=-1)[0, target[i]]
    torch.testing.assert_close(curve.probs, expected)
    torch.testing.assert_close(curve.fractions, torch.arange(17) / 16)
    torch.testing.assert_close(
        token_deletion_auc(tiny_model, tiny_images, maps, target, order=order, n_steps=16,
                           batch_size=2, progress=False),
        curve.auc,
    )
    assert not tiny_model.hook_full_embed._forward_hooks


def test_token_deletion_pools_pixel_maps(tiny_model, tiny_images):
    patch_maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(4))
    pixel_maps = patch_maps.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    torch.testing.assert_close(
        token_deletion_auc(tiny_model, tiny_images, pixel_maps, n_steps=4, progress=False),
        token_deletion_auc(tiny_model, tiny_images, patch_maps, n_steps=4, progress=False),
    )


@pytest.mark.usefixtures("without_type_checks")
def test_token_deletion_bad_inputs_raise(tiny_model, tiny_images):
    maps = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match="order must be 'most' or 'least', got 'middle'"):
        token_deletion_auc(tiny_model, tiny_images, maps, order="middle", progress=False)
    with pytest.raises(ValueError, match="n_steps must be a positive int, got 0"):
        token_deletion_auc(tiny_model, tiny_images, maps, n_steps=0, progress=False)
    with pytest.raises(ValueError, match=r"maps must be finite, got NaN or inf in images \[1\]"):
        infinite = maps.index_fill(0, torch.tensor([1]), float("inf"))
        token_deletion_auc(tiny_model, tiny_images, infinite, progress=False)
    avg_pooled = HookedViT.from_timm(tiny_timm_vit(global_pool="avg"))
    with pytest.raises(ValueError, match="pools prefix tokens .* pooling='avg'"):
        token_deletion_auc(avg_pooled, tiny_images, maps, progress=False)
    grid_3 = HookedViT.from_timm(tiny_timm_vit(img_size=24))
    message = r"maps of size \(4, 4\) do not tile model.cfg.grid_size of size \(3, 3\)"
    with pytest.raises(ValueError, match=message):
        token_deletion_auc(grid_3, tiny_images[..., :24, :24], maps, progress=False)
