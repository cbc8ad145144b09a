import math

import pytest
import torch
from scipy import stats

from vitlens_patch.patching.results import TraceMean, TraceResult


def make_result(n_images=4, n_layers=3, n_positions=5, seed=0, **overrides) -> TraceResult:
    generator = torch.Generator().manual_seed(seed)
    fields = dict(
        effects=torch.randn(n_images, n_layers, n_positions, generator=generator),
        dims=("image", "layer", "position"),
        clean_score=torch.rand(n_images, generator=generator) + 1.0,
        corrupted_score=torch.rand(n_images, generator=generator) * 0.5,
        settings={"kind": "grid", "window": 1, "score": "prob"},
        coords={"layer": list(range(n_layers)), "position": [0, 1, 2, 3, 4][:n_positions]},
        grid_size=(2, 2),
        n_prefix_tokens=1,
    )
    fields.update(overrides)
    return TraceResult(**fields)


def test_normalized_divides_each_image_by_its_gap():
    result = make_result()
    normalized = result.normalized()
    gap = result.clean_score - result.corrupted_score
    for image in range(result.n_images):
        assert torch.allclose(normalized.effects[image], result.effects[image] / gap[image])
    assert normalized.is_normalized and not result.is_normalized
    assert normalized.settings["window"] == 1


def test_normalized_gives_nan_without_a_gap_and_mean_skips_it():
    result = make_result(
        clean_score=torch.tensor([1.5, 1.0, 1.0, 1.0]),
        corrupted_score=torch.tensor([1.5, 0.0, 0.0, 0.0]),
    )
    normalized = result.normalized()
    assert normalized.effects[0].isnan().all()
    assert not normalized.effects[1:].isnan().any()
    summary = normalized.mean()
    assert torch.allclose(summary.mean, result.effects[1:].mean(dim=0))
    assert (summary.count == 3).all()


def test_normalized_twice_is_an_error():
    with pytest.raises(ValueError, match="already normalized"):
        make_result().normalized().normalized()


def test_mean_has_a_student_t_interval():
    result = make_result(n_images=6)
    summary = result.mean()
    assert isinstance(summary, TraceMean)
    assert summary.dims == ("layer", "position") and summary.mean.shape == (3, 5)
    effects = result.effects.double()
    half_width = stats.t.ppf(0.975, 5) * effects.std(dim=0) / math.sqrt(6)
    assert torch.allclose(summary.mean.double(), effects.mean(dim=0), atol=1e-6)
    assert torch.allclose(summary.upper.double(), effects.mean(dim=0) + half_width, atol=1e-5)
    assert torch.allclose(summary.lower.double(), effects.mean(dim=0) - half_width, atol=1e-5)
    narrower = result.mean(confidence=0.5)
    assert (narrower.upper - narrower.lower < summary.upper - summary.lower).all()


def test_mean_of_one_image_has_no_interval():
    summary = make_result(n_images=1).mean()
    assert torch.equal(summary.mean, make_result(n_images=1).effects[0])
    assert summary.lower.isnan().all() and summary.upper.isnan().all()


def test_mean_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence must be a number in \\(0, 1\\), got 95"):
        make_result().mean(confidence=95)


def test_to_dataframe_is_long_format():
    result = make_result(n_images=2, coords={"layer": [0, 1, 2], "position": [0, 5, 6, 7, 8]})
    frame = result.to_dataframe()
    columns = ["image", "layer", "position", "effect", "clean_score", "corrupted_score"]
    assert list(frame.columns) == columns
    assert len(frame) == result.effects.numel()
    row = frame[(frame.image == 1) & (frame.layer == 2) & (frame.position == 6)]
    assert row.effect.item() == pytest.approx(result.effects[1, 2, 2].item())
    assert row.clean_score.item() == pytest.approx(result.clean_score[1].item())
    assert frame.layer.dtype.kind == "i"


def test_to_dataframe_keeps_list_labels_whole():
    windows = [[0, 1], [0, 1, 2], [1, 2]]
    result = make_result(n_images=1, n_positions=1, coords={"layer": windows, "position": [0]})
    frame = result.to_dataframe()
    assert frame.layer.tolist() == [(0, 1), (0, 1, 2), (1, 2)]


def test_getitem_selects_images():
    coords = {"image": ["a", "b", "c", "d"], "layer": [0, 1, 2], "position": [0, 1, 2, 3, 4]}
    result = make_result(coords=coords)
    picked = result[[3, 1]]
    assert torch.equal(picked.effects, result.effects[[3, 1]])
    assert torch.equal(picked.clean_score, result.clean_score[[3, 1]])
    assert picked.coords["image"] == ["d", "b"]
    assert result[2].n_images == 1 and result[2].dims == result.dims
    assert result[1:3].coords["image"] == ["b", "c"]


def test_save_and_load_round_trip(tmp_path):
    settings = {"kind": "grid", "window": 3, "positions": (1, 2), "normalized": False}
    result = make_result(settings=settings)
    path = tmp_path / "trace.safetensors"
    result.save(path)
    loaded = TraceResult.load(path)
    for name in ("effects", "clean_score", "corrupted_score"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
    assert loaded.dims == result.dims
    assert loaded.coords == result.coords
    assert loaded.settings == {**result.settings, "positions": [1, 2]}  # JSON turns tuples to lists
    assert loaded.grid_size == (2, 2) and loaded.n_prefix_tokens == 1


def test_save_needs_json_settings(tmp_path):
    with pytest.raises(ValueError, match="settings and coords must be JSON-serialisable"):
        make_result(settings={"score": object()}).save(tmp_path / "trace.safetensors")


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="path must be a file written by TraceResult.save"):
        TraceResult.load(path)


def test_load_rejects_another_format_version(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "trace.safetensors"
    make_result().save(path)
    with safe_open(str(path), framework="pt") as file:
        metadata = {key: value.replace('"version": 1', '"version": 99') for key, value in file.metadata().items()}
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"path holds format version 99 .* reads version 1"):
        TraceResult.load(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dims": ("layer", "image", "position")}, "dims must name every axis .* starting with 'image'"),
        ({"dims": ("image", "layer")}, "dims must name every axis"),
        ({"dims": ("image", "layer", "layer")}, "dims must be distinct"),
        ({"clean_score": torch.zeros(3)}, r"clean_score must have shape \[4\]"),
        ({"coords": {"head": [0]}}, "coords keys must be among dims"),
        ({"coords": {"layer": [0, 1]}}, r"coords\['layer'\] must have 3 labels, got 2"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_construction_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_result(**overrides)


def test_coord_defaults_to_a_range():
    result = make_result(coords={})
    assert result.coord("position") == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="dim must be one of"):
        result.coord("head")


def test_repr_is_short_with_shape_settings_and_summary():
    result = make_result(n_images=40, n_layers=12, n_positions=5, settings={
        "kind": "grid", "window": 1, "score": "prob", "positions": list(range(200)), "dtype": None,
    })
    text = repr(result)
    assert len(text) < 400 and text.count("\n") == 1 and "tensor(" not in text
    assert text.startswith("TraceResult(40 images x 12 layers x 5 positions; kind='grid', window=1, score='prob', "
                           "positions=[200 values])")
    mean = result.effects.mean(0)
    layer, position = divmod(int(mean.argmax()), 5)
    assert f"max {mean.max().item():.4g} at layer {layer}, position {position}" in text
    one = make_result(n_images=1, n_positions=1)
    assert repr(one).startswith("TraceResult(1 image x 3 layers x 1 position;")


def test_html_repr_of_a_layer_curve_is_a_table_of_means():
    result = make_result(n_images=6, n_positions=1)
    layers = TraceResult(result.effects[:, :, 0], ("image", "layer"), result.clean_score, result.corrupted_score)
    page = layers._repr_html_()
    assert page.startswith("<b>TraceResult</b>: 6 images x 3 layers") and page.count("<table") == 1
    assert f"{layers.mean().mean[1].item():.4g}" in page and "tensor(" not in page
    assert "<table" not in result._repr_html_()  # two axes: the summary only
