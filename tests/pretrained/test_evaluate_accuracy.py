"""Accuracy on full-frame, canvas and grayscale images, and its command."""

import json
import shutil

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.data.cifar10 import canvas_test_set
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.data.sample import SAMPLE_DIR
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_grayscale
from vitlens_patch.pretrained import CIFAR10_VIT_WEIGHTS, load_metadata, metadata_file
from vitlens_patch.pretrained.evaluate_accuracy import evaluate_accuracy, main


def test_accuracies_match_a_direct_computation():
    model = HookedViT.from_timm(tiny_timm_vit())
    generator = torch.Generator().manual_seed(0)
    data = LabelledImages(
        torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (7,), generator=generator),
        tuple("abcdefghij"),
    )
    accuracy = evaluate_accuracy(model, data, canvas_size=32, seed=3, batch_size=3, progress=False)
    full_frame = model.preprocess(data.images)
    canvases, _ = canvas_test_set(data, 32, seed=3)
    with torch.no_grad():
        expected = {
            "full_frame": model(full_frame),
            "canvas": model(model.preprocess(canvases)),
            "grayscale": model(corrupt_grayscale(full_frame, model.data_config)),
        }
    for kind, logits in expected.items():
        assert accuracy[kind] == pytest.approx((logits.argmax(-1) == data.labels).double().mean().item())
    assert accuracy == evaluate_accuracy(model, data, canvas_size=32, seed=3, batch_size=100, progress=False)


def test_command_prints_records_and_writes_the_three_accuracies(capsys, tmp_path):
    for suffix in (".safetensors", ".json"):
        shutil.copy(CIFAR10_VIT_WEIGHTS.with_suffix(suffix), tmp_path / f"cifar10_vit{suffix}")
    output, embedded = tmp_path / "accuracy.json", metadata_file().read_text()
    main(["--data", str(SAMPLE_DIR), "--weights", str(tmp_path), "--no-progress", "--json", str(output), "--record"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" accuracy")[0] for line in lines[:3]] == ["full-frame", "canvas", "grayscale"]
    assert all("(100 images" in line for line in lines[:3])
    written = json.loads(output.read_text())
    assert lines[0].endswith(f"{written['full_frame']:.4f}") and written["n_images"] == 100
    recorded = load_metadata(tmp_path)
    assert recorded["accuracy"] == written and recorded["class_names"] == load_metadata()["class_names"]
    assert metadata_file().read_text() == embedded  # only the given weights' JSON changes


def test_command_evaluates_n_images_per_class(capsys):
    main(["--data", str(SAMPLE_DIR), "--n", "20", "--no-progress"])
    assert all("(20 images" in line for line in capsys.readouterr().out.splitlines()[:3])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "no/such/folder"], "path must be an image folder or a .tar.gz archive"),
        (["--data", str(SAMPLE_DIR), "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ([], "the following arguments are required: --data"),
        (["--data", str(SAMPLE_DIR), "--n", "15"], "--n must be a positive multiple of the number of classes (10), got 15"),
    ],
)
def test_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
