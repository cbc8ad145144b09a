import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import vitlens_patch
from vitlens_patch.data.folder import select_per_class
from vitlens_patch.studies import model_fingerprint, read_study, run_study, stack_column

SCRIPT = Path(__file__).with_name("torchrun_study.py")
_spec = importlib.util.spec_from_file_location("torchrun_study", SCRIPT)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


class CountingMeasure:
    """The study's measure (run with ``with_indices=True``), recording the data set indices it
    measured; raises after ``crash_after`` calls."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after = crash_after
        self.measured: list[int] = []
        self.calls = 0

    def __call__(self, model, images, labels, indices):
        if self.calls == self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.measured += indices.tolist()
        return study.measure(model, images, labels)


def expected_results(model, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The study's values computed directly on all images at once."""
    return study.measure(model, model.preprocess(images), labels)


def assert_same_results(results: pd.DataFrame, reference: pd.DataFrame) -> None:
    np.testing.assert_array_equal(results["index"], reference["index"])
    np.testing.assert_array_equal(results["label"], reference["label"])
    for column in ("logit", "cls_norm"):
        torch.testing.assert_close(stack_column(results, column), stack_column(reference, column))


def run(dataset, out, measure=study.measure, **kwargs) -> pd.DataFrame:
    kwargs = {
        "batch_size": study.BATCH_SIZE,
        "progress": False,
        "with_indices": isinstance(measure, CountingMeasure),
        **kwargs,
    }
    return run_study(study.make_model(), dataset, measure, out, **kwargs)


def test_run_study_stores_one_row_per_image(tmp_path):
    model, dataset = study.make_model(), study.make_dataset()
    results = run_study(model, dataset, study.measure, tmp_path, batch_size=4, progress=False)

    images, labels = dataset.tensors
    expected = expected_results(model, images, labels)
    np.testing.assert_array_equal(results["index"], np.arange(study.N_IMAGES))
    np.testing.assert_array_equal(results["label"], labels.numpy())
    torch.testing.assert_close(stack_column(results, "logit"), expected["logit"])
    torch.testing.assert_close(stack_column(results, "cls_norm"), expected["cls_norm"])
    assert stack_column(results, "cls_norm").shape == (study.N_IMAGES, model.cfg.n_layers)
    assert len(list(tmp_path.glob("rank0-part*.parquet"))) == study.N_IMAGES // 4
    assert_same_results(pd.read_parquet(tmp_path / "results.parquet"), results)
    assert_same_results(read_study(tmp_path), results)


def test_interrupted_study_resumes_without_recomputing(tmp_path):
    dataset = study.make_dataset()
    reference = run(dataset, tmp_path / "uninterrupted")

    crashing = CountingMeasure(crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(dataset, tmp_path / "resumed", crashing)
    finished = read_study(tmp_path / "resumed")["index"].tolist()
    assert finished == sorted(crashing.measured) and len(finished) == 2 * study.BATCH_SIZE

    resumed = CountingMeasure()
    results = run(dataset, tmp_path / "resumed", resumed)
    assert sorted(resumed.measured) == sorted(set(range(study.N_IMAGES)) - set(finished))
    assert_same_results(results, reference)

    again = CountingMeasure()
    assert_same_results(run(dataset, tmp_path / "resumed", again), reference)
    assert again.calls == 0


def test_indices_restrict_the_study_and_extending_reuses_finished_images(tmp_path):
    model, dataset = study.make_model(), study.make_dataset()
    images, labels = dataset.tensors
    few, more = select_per_class(labels, 2, seed=1), select_per_class(labels, 3, seed=1)
    assert set(few) < set(more)

    results = run(dataset, tmp_path, indices=few)
    assert results["index"].tolist() == few

    extension = CountingMeasure()
    results = run(dataset, tmp_path, extension, indices=torch.tensor(more))
    assert sorted(extension.measured) == sorted(set(more) - set(few))
    assert results["index"].tolist() == more
    expected = expected_results(model, images[more], labels[more])
    torch.testing.assert_close(stack_column(results, "cls_norm"), expected["cls_norm"])


def test_two_process_torchrun_equals_one_process(tmp_path):
    """One torchrun launch runs the study twice: from scratch, and resuming a crashed run."""
    dataset = study.make_dataset()
    reference = run(dataset, tmp_path / "single")
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(dataset, resumed, CountingMeasure(crash_after=1))
    crashed = {path.name: path.read_bytes() for path in resumed.glob("*.parquet")}
    old_parts = {fresh: {}, resumed: crashed}
    done = {fresh: [], resumed: read_study(resumed)["index"].tolist()}

    repo = str(Path(vitlens_patch.__file__).parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(SCRIPT), str(fresh), str(resumed)]
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    assert all((resumed / name).read_bytes() == data for name, data in crashed.items())
    for out in (fresh, resumed):
        assert_same_results(pd.read_parquet(out / "results.parquet"), reference)
        by_rank = {
            rank: [
                index
                for path in out.glob(f"rank{rank}-part*.parquet")
                if path.name not in old_parts[out]
                for index in pd.read_parquet(path)["index"]
            ]
            for rank in (0, 1)
        }
        assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])
        assert sorted(by_rank[0] + by_rank[1] + done[out]) == list(range(study.N_IMAGES))


def test_image_folder_path_is_read_with_class_labels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=generator)
    for i, array in enumerate(pixels):
        folder = tmp_path / "images" / ("cat" if i < 3 else "ant")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.numpy()).save(folder / f"{i}.png")

    model = study.make_model()
    results = run(tmp_path / "images", tmp_path / "study")

    order = [3, 4, 5, 0, 1, 2]  # classes alphabetical: ant (images 3-5) = 0, cat (0-2) = 1
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = expected_results(model, pixels[order].permute(0, 3, 1, 2), labels)
    np.testing.assert_array_equal(results["label"], labels.numpy())
    torch.testing.assert_close(stack_column(results, "cls_norm"), expected["cls_norm"])


def test_float_images_are_taken_as_model_input(tmp_path):
    model, dataset = study.make_model(), study.make_dataset()
    images, labels = dataset.tensors
    preprocessed = TensorDataset(model.preprocess(images), labels)

    assert_same_results(run(preprocessed, tmp_path / "float"), run(dataset, tmp_path / "uint8"))


def test_raw_images_need_a_model_with_preprocess(tmp_path):
    with pytest.raises(ValueError, match="model must have a preprocess method"):
        run_study(nn.Identity(), study.make_dataset(), study.measure, tmp_path, progress=False)


def test_with_indices_passes_the_dataset_indices(tmp_path):
    def measure(model, images, labels, indices):
        return {"seen": indices}

    results = run(study.make_dataset(), tmp_path, measure, with_indices=True, indices=[1, 5, 6])
    assert results["seen"].tolist() == results["index"].tolist() == [1, 5, 6]


def test_progress_bar_only_when_asked(tmp_path, capsys):
    run(study.make_dataset(), tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    run(study.make_dataset(), tmp_path / "loud", progress=True)
    assert f"{study.N_IMAGES}/{study.N_IMAGES}" in capsys.readouterr().err


def test_select_per_class():
    labels = torch.arange(40) % 4
    chosen = select_per_class(labels, 3, seed=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == 12
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3, 3]
    assert select_per_class(labels, 3, seed=0) == chosen
    assert select_per_class(labels, 3, seed=1) != chosen
    assert select_per_class(labels.tolist(), 2, seed=None) == [0, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("n", "match"),
    [(11, "n must be <= 10, the size of class 0, got 11"), (0, "n must be a positive int, got 0")],
)
def test_select_per_class_rejects_bad_n(n, match):
    with pytest.raises(ValueError, match=match):
        select_per_class(torch.arange(40) % 4, n)


def test_stack_column_rejects_unknown_column(tmp_path):
    results = run(study.make_dataset(4), tmp_path)
    allowed = r"\['index', 'label', 'logit', 'cls_norm'\]"
    with pytest.raises(ValueError, match=rf"column must be one of {allowed}, got 'nope'"):
        stack_column(results, "nope")


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (
            {"x": torch.zeros(3)},
            r"measure output 'x' must have shape \[batch\] or \[batch, k\] with batch = 4, "
            r"got shape \(3,\)",
        ),
        ({"x": torch.zeros(4, 2, 2)}, r"got shape \(4, 2, 2\)"),
        ({"index": torch.zeros(4)}, "measure output names must be strings other than"),
        (torch.zeros(4), "measure must return a dict of per-image values, got Tensor"),
    ],
    ids=["length", "ndim", "reserved", "not-a-dict"],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_measure_output_is_rejected(tmp_path, output, match):
    with pytest.raises(ValueError, match=match):
        run(study.make_dataset(4), tmp_path, lambda model, images, labels: output)


def test_changed_measurement_on_resume_is_rejected(tmp_path):
    dataset = study.make_dataset()
    run(dataset, tmp_path, indices=[0, 1])
    with pytest.raises(ValueError, match="measure must return the columns already stored"):
        run(dataset, tmp_path, lambda model, images, labels: {"other": labels})


def test_resuming_with_another_model_or_settings_is_refused(tmp_path):
    dataset = study.make_dataset()
    run(dataset, tmp_path, indices=[0, 1], settings={"window": (3,)})
    run(dataset, tmp_path, indices=[0, 1, 2], settings={"window": [3]})  # same once read from JSON
    with pytest.raises(ValueError, match=r"another study \(differing: window: \[3\] -> \[1\]\); use a new out"):
        run(dataset, tmp_path, settings={"window": [1]})
    other_model = study.make_model()
    with torch.no_grad():
        next(other_model.parameters()).view(-1)[0] += 1
    with pytest.raises(ValueError, match=r"differing: model_sha256 \(another model or other weights\)\)"):
        run_study(other_model, dataset, study.measure, tmp_path, settings={"window": [3]}, progress=False)


def test_model_fingerprint_follows_names_dtypes_and_values():
    model = study.make_model()
    assert model_fingerprint(model) == model_fingerprint(study.make_model())
    parameter = next(model.parameters())
    with torch.no_grad():
        parameter.view(-1)[-1] = parameter.view(-1)[-1].nextafter(torch.tensor(float("inf")))
    assert model_fingerprint(model) != model_fingerprint(study.make_model())
    assert model_fingerprint(study.make_model().double()) != model_fingerprint(study.make_model())


@pytest.mark.parametrize(
    ("dataset", "kwargs", "match"),
    [
        (None, {"batch_size": 0}, "batch_size must be a positive int, got 0"),
        (None, {"indices": [0, 16]}, r"in \[0, 15\] \(the dataset has 16 images\), got 16"),
        (None, {"indices": [-1]}, "got -1"),
        (None, {"indices": [0.5]}, "indices must be integers"),
        (5, {}, "dataset must be a map-style torch Dataset, LabelledImages or .*, got int"),
        ([torch.zeros(3, 32, 32)], {}, r"dataset items must be \(image, label\) pairs, got Tensor"),
        (None, {"settings": {"model": object()}}, "settings must be a JSON-serialisable mapping"),
    ],
    ids=["batch_size", "large-index", "negative-index", "float-index", "not-dataset", "not-pairs",
         "settings"],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_arguments_are_rejected(tmp_path, dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(study.make_dataset() if dataset is None else dataset, tmp_path, **kwargs)


def test_read_study_needs_part_files(tmp_path):
    with pytest.raises(ValueError, match="out must be a study directory"):
        read_study(tmp_path)
