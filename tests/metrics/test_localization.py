import pytest
import torch
from sklearn.metrics import average_precision_score

from vitlens_patch.metrics import boxes_to_masks, localization_aupr, pointing_game

# Rectangular 16x24 images with 8-pixel patches (grid 2x3) catch height/width mix-ups.
HEIGHT, WIDTH, PATCH = 16, 24, 8


def box_mask(x_min, y_min, x_max, y_max, batch=1):
    mask = torch.zeros(batch, HEIGHT, WIDTH, dtype=torch.bool)
    mask[:, y_min:y_max, x_min:x_max] = True
    return mask


# ------------------------------------------------------------------------------ AUPR
def test_perfect_pixel_map_scores_one():
    masks = torch.cat([box_mask(3, 2, 11, 9), box_mask(20, 0, 24, 16)])
    torch.testing.assert_close(localization_aupr(masks.float() * 5 - 1, masks), torch.ones(2))


def test_perfect_patch_map_scores_one_after_nearest_upsampling():
    masks = box_mask(8, 0, 24, 8)  # patches (0, 1) and (0, 2)
    maps = torch.tensor([[[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(localization_aupr(maps, masks), torch.ones(1))


def test_inverted_and_constant_maps_score_the_base_rate():
    masks = torch.cat([box_mask(3, 2, 11, 9), box_mask(0, 0, 5, 16)])
    base_rate = masks.float().mean(dim=(1, 2))
    torch.testing.assert_close(localization_aupr(1 - masks.float(), masks), base_rate)
    # All pixels tie: one threshold, so ties must not be broken by position.
    torch.testing.assert_close(localization_aupr(torch.zeros(2, HEIGHT, WIDTH), masks), base_rate)


def test_map_peaking_outside_the_box_scores_below_the_base_rate():
    masks = box_mask(0, 0, 6, 6)  # top-left corner
    rows = torch.arange(HEIGHT)[:, None].float()
    cols = torch.arange(WIDTH)[None, :].float()
    # Peak at the bottom-right corner, decaying towards the box.
    maps = -((rows - HEIGHT + 1) ** 2 + (cols - WIDTH + 1) ** 2).sqrt()[None]
    aupr = localization_aupr(maps, masks)
    assert aupr < masks.float().mean()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("map_size", [(2, 3), (4, 3), (16, 6), (HEIGHT, WIDTH)])
def test_aupr_matches_scikit_learn_with_ties(seed, map_size):
    generator = torch.Generator().manual_seed(seed)
    # Few distinct values so many pixels tie; non-square cells catch swapped upsampling factors.
    maps = torch.randint(0, 4, (3, *map_size), generator=generator).float()
    masks = torch.rand(3, HEIGHT, WIDTH, generator=generator) < 0.3
    upsampled = maps.repeat_interleave(HEIGHT // map_size[0], dim=1)
    upsampled = upsampled.repeat_interleave(WIDTH // map_size[1], dim=2)
    expected = torch.tensor([
        average_precision_score(mask.flatten().numpy(), scores.flatten().numpy())
        for mask, scores in zip(masks, upsampled)
    ], dtype=torch.float32)
    torch.testing.assert_close(localization_aupr(maps, masks), expected)


def test_maps_finer_than_masks_are_mean_pooled():
    maps = torch.rand(2, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    masks = torch.tensor([[[True, False, False], [False, True, False]]] * 2)
    pooled = maps.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).mean(dim=(-1, -2))
    expected = torch.tensor([
        average_precision_score(mask.flatten().numpy(), scores.flatten().numpy())
        for mask, scores in zip(masks, pooled)
    ], dtype=torch.float32)
    torch.testing.assert_close(localization_aupr(maps, masks), expected)


@pytest.mark.parametrize(
    ("maps", "masks", "message"),
    [
        (torch.zeros(1, 5, 5), box_mask(0, 0, 4, 4), r"maps of size \(5, 5\) do not tile masks of size \(16, 24\)"),
        (torch.zeros(1, HEIGHT, WIDTH), torch.zeros(1, HEIGHT, WIDTH, dtype=torch.bool), r"empty masks for images \[0\]"),
        (torch.full((1, 2, 3), float("nan")), box_mask(0, 0, 4, 4), r"maps must be finite, got NaN or inf in images \[0\]"),
        (torch.tensor([[[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]]), box_mask(0, 0, 4, 4), "maps must be finite"),
        (torch.zeros(2, 2, 3), box_mask(0, 0, 4, 4), "maps has batch 2 but masks has batch 1"),
        (torch.zeros(2, 3), box_mask(0, 0, 4, 4), r"maps must be a tensor \[batch, grid_h, grid_w\] .*got \(2, 3\)"),
        (torch.zeros(1, 2, 3), box_mask(0, 0, 4, 4).float(), "masks must be a bool tensor .*got torch.float32"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_aupr_bad_inputs_raise(maps, masks, message):
    with pytest.raises(ValueError, match=message):
        localization_aupr(maps, masks)


# ---------------------------------------------------------------------------- pointing game
def test_pointing_game_hits_and_misses_on_pixel_maps():
    masks = box_mask(3, 2, 11, 9, batch=2)
    maps = torch.zeros(2, HEIGHT, WIDTH)
    maps[0, 5, 10] = 1.0  # inside (last column of the box)
    maps[1, 5, 11] = 1.0  # one pixel right of the box
    assert pointing_game(maps, masks).tolist() == [True, False]


def test_pointing_game_tolerance_is_euclidean_in_pixels():
    masks = box_mask(3, 2, 11, 9)
    maps = torch.zeros(1, HEIGHT, WIDTH)
    maps[0, 10, 13] = 1.0  # 2 rows below and 3 columns right of corner pixel (8, 10): sqrt(13)
    hits = [pointing_game(maps, masks, tolerance=t).item() for t in (0, 3.5, 3.7)]
    assert hits == [False, False, True]


def test_pointing_game_patch_maps_point_at_the_patch_centre():
    maps = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]).expand(3, 2, 3)
    # Patch (0, 2) spans columns 16..23 and its centre pixel is (4, 20).
    masks = torch.cat([
        box_mask(16, 0, 24, 8),   # the patch itself
        box_mask(20, 4, 21, 5),   # just the centre pixel
        box_mask(16, 0, 20, 8),   # the patch's left half, not the centre
    ])
    assert pointing_game(maps, masks).tolist() == [True, True, False]


def test_pointing_game_accepts_boxes():
    maps = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    boxes = torch.tensor([[16.0, 0.0, 24.0, 8.0], [8.0, 8.0, 24.0, 16.0]])
    assert pointing_game(maps, boxes, image_size=(HEIGHT, WIDTH)).tolist() == [True, False]
    masks = boxes_to_masks(boxes, (HEIGHT, WIDTH))
    assert pointing_game(maps, masks).tolist() == [True, False]


def test_pointing_game_bad_inputs_raise():
    maps = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"empty masks for images \[0\]"):
        pointing_game(maps, torch.zeros(1, HEIGHT, WIDTH, dtype=torch.bool))
    with pytest.raises(ValueError, match="maps must be finite"):
        pointing_game(torch.full((1, 2, 3), float("nan")), box_mask(0, 0, 4, 4))
    with pytest.raises(ValueError, match=r"maps of size \(2, 3\) do not tile objects of size \(16, 20"):
        pointing_game(maps, torch.ones(1, HEIGHT, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="tolerance must be a number of pixels >= 0, got -1"):
        pointing_game(maps, box_mask(0, 0, 4, 4), tolerance=-1)
    # Boxes default to the map's own size: a pixel box on a patch map is out of bounds.
    with pytest.raises(ValueError, match=r"boxes must satisfy .* <= 3 .*\(image size \(2, 3\)\)"):
        pointing_game(maps, torch.tensor([[0.0, 0.0, 8.0, 8.0]]))


# ------------------------------------------------------------------------------- boxes
def test_boxes_to_masks_uses_pixel_centres():
    boxes = torch.tensor([[3, 2, 11, 9], [2.6, 0.4, 4.5, 1.6]])
    masks = boxes_to_masks(boxes, (HEIGHT, WIDTH))
    assert torch.equal(masks[0], box_mask(3, 2, 11, 9)[0])
    # Centres 3.5 and 4.5 fall in [2.6, 4.5]; centre 0.5 and 1.5 in [0.4, 1.6].
    assert torch.equal(masks[1], box_mask(3, 0, 5, 2)[0])


@pytest.mark.parametrize(
    "boxes",
    [torch.tensor([[4.0, 0.0, 4.0, 8.0]]), torch.tensor([[0.0, 0.0, 25.0, 8.0]]),
     torch.tensor([[-1.0, 0.0, 4.0, 8.0]]), torch.tensor([[0.0, float("nan"), 4.0, 8.0]])],
)
def test_boxes_to_masks_rejects_bad_boxes(boxes):
    message = r"boxes must satisfy 0 <= x_min < x_max <= 24 and 0 <= y_min < y_max <= 16"
    with pytest.raises(ValueError, match=message):
        boxes_to_masks(boxes, (HEIGHT, WIDTH))


@pytest.mark.usefixtures("without_type_checks")
def test_boxes_to_masks_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"boxes must be a tensor \[batch, 4\] .*got \(4,\)"):
        boxes_to_masks(torch.tensor([0.0, 0.0, 4.0, 4.0]), (HEIGHT, WIDTH))
