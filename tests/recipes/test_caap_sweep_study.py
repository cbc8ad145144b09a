"""caap_layer_study: the CAAP layer sweep over a data set, through the resumable study runner."""

import numpy as np
import pandas as pd
import pytest
import torch

from vitlens_patch.recipes.caap_sweep import caap_layer_study, caap_layer_sweep, measure_caap_layers
from vitlens_patch.statistics import student_t_half_width
from vitlens_patch.studies.runner import SETTINGS_FILE

N_LAYERS = 4
RANGES = [(0, 2), (1, 4), (2, 4)]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 4, 5])


def test_study_equals_the_sweep_on_the_same_images(model, images, labels, tmp_path):
    direct = caap_layer_sweep(model, images, target=labels, ranges=RANGES, progress=False)
    study = caap_layer_study(
        model, images, labels, ranges=RANGES, batch_size=4, out=tmp_path / "study", progress=False
    )
    assert study.ranges == RANGES == direct.ranges and study.best == direct.best
    np.testing.assert_allclose(study.table["mean"], direct.table["mean"], atol=1e-6)
    np.testing.assert_allclose(study.table["std"], direct.table["std"], atol=1e-6)
    assert study.values.shape == (6, len(RANGES)) and study.values.dtype == torch.float64
    assert torch.allclose(study.values, direct.values, atol=1e-6)
    assert study.indices == list(range(6))
    assert study.table["start"].dtype == np.int64 and study.table["stop"].dtype == np.int64
    # the predicted class is caap_layer_sweep's default target
    predicted = caap_layer_study(model, images, labels, ranges=RANGES[:1], target="predicted", progress=False)
    default = caap_layer_sweep(model, images, ranges=RANGES[:1], progress=False)
    assert predicted.table["mean"].item() == pytest.approx(default.table["mean"].item(), abs=1e-6)


def test_range_means_have_student_t_intervals_and_int_ranges(model, images, labels):
    result = caap_layer_study(model, images, labels, ranges=RANGES, progress=False)
    means = result.range_means()
    assert list(means.columns) == ["start", "stop", "mean", "lower", "upper", "n_images"]
    assert means["start"].dtype == np.int64 and means["stop"].dtype == np.int64
    assert list(zip(means["start"], means["stop"])) == RANGES
    values = result.values.numpy()
    half_width = student_t_half_width(values.std(axis=0, ddof=1), 6, 0.95)
    np.testing.assert_allclose(means["mean"], values.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(means["upper"] - means["mean"], half_width, atol=1e-12)
    np.testing.assert_allclose(means["mean"] - means["lower"], half_width, atol=1e-12)
    one = caap_layer_study(model, images[:1], labels[:1], ranges=RANGES[:1], progress=False).range_means()
    assert one["lower"].isna().all() and one["n_images"].tolist() == [1]


def test_an_interrupted_study_resumes_to_the_same_result(model, images, labels, tmp_path):
    out = tmp_path / "study"
    first = caap_layer_study(model, images, labels, ranges=RANGES, batch_size=2, out=out, progress=False)
    parts = sorted(out.glob("rank0-part*.parquet"))
    assert len(parts) == 3
    parts[1].unlink()  # as if the run stopped before its second batch was stored
    kept = parts[0].stat().st_mtime_ns
    again = caap_layer_study(model, images, labels, ranges=RANGES, batch_size=2, out=out, progress=False)
    pd.testing.assert_frame_equal(again.table, first.table)
    assert torch.equal(again.values, first.values)
    assert parts[0].stat().st_mtime_ns == kept and (out / "rank0-part00003.parquet").is_file()  # one batch redone


def test_a_directory_holding_another_study_is_refused(model, images, labels, tmp_path):
    out = tmp_path / "study"
    caap_layer_study(model, images[:2], labels[:2], ranges=RANGES[:1], out=out, progress=False)
    assert '"ranges": [\n    [\n      0,\n      2\n    ]\n  ]' in (out / SETTINGS_FILE).read_text()
    with pytest.raises(ValueError, match="holds another study .differing: metric: .deletion. -> .insertion."):
        caap_layer_study(model, images[:2], labels[:2], ranges=RANGES[:1], metric="insertion", out=out, progress=False)
    with pytest.raises(ValueError, match="holds another study .differing: data_sha256 .other data."):
        caap_layer_study(model, images[2:4], labels[:2], ranges=RANGES[:1], out=out, progress=False)


def test_bad_arguments_are_refused(model, images, labels):
    with pytest.raises(ValueError, match=r"metric must be one of \['deletion', 'insertion'\] in a study, got 'pointing_game'"):
        caap_layer_study(model, images, labels, metric="pointing_game", progress=False)
    with pytest.raises(ValueError, match=r"target must be one of \('label', 'predicted'\), got 'true'"):
        caap_layer_study(model, images, labels, target="true", progress=False)
    with pytest.raises(ValueError, match="layers must be a block range"):
        caap_layer_study(model, images, labels, ranges=[(2, 5)], progress=False)
    with pytest.raises(ValueError, match="labels must be given"):
        caap_layer_study(model, images, progress=False)


def test_measure_returns_a_value_per_image_and_range(model, images, labels):
    values = measure_caap_layers(model, images[:2], labels[:2], ranges=RANGES)
    assert values["value"].shape == (2, len(RANGES)) and values["prediction"].shape == (2,)
