"""The vitlens-patch command line: help, argument errors, the study commands, evaluate and the demo."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vitlens_patch import cli, demo
from vitlens_patch.attribution.caap import caap
from vitlens_patch.data.folder import load_image_folder, select_per_class
from vitlens_patch.data.sample import SAMPLE_DIR
from vitlens_patch.evaluation import EvaluationResult, EvaluationSet
from vitlens_patch.pretrained import cifar10_vit, sample_images
from vitlens_patch.recipes import GrayscaleStudyResult, caap_layer_sweep
from vitlens_patch.report import Section

SAMPLE_STUDY = ["study", "grayscale", "--data", str(SAMPLE_DIR)]
SAMPLE_LAYERS = ["study", "caap-layers", "--data", str(SAMPLE_DIR)]
LATE_RANGES = [(10, 12), (11, 12)]  # late blocks: CAAP runs 1-2 of 12 blocks per patch, fast


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["study"], ["study", "grayscale"], ["study", "caap-layers"], ["evaluate"]]
)
def test_every_command_has_help(command, capsys):
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: vitlens-patch {' '.join(command)}".rstrip())
    assert "%%" not in out


def test_help_says_95_percent_once(capsys):
    _, out, _ = run_cli(["evaluate", "--help"], capsys)
    assert "means with 95% CIs" in " ".join(out.split())


def test_resuming_into_another_study_is_refused_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "gray.parquet")
    argv = [*SAMPLE_STUDY, "--n", "10", "--out", out]
    code, _, err = run_cli([*argv, "--window", "3"], capsys)
    assert code == 0
    # the same command again resumes: the bar shows the stored images as done / total
    code, _, err = run_cli([*argv, "--window", "3"], capsys)
    assert code == 0
    bar = err.strip().split("\r")[-1]
    assert bar.startswith("grayscale study (attn, window 3): 100%") and "10/10" in bar
    code, stdout, err = run_cli([*argv, "--window", "1", "--no-progress"], capsys)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"vitlens-patch study grayscale: error: out '{out}.parts' holds another study (differing: "
        "window: 3 -> 1); use a new out directory for a new study"
    )
    evaluation = ["evaluate", "--n", "10", "--methods", "random", "--out", str(tmp_path / "evaluation"),
                  "--report", str(tmp_path / "evaluation.html"), "--no-progress"]
    assert run_cli([*evaluation, "--metrics", "aupr"], capsys)[0] == 0
    code, _, err = run_cli([*evaluation, "--metrics", "pointing_game"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vitlens-patch evaluate: error: out ") and "holds another study" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["study"], "the following arguments are required: STUDY"),
        (["study", "grayscale"], "the following arguments are required: --data"),
        (["study", "grayscale", "--data", "x", "--n", "0"], "argument --n/--n-images: must be an integer >= 1, got 0"),
        (["study", "grayscale", "--data", "x", "--kind", "heads"], "argument --kind: invalid choice: 'heads'"),
        (["demo", "--n-per-class", "-1"], "argument --n-per-class: must be an integer >= 1, got -1"),
        (["demo", "--n-per-class", "two"], "argument --n-per-class: must be an integer >= 1, got 'two'"),
        (["study", "grayscale", "--data", "no/such/dir"], "path must be an image folder or a .tar.gz archive"),
        ([*SAMPLE_STUDY, "--window", "3", "13"], "--window must be in [1, 12], got [13]"),
        ([*SAMPLE_STUDY, "--n", "15"], "--n must be a multiple of the number of classes (10), got 15"),
        ([*SAMPLE_STUDY, "--n", "200"], "--n: n must be <= 10"),
        (SAMPLE_LAYERS, "the following arguments are required: --n/--n-images"),
        ([*SAMPLE_LAYERS, "--n", "15"], "--n must be a multiple of the number of classes (10), got 15"),
        ([*SAMPLE_LAYERS, "--n", "200"], "--n: n must be <= 10"),
        ([*SAMPLE_LAYERS, "--n", "10", "--metric", "aupr"],
         "argument --metric: invalid choice: 'aupr' (choose from "),
        ([*SAMPLE_LAYERS, "--n", "10", "--ranges", "3:9", "9:13", "x"],
         "--ranges must be default, all, or START:STOP block ranges with 0 <= START < STOP <= 12, got 9:13 x"),
        ([*SAMPLE_LAYERS, "--n", "10", "--exclude-evaluate", "15"],
         "--exclude-evaluate must be a multiple of the number of classes (10), got 15"),
        ([*SAMPLE_LAYERS, "--n", "60", "--exclude-evaluate", "50"], "--n: n must be <= 5"),
        (["evaluate", "--caap-blocks", "9", "3"],
         "--caap-blocks must be START STOP with 0 <= START < STOP <= 12, got 9 3"),
        (["evaluate", "--caap-blocks", "0", "13"],
         "--caap-blocks must be START STOP with 0 <= START < STOP <= 12, got 0 13"),
        (["evaluate", "--caap-blocks", "3"], "argument --caap-blocks: expected 2 arguments"),
        (["evaluate", "--caap-blocks", "3", "nine"], "argument --caap-blocks: invalid int value: 'nine'"),
        (["evaluate", "--caap-blocks", "3", "9", "--methods", "random"],
         "--caap-blocks needs caap among --methods, got random"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err


def test_study_data_must_hold_the_model_classes(tmp_path, capsys):
    for name in ("cat", "dog"):
        shutil.copytree(SAMPLE_DIR / name, tmp_path / name)
    code, _, err = run_cli([*SAMPLE_STUDY[:3], str(tmp_path)], capsys)
    assert code == 2
    assert "--data must hold the model's classes ('airplane'," in err and "got ('cat', 'dog')" in err


def test_grayscale_study_command_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "gray.parquet"
    argv = [*SAMPLE_STUDY, "--n", "10", "--window", "3", "1", "--out", str(out), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    paths = [tmp_path / "gray_window3.parquet", tmp_path / "gray_window1.parquet"]
    results = [GrayscaleStudyResult.load(path) for path in paths]
    assert [result.settings["window"] for result in results] == [3, 1]
    assert results[0].labels.tolist() == list(range(10))  # one image per class
    assert f"accuracy colour {results[0].colour_accuracy:.4f}" in stdout
    assert stdout.count("mean indirect effect") == 2 and str(tmp_path / "gray.html") in stdout
    assert "plotly-graph-div" in (tmp_path / "gray.html").read_text()
    assert (tmp_path / "gray_window3.parquet.parts" / "results.parquet").is_file()


def test_demo_report_has_every_section_and_the_extra_ones(tmp_path, browser_page):
    def extra(model, sample):
        return [Section("Extra section", f"{len(sample)} images")]

    path = demo.run_demo(tmp_path / "demo.html", n_per_class=1, extra_sections=[extra], progress=False)
    page = path.read_text()
    for title in ("The embedded model", "Causal trace of one image", "Explore the trace interactively",
                  "Grayscale study on the embedded images", "CAAP and the baselines", "Extra section"):
        assert title in page
    assert "10 images" in page
    assert page.count("plotly.js v") == 1
    assert page.count('class="plotly-graph-div"') == 10
    assert (tmp_path / "demo_explorer.html").is_file() and 'href="demo_explorer.html"' in page
    # the report and the explorer page it links render in a real browser, offline (one demo run for both)
    browser_page.open_file(path, timeout=60)
    assert browser_page.wait_for_figures(10, timeout=120) == 10
    browser_page.screenshot("demo-report")
    browser_page.page.click('a[href="demo_explorer.html"]')
    browser_page.page.wait_for_selector(".vitlens-explorer", timeout=60_000)
    assert browser_page.wait_for_figures(3, selector=".vitlens-explorer .js-plotly-plot", timeout=120) == 3
    browser_page.screenshot("demo-explorer")
    browser_page.assert_clean()


def test_demo_command_passes_its_options_and_prints_the_path(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_run_demo(out, *, n_per_class, progress):
        calls.append((out, n_per_class, progress))
        return Path(out).resolve()

    monkeypatch.setattr(cli, "run_demo", fake_run_demo)
    out = tmp_path / "demo.html"
    code, stdout, _ = run_cli(["demo", "--out", str(out), "--n-per-class", "2", "--no-progress"], capsys)
    assert code == 0 and calls == [(str(out), 2, False)]
    assert Path(stdout.strip()) == out.resolve()


def test_evaluate_command_prints_table_and_writes_report(tmp_path, capsys):
    report = tmp_path / "evaluation.html"
    argv = ["evaluate", "--n", "10", "--methods", "caap", "random", "--metrics", "deletion", "aupr",
            "--report", str(report), "--result", str(tmp_path / "result"), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    assert "| caap |" in stdout and "| random |" in stdout
    assert "plotly-graph-div" in report.read_text()
    assert (tmp_path / "result" / "scores.parquet").is_file()


def test_evaluate_command_rejects_bad_arguments(capsys):
    code, _, err = run_cli(["evaluate", "--n", "15", "--no-progress"], capsys)
    assert code == 2 and "n must be a positive multiple of the 10 classes, got 15" in err
    code, _, err = run_cli(["evaluate", "--n", "10", "--methods", "lime", "--no-progress"], capsys)
    assert code == 2 and "lime" in err


def _layer_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    assert list(table.columns) == ["start", "stop", "mean", "lower", "upper", "n_images", "best"]
    assert table["start"].dtype == np.int64 and table["stop"].dtype == np.int64  # ints, not floats
    return table


def test_caap_layers_command_equals_the_sweep_and_resumes(tmp_path, capsys):
    out = tmp_path / "layers"
    argv = [*SAMPLE_LAYERS, "--n", "10", "--ranges", "10:12", "11:12", "--batch-size", "5",
            "--out", str(out), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0
    table = _layer_table(tmp_path / "layers.csv")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "layers.parquet"), table, check_exact=False)
    # the same images (one per class, seed 0) and ranges through caap_layer_sweep directly
    model, data = cifar10_vit(), load_image_folder(SAMPLE_DIR)
    indices = select_per_class(data.labels, 1, seed=0)
    images, labels = model.preprocess(data.images[indices]), data.labels[indices]
    direct = caap_layer_sweep(model, images, target=labels, ranges=LATE_RANGES, progress=False)
    assert list(zip(table["start"], table["stop"])) == LATE_RANGES
    np.testing.assert_allclose(table["mean"], direct.table["mean"], atol=1e-6)
    assert (table["n_images"] == 10).all() and (table["lower"] < table["mean"]).all()
    start, stop = direct.best
    assert table.loc[table["best"], ["start", "stop"]].values.tolist() == [[start, stop]]
    assert f"best block range: [{start}, {stop})" in stdout and f"--caap-blocks {start} {stop}" in stdout
    assert "start  stop   mean  lower  upper  n_images" in stdout
    assert "plotly-graph-div" in (tmp_path / "layers.html").read_text()

    # interrupted after its first batch: the rerun measures only the second one, the table is the same
    parts = sorted(out.glob("rank0-part*.parquet"))
    assert len(parts) == 2
    parts[1].unlink()
    (tmp_path / "layers.csv").unlink()
    code, stdout_again, _ = run_cli(argv, capsys)
    assert code == 0 and stdout_again == stdout
    pd.testing.assert_frame_equal(_layer_table(tmp_path / "layers.csv"), table)
    assert (out / "rank0-part00001.parquet").is_file() and pd.read_parquet(out / "results.parquet")["index"].tolist() == indices

    # another metric into the same directory is refused, in one line
    code, stdout, err = run_cli([*argv, "--metric", "insertion"], capsys)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(
        f"vitlens-patch study caap-layers: error: out '{out}' holds another study (differing: "
        'metric: "deletion" -> "insertion"); use a new out directory for a new study'
    )


def test_caap_layers_command_leaves_out_the_evaluation_images(tmp_path, capsys):
    out = tmp_path / "held_out"
    argv = [*SAMPLE_LAYERS, "--n", "10", "--exclude-evaluate", "50", "--ranges", "11:12", "--out", str(out),
            "--report", str(tmp_path / "report.html"), "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    studied = set(pd.read_parquet(out / "results.parquet")["index"])
    evaluated = set(select_per_class(sample_images().labels, 5, seed=0))  # what evaluate --n 50 scores
    assert len(studied) == 10 and not studied & evaluated
    assert (tmp_path / "report.html").is_file() and _layer_table(tmp_path / "held_out.csv")["best"].all()


def test_evaluate_caap_blocks_reach_caap(tmp_path, capsys):
    argv = ["evaluate", "--n", "10", "--methods", "caap", "--metrics", "deletion", "--caap-blocks", "10", "12",
            "--report", str(tmp_path / "evaluation.html"), "--result", str(tmp_path / "result"), "--no-progress"]
    code, stdout, _ = run_cli(argv, capsys)
    assert code == 0 and "| caap |" in stdout
    result = EvaluationResult.load(tmp_path / "result")
    assert result.settings["methods"]["caap"]["options"]["layers"] == [10, 12]
    model = cifar10_vit()
    data = EvaluationSet.from_cifar10(model, sample_images(), n=10, seed=0)
    expected = caap(model, data.images, target=data.labels, layers=(10, 12), progress=False)
    assert torch.allclose(result.maps["caap"], expected, atol=1e-5)
