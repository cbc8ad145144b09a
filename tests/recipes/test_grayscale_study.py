"""The grayscale study recipe against direct calls of the engine, on a tiny random model."""

import pandas as pd
import pytest
import torch
from scipy import stats

from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.patching.corruptions import corrupt_grayscale
from vitlens_patch.patching.tracing import trace_layers
from vitlens_patch.recipes import GrayscaleStudyResult, grayscale_study, load_layer_curves, save_layer_curves

N_IMAGES, N_LAYERS, CLASSES = 6, 3, tuple("abcdefghij")


@pytest.fixture(scope="module")
def data() -> LabelledImages:
    """Raw uint8 images; labels cover three classes, two images each."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return LabelledImages(images, torch.tensor([0, 4, 7, 4, 0, 7]), CLASSES)


@pytest.fixture(scope="module")
def result(model, data) -> GrayscaleStudyResult:
    return grayscale_study(model, data, window=3, batch_size=4, progress=False)


@pytest.mark.parametrize(("kind", "window"), [("attn", 3), ("mlp", 1)])
def test_effects_equal_a_direct_trace(model, data, kind, window):
    images = model.preprocess(data.images)
    # float model input with labels, in batches of 4 then 2
    study = grayscale_study(model, images, data.labels, kind=kind, window=window, batch_size=4, progress=False)
    direct = trace_layers(
        model, images, corrupt_grayscale(images, model.data_config), kind=kind, window=window,
        score="prob", target=data.labels, progress=False,
    )
    torch.testing.assert_close(study.trace.effects, direct.effects, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(study.trace.clean_score, direct.clean_score, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(study.trace.corrupted_score, direct.corrupted_score, atol=1e-6, rtol=1e-5)
    assert study.trace.dims == ("image", "layer") and study.trace.coord("layer") == list(range(N_LAYERS))
    assert study.settings["kind"] == kind and study.settings["window"] == window
    assert study.trace.settings["target"] == data.labels.tolist()


def test_raw_images_give_the_same_result_as_model_input(model, data, result):
    images = model.preprocess(data.images)
    direct = grayscale_study(model, images, data.labels, window=3, progress=False)
    torch.testing.assert_close(result.trace.effects, direct.trace.effects)
    assert result.indices == list(range(N_IMAGES)) and result.class_names == CLASSES


def test_accuracy_equals_direct_computation(model, data, result):
    images = model.preprocess(data.images)
    with torch.no_grad():
        colour = model(images).argmax(-1)
        gray = model(corrupt_grayscale(images, model.data_config)).argmax(-1)
    assert torch.equal(result.colour_prediction, colour) and torch.equal(result.grayscale_prediction, gray)
    assert result.colour_accuracy == pytest.approx((colour == data.labels).double().mean().item())
    assert result.grayscale_accuracy == pytest.approx((gray == data.labels).double().mean().item())
    table = result.accuracy()
    assert table["class"].tolist() == ["a", "e", "h", "all"]
    assert table["n_images"].tolist() == [2, 2, 2, N_IMAGES]
    members = data.labels == 4
    assert table.loc[1, "grayscale_accuracy"] == pytest.approx((gray[members] == 4).double().mean().item())
    # accuracies are proportions: Wilson intervals, inside [0, 1]
    k = int((colour == data.labels).sum())
    expected = stats.binomtest(k, N_IMAGES).proportion_ci(0.95, method="wilson")
    assert table.loc[3, ["colour_lower", "colour_upper"]].tolist() == pytest.approx([expected.low, expected.high])
    for kind in ("colour", "grayscale"):
        assert (0 <= table[f"{kind}_lower"]).all() and (table[f"{kind}_upper"] <= 1).all()
        assert (table[f"{kind}_lower"] <= table[f"{kind}_accuracy"]).all()
        assert (table[f"{kind}_accuracy"] <= table[f"{kind}_upper"]).all()


def test_layer_and_class_means_match_the_trace(result, data):
    means = result.layer_means()
    summary = result.trace.mean()
    assert means["layer"].tolist() == list(range(N_LAYERS))
    torch.testing.assert_close(torch.tensor(means["mean"].to_numpy()), summary.mean.double())
    torch.testing.assert_close(torch.tensor(means["upper"].to_numpy()), summary.upper.double())
    normalized = result.layer_means(normalized=True)
    torch.testing.assert_close(
        torch.tensor(normalized["mean"].to_numpy()), result.trace.normalized().mean().mean.double(), equal_nan=True
    )
    per_class = result.per_class()
    assert per_class.shape == (3 * N_LAYERS, 7)
    assert list(per_class.columns) == ["class", "label", "layer", "mean", "lower", "upper", "n_images"]
    rows = per_class[per_class["class"] == "h"]
    expected = result.trace.effects[data.labels == 7].double().mean(0)
    torch.testing.assert_close(torch.tensor(rows["mean"].to_numpy()), expected)
    assert torch.equal(result.for_class("e").effects, result.for_class(4).effects)


def test_study_directory_resumes_and_guards_its_settings(model, data, result, tmp_path):
    first = grayscale_study(model, data, indices=[0, 1, 2], window=3, batch_size=2, out=tmp_path, progress=False)
    # extending the study measures only the new images and returns all requested ones
    extended = grayscale_study(model, data, window=3, batch_size=2, out=tmp_path, progress=False)
    assert first.indices == [0, 1, 2] and extended.indices == list(range(N_IMAGES))
    torch.testing.assert_close(extended.trace.effects, result.trace.effects)
    assert len(list(tmp_path.glob("rank0-part*.parquet"))) == 4  # 2 + 2 batches, none repeated
    with pytest.raises(ValueError, match=r"holds another study \(differing: window: 3 -> 1\); use a new out directory"):
        grayscale_study(model, data, window=1, out=tmp_path, progress=False)


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path / "study.parquet")
    loaded = GrayscaleStudyResult.load(tmp_path / "study.parquet")
    assert torch.equal(loaded.trace.effects, result.trace.effects)
    assert torch.equal(loaded.grayscale_prediction, result.grayscale_prediction)
    assert loaded.settings == result.settings and loaded.class_names == result.class_names
    assert loaded.indices == result.indices and loaded.trace.grid_size == result.trace.grid_size
    frame = pd.read_parquet(tmp_path / "study.parquet")
    assert len(frame) == N_IMAGES and len(frame["effect"][0]) == N_LAYERS
    frame.to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="path must be a file written by GrayscaleStudyResult.save"):
        GrayscaleStudyResult.load(tmp_path / "plain.parquet")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "heads"}, "kind must be one of"),
        ({"window": 0}, r"window must be an int in \[1, 3\] \(the number of layers\), got 0"),
        ({"window": 5}, r"window must be an int in \[1, 3\] \(the number of layers\), got 5"),
        ({"indices": []}, "indices must select at least one image"),
        ({"labels": torch.zeros(N_IMAGES, dtype=torch.long)}, "labels must be None when data carries"),
    ],
)
def test_bad_arguments_are_rejected(model, data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grayscale_study(model, data, progress=False, **kwargs)


def test_tensor_data_needs_matching_labels(model, data):
    images = model.preprocess(data.images)
    with pytest.raises(ValueError, match="labels must be given"):
        grayscale_study(model, images, progress=False)
    with pytest.raises(ValueError, match=r"labels \[image\], got shapes \(6, 3, 32, 32\) and \(5,\)"):
        grayscale_study(model, images, data.labels[:5], progress=False)


def test_unknown_class_is_rejected(result):
    with pytest.raises(ValueError, match=r"label must be one of the classes studied \[0, 4, 7\], got 1"):
        result.for_class(1)
    with pytest.raises(ValueError, match="label must be one of the class names"):
        result.for_class("zebra")


def test_reprs_are_short_summaries(result):
    text = repr(result)
    means = result.layer_means()
    best = means["mean"].idxmax()
    assert text == (
        f"GrayscaleStudyResult({N_IMAGES} images, attn window 3, {N_LAYERS} layers; accuracy colour "
        f"{result.colour_accuracy:.1%}, grayscale {result.grayscale_accuracy:.1%}; largest mean effect "
        f"{means.at[best, 'mean']:.4g} at layer {best})"
    )
    page = result._repr_html_()
    assert page.count("<table") == 2 and "Wilson" in page and "tensor(" not in page


def test_layer_curves_file_holds_the_per_layer_means_of_each_study(model, data, result, tmp_path):
    mlp = grayscale_study(model, data, kind="mlp", window=1, batch_size=4, progress=False)
    path = save_layer_curves([result, mlp], tmp_path / "curves" / "gray.json", model="tiny")
    summary = load_layer_curves(path)
    assert summary["model"] == "tiny" and summary["n_images"] == N_IMAGES
    assert summary["colour_accuracy"] == result.colour_accuracy
    curves = summary["curves"]
    assert curves["curve"].unique().tolist() == ["attn window 3", "mlp window 1"]
    for study, name in ((result, "attn window 3"), (mlp, "mlp window 1")):
        stored = curves[curves["curve"] == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(stored[["layer", "mean", "lower", "upper"]],
                                      study.layer_means()[["layer", "mean", "lower", "upper"]], check_dtype=False)
    other = grayscale_study(model, data, indices=[0, 1, 2], progress=False)
    with pytest.raises(ValueError, match="results must be studies of the same images"):
        save_layer_curves([result, other], tmp_path / "x.json", model="tiny")
