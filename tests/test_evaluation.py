"""The evaluation harness against direct metric calls, its table, storage and input checks."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution import AttentionRollout, RandomAttribution, get_attributor
from vitlens_patch.data.cifar10 import canvas_test_set
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.evaluation import METRICS, EvaluationResult, EvaluationSet, evaluate
from vitlens_patch.metrics import (
    boxes_to_masks,
    deletion_auc,
    insertion_auc,
    localization_aupr,
    pointing_game,
    token_deletion_auc,
)
from vitlens_patch.model import HookedViT
from vitlens_patch.attribution.caap import CAAP, caap

METHODS = ["rollout", "random", "caap"]
N_PER_CLASS = 2


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit())


@pytest.fixture(scope="module")
def source() -> LabelledImages:
    """12 random 16x16 images of 3 classes, smaller than the model's 32x32 input."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return LabelledImages(images, torch.arange(12) % 3, ("ant", "bee", "cow"))


@pytest.fixture(scope="module")
def data(model, source) -> EvaluationSet:
    return EvaluationSet.from_cifar10(model, source, 3 * N_PER_CLASS, seed=0)


@pytest.fixture(scope="module")
def result(model, data) -> EvaluationResult:
    # batch_size 4 over 6 images: two batches of different sizes
    return evaluate(METHODS, model, data, batch_size=4, progress=False)


def scores_of(result: EvaluationResult, method: str, metric: str) -> torch.Tensor:
    rows = result.scores[(result.scores["method"] == method) & (result.scores["metric"] == metric)]
    return torch.tensor(rows.sort_values("image")["value"].to_numpy())


def test_from_cifar10_builds_balanced_full_frame_and_canvas_images(model, source, data):
    assert len(data) == 6 and data.has_canvas
    assert torch.bincount(data.labels).tolist() == [N_PER_CLASS] * 3
    assert torch.equal(source.labels[data.source_indices], data.labels)
    chosen = source.images[data.source_indices]
    torch.testing.assert_close(data.images, model.preprocess(chosen))
    # each mask is the 16x16 box, and the canvas shows the source image there at its own size
    assert data.masks.flatten(1).sum(1).tolist() == [16 * 16] * 6
    canvas = data.pixels(canvas=True)
    for image, mask, original in zip(canvas, data.masks, chosen):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        patch = image[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        torch.testing.assert_close(patch, original.float() / 255, atol=1e-5, rtol=0)
    again = EvaluationSet.from_cifar10(model, source, 6, seed=0)
    other = EvaluationSet.from_cifar10(model, source, 6, seed=1)
    assert torch.equal(again.canvas_images, data.canvas_images)
    assert not torch.equal(other.masks, data.masks)


def test_from_cifar10_resizes_a_smaller_canvas_to_the_input_like_training(model, source, data):
    """A 24-pixel canvas (as a model trained on canvases smaller than its input) is resized to the
    32-pixel input like a full frame, and its object box with it."""
    small = EvaluationSet.from_cifar10(model, source, 6, seed=0, canvas_size=24)
    assert torch.equal(small.source_indices, data.source_indices)
    canvases, boxes = canvas_test_set(source.subset(small.source_indices), canvas_size=24, seed=0)
    torch.testing.assert_close(small.canvas_images, model.preprocess(canvases))
    # the tiny model's preprocessing resizes to 32 / 0.875 = 37 pixels and crops the centre 32
    resized = (boxes * 37 / 24 - 2).clamp(0, 32)
    assert torch.equal(small.masks, boxes_to_masks(resized, (32, 32)))
    sides = small.masks.any(1).sum(1)
    assert sides.min() >= 20 and sides.max() <= 25  # 16 * 37 / 24 = 24.7 pixels, less what the crop cuts
    # the input's default canvas is the one of the model's input size
    same = EvaluationSet.from_cifar10(model, source, 6, seed=0, canvas_size=32)
    assert torch.equal(same.canvas_images, data.canvas_images) and torch.equal(same.masks, data.masks)
    with pytest.raises(ValueError, match=r"canvas_size must be an integer larger than the source images \(\(16, 16\)\), got 16"):
        EvaluationSet.from_cifar10(model, source, 6, canvas_size=16)


def test_table_has_every_method_and_metric_with_the_interval_around_the_mean(result):
    table = result.table()
    assert list(table.columns) == [
        "method", "metric", "mean", "ci_low", "ci_high", "n", "higher_is_better", "interval"
    ]
    assert list(zip(table["method"], table["metric"])) == [(m, k) for m in METHODS for k in METRICS]
    assert (table["n"] == 6).all()
    assert ((table["ci_low"] <= table["mean"]) & (table["mean"] <= table["ci_high"])).all()
    assert table["higher_is_better"].tolist() == [METRICS[k].higher_is_better for k in table["metric"]]
    assert table["interval"].tolist() == ["wilson" if k == "pointing_game" else "student_t" for k in table["metric"]]
    hits = table[table["metric"] == "pointing_game"]
    assert ((0 <= hits["ci_low"]) & (hits["ci_high"] <= 1)).all()


def test_table_interval_is_the_student_t_interval():
    values = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    scores = pd.DataFrame({"method": "m", "metric": "deletion", "image": range(5), "value": values})
    low, high = stats.t.interval(0.9, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    row = EvaluationResult(scores).table(confidence=0.9).iloc[0]
    assert row["mean"] == pytest.approx(values.mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    single = EvaluationResult(scores.iloc[:1]).table().iloc[0]
    assert single["n"] == 1 and np.isnan(single["ci_low"]) and np.isnan(single["ci_high"])
    with pytest.raises(ValueError, match=r"confidence must be a number in \(0, 1\), got 1.5"):
        EvaluationResult(scores).table(confidence=1.5)


def test_scores_equal_direct_metric_calls(model, data, result):
    rollout = AttentionRollout(model, progress=False)
    maps = rollout.attribute(data.images, data.labels)
    canvas_maps = rollout.attribute(data.canvas_images, data.labels)
    torch.testing.assert_close(result.maps["rollout"], maps)
    torch.testing.assert_close(result.canvas_maps["rollout"], canvas_maps)
    direct = {
        "deletion": deletion_auc(model, data.images, maps, data.labels, progress=False),
        "insertion": insertion_auc(model, data.images, maps, data.labels, progress=False),
        "token_deletion": token_deletion_auc(model, data.images, maps, data.labels, progress=False),
        "aupr": localization_aupr(canvas_maps, data.masks),
        "pointing_game": pointing_game(canvas_maps, data.masks).float(),
    }
    for metric, values in direct.items():
        torch.testing.assert_close(scores_of(result, "rollout", metric), values.double(), msg=metric)
    # CAAP explains the true label, as the harness does by default
    torch.testing.assert_close(result.maps["caap"], caap(model, data.images, target=data.labels, progress=False))
    predictions = model(data.images).argmax(-1)
    frame = result.scores[result.scores["metric"] == "deletion"].drop_duplicates("image").sort_values("image")
    assert frame["prediction"].tolist() == predictions.tolist()
    assert frame["label"].tolist() == data.labels.tolist()


def test_batch_size_does_not_change_the_scores(model, data, result):
    whole = evaluate(["rollout", "caap"], model, data, ["deletion", "aupr"], batch_size=6, progress=False)
    for method in ("rollout", "caap"):
        for metric in ("deletion", "aupr"):
            torch.testing.assert_close(scores_of(whole, method, metric), scores_of(result, method, metric))


def test_predicted_target_explains_and_scores_the_models_class(model, data):
    predicted = model(data.images).argmax(-1)
    assert (predicted != data.labels).any()  # else the two targets could not be told apart
    result = evaluate(["occlusion"], model, data, ["deletion"], target="predicted", progress=False)
    occlusion = get_attributor("occlusion", model, progress=False)  # a method whose map depends on the target
    maps = occlusion.attribute(data.images, predicted)
    torch.testing.assert_close(result.maps["occlusion"], maps)
    assert not torch.allclose(occlusion.attribute(data.images, data.labels), maps)
    expected = deletion_auc(model, data.images, maps, predicted, progress=False)
    torch.testing.assert_close(scores_of(result, "occlusion", "deletion"), expected.double())
    assert result.canvas_maps == {} and list(result.maps) == ["occlusion"]


def test_named_methods_and_their_options(model, data):
    early = CAAP(model, layers=(0, 1), progress=False)
    result = evaluate(
        {"caap early": early, "caap late": "caap"}, model, data, ["pointing_game"],
        method_options={"caap late": {"layers": (1, 2)}}, metric_options={"pointing_game": {"tolerance": 4.0}},
        progress=False,
    )
    assert result.methods == ["caap early", "caap late"]
    assert result.settings["methods"]["caap late"]["options"]["layers"] == [1, 2]
    assert result.settings["methods"]["caap early"] == {
        "class": "CAAP", "options": {
            "score": "logit", "upsample": False, "layers": [0, 1], "context": "blur",
            "method": "exact", "verify_top_k": None, "dtype": None,
        },
    }
    late = caap(model, data.canvas_images, target=data.labels, layers=(1, 2), progress=False)
    torch.testing.assert_close(result.canvas_maps["caap late"], late)
    expected = pointing_game(late, data.masks, tolerance=4.0).double()
    torch.testing.assert_close(scores_of(result, "caap late", "pointing_game"), expected)


class CountingRollout(AttentionRollout):
    """Rollout recording the number of images it was asked to explain."""

    def __init__(self, model, seen: list, **options):
        super().__init__(model, **options)
        self._seen = seen

    def _attribute(self, images, target):
        self._seen.append(len(images))
        return super()._attribute(images, target)


def test_an_out_directory_resumes_and_refuses_other_settings(model, data, tmp_path):
    seen: list[int] = []
    first = evaluate(
        [CountingRollout(model, seen)], model, data, ["aupr"], batch_size=4, out=tmp_path, progress=False
    )
    assert sum(seen) == len(data) and first.methods == ["CountingRollout"]
    seen.clear()
    again = evaluate(
        [CountingRollout(model, seen)], model, data, ["aupr"], batch_size=4, out=tmp_path, progress=False
    )
    assert seen == []
    pd.testing.assert_frame_equal(again.scores, first.scores)
    other_settings = r'holds another study \(differing: metric_options.aupr: .*; metrics: \["aupr"\] -> \["pointing_game"\]'

    with pytest.raises(ValueError, match=other_settings):
        evaluate([CountingRollout(model, seen)], model, data, ["pointing_game"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"another study \(differing: data_sha256 \(other data\)\)"):
        evaluate([CountingRollout(model, seen)], model, data.subset([1, 0, 2, 3, 4, 5]), ["aupr"],
                 out=tmp_path, progress=False)


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path / "evaluation")
    loaded = EvaluationResult.load(tmp_path / "evaluation")
    pd.testing.assert_frame_equal(loaded.scores, result.scores)
    assert loaded.settings == result.settings
    for name in ("maps", "canvas_maps"):
        assert getattr(loaded, name).keys() == getattr(result, name).keys()
        for method, maps in getattr(result, name).items():
            assert torch.equal(getattr(loaded, name)[method], maps)
    with pytest.raises(ValueError, match="path must be a directory written by EvaluationResult.save"):
        EvaluationResult.load(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "evaluation" / "maps.safetensors"))
    with pytest.raises(ValueError, match="path must be a directory written by EvaluationResult.save"):
        EvaluationResult.load(tmp_path / "evaluation")


@pytest.mark.parametrize("hits", [[1] * 8, [0] * 8, [1, 1, 1, 1, 1, 1, 1, 0], [1]])
def test_pointing_game_interval_is_wilson_inside_zero_one(hits):
    scores = pd.DataFrame({"method": "m", "metric": "pointing_game", "image": range(len(hits)), "value": hits})
    row = EvaluationResult(scores).table().iloc[0]
    k, n = sum(hits), len(hits)
    expected = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert row["interval"] == "wilson" and row["n"] == n and row["mean"] == pytest.approx(k / n)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert 0 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1
    assert row["ci_high"] - row["ci_low"] > 0.05  # all hits or all misses still leave doubt
    if k == n:
        assert row["ci_high"] == 1
    if k == 0:
        assert row["ci_low"] == 0


def test_to_markdown_has_a_row_per_method_and_a_column_per_metric(result):
    text = result.to_markdown(digits=2)
    lines = text.splitlines()
    assert lines[0] == "| method | deletion ↓ | insertion ↑ | token_deletion ↓ | aupr ↑ | pointing_game ↑ |"
    table = result.table()
    row = table.iloc[0]
    assert lines[2].startswith(f"| rollout | {row['mean']:.2f} ± {(row['ci_high'] - row['ci_low']) / 2:.2f} |")
    hits = table[(table["method"] == "rollout") & (table["metric"] == "pointing_game")].iloc[0]
    assert lines[2].endswith(f" | {hits['mean']:.2f} [{hits['ci_low']:.2f}, {hits['ci_high']:.2f}] |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == [f"| {method}" for method in METHODS]
    assert lines[-1] == (
        "Mean ± half-width of the 95% Student-t confidence interval; for pointing_game (0/1 per image) "
        "the hit rate [95% Wilson score interval], over 6 images; ↑ higher is better, ↓ lower is better."
    )
    wide = result.summary_table(digits=2)
    assert list(wide.columns) == lines[0].strip("| ").split(" | ")
    assert wide["method"].tolist() == METHODS


def test_select_maps_and_pixels(data, result):
    maps = result.select_maps([0, 2], canvas=True)
    assert list(maps) == METHODS and all(m.shape == (2, 4, 4) for m in maps.values())
    torch.testing.assert_close(maps["caap"], result.canvas_maps["caap"][[0, 2]])
    pixels = data.pixels(range(3))
    assert pixels.shape == (3, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    empty = EvaluationResult(result.scores, maps=result.maps)
    with pytest.raises(ValueError, match="canvas=True needs canvas maps, but this evaluation computed none"):
        empty.select_maps([0], canvas=True)
    with pytest.raises(ValueError, match=r"pixels\(\) needs the set's data_config"):
        EvaluationSet(data.images, data.labels).pixels()


BAD_ARGUMENTS = {
    # name: (arguments of evaluate given the model and the data set, expected message)
    "unknown metric": (
        lambda model, data: dict(methods=["rollout"], metrics=["deletion", "iou"]),
        r"metrics must be distinct names among \['deletion'.*got \['deletion', 'iou'\]",
    ),
    "repeated metric": (
        lambda model, data: dict(methods=["rollout"], metrics=["aupr", "aupr"]),
        "metrics must be distinct names",
    ),
    "unknown method": (
        lambda model, data: dict(methods=["rolout"]),
        r"methods must be among \[.*'caap'.*\] or Attributor instances, got unknown \['rolout'\]",
    ),
    "no method": (lambda model, data: dict(methods=[]), "methods must name at least one attribution method"),
    "repeated method": (
        lambda model, data: dict(methods=["random", RandomAttribution(model)]),
        r"methods must have distinct names, got \['random'\]",
    ),
    "method of another model": (
        lambda model, data: dict(methods=[AttentionRollout(HookedViT.from_timm(tiny_timm_vit()))]),
        "methods must be bound to the evaluated model",
    ),
    "localization without masks": (
        lambda model, data: dict(
            methods=["rollout"], dataset=EvaluationSet(data.images, data.labels), metrics=["deletion", "aupr"]
        ),
        r"metrics \['aupr'\] need canvas images with object masks, but the dataset has none",
    ),
    "options of an unnamed method": (
        lambda model, data: dict(methods=["rollout"], method_options={"caap": {}}),
        r"method_options must only name methods given by registry name \['rollout'\], got \['caap'\]",
    ),
    "unknown metric option": (
        lambda model, data: dict(methods=["rollout"], metric_options={"deletion": {"steps": 3}}),
        r"metric_options\['deletion'\] must be among \['n_steps'",
    ),
    "options of an unevaluated metric": (
        lambda model, data: dict(methods=["rollout"], metrics=["aupr"], metric_options={"deletion": {}}),
        r"metric_options must only name evaluated metrics \['aupr'\]",
    ),
    "unknown target": (
        lambda model, data: dict(methods=["rollout"], target="true"),
        r"target must be one of \('label', 'predicted'\), got 'true'",
    ),
    "empty batches": (
        lambda model, data: dict(methods=["rollout"], batch_size=0), "batch_size must be a positive int, got 0"
    ),
    "tensor as data set": (
        lambda model, data: dict(methods=["rollout"], dataset=data.images),
        "dataset must be an EvaluationSet, got Tensor",
    ),
    "images of another size": (
        lambda model, data: dict(methods=["rollout"], dataset=EvaluationSet(data.images[..., :16, :16], data.labels)),
        r"dataset images must be a float tensor \[batch, 3, 32, 32\] .* shape \(6, 3, 16, 16\)",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
@pytest.mark.usefixtures("without_type_checks")
def test_evaluate_rejects_bad_inputs(model, data, case):
    arguments, message = BAD_ARGUMENTS[case]
    kwargs = {"dataset": data, **arguments(model, data)}
    with pytest.raises(ValueError, match=message):
        evaluate(kwargs.pop("methods"), model, kwargs.pop("dataset"), progress=False, **kwargs)


@pytest.mark.usefixtures("without_type_checks")
def test_evaluation_set_rejects_bad_inputs(model, source, data):
    with pytest.raises(ValueError, match="canvas_images and masks must be given together"):
        EvaluationSet(data.images, data.labels, canvas_images=data.canvas_images)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \[6\], got torch.float32 tensor"):
        EvaluationSet(data.images, data.labels.float())
    with pytest.raises(ValueError, match=r"masks must be a bool tensor \[6, 32, 32\], got torch.int64"):
        EvaluationSet(data.images, data.labels, data.canvas_images, data.masks.long())
    with pytest.raises(ValueError, match="n must be a positive multiple of the 3 classes, got 4"):
        EvaluationSet.from_cifar10(model, source, 4)
    large = LabelledImages(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.arange(3), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"source images \(\(32, 32\)\) must be smaller than the model's square input"):
        EvaluationSet.from_cifar10(model, large, 3)


def test_reprs_are_the_summary_table(result):
    text = repr(result)
    assert text.startswith("EvaluationResult(3 methods x 5 metrics on 6 images)\n| method | deletion ↓")
    assert text.endswith(result.interval_note()) and "tensor(" not in text
    page = result._repr_html_()
    assert page.startswith("<b>EvaluationResult</b>: 3 methods x 5 metrics on 6 images<table")
    assert "pointing_game ↑" in page and "Wilson" in page
